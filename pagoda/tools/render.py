"""Conversations with tools, through the model's chat template.

Templates that know tools (their source mentions ``tools``: Qwen2.5/3,
Llama 3.1+, Mistral, Hermes) get them as the ``tools`` Jinja variable, and
assistant ``tool_calls`` with their arguments as objects, as transformers
documents. Templates that do not (the default model's ChatML) get pagoda's
fallback: a system prompt that lists the functions and asks for Hermes-style
``<tool_call>`` blocks (parsed by the ``hermes`` parser), earlier calls
written back into the assistant turns in that form, and tool results as
``<tool_response>`` blocks in a user turn.
"""

from __future__ import annotations

import json

from pagoda.tools.calls import ToolCall

FALLBACK_PROMPT = """You can call functions. The functions you may call are listed as JSON inside <tools></tools>:
<tools>
{tools}
</tools>
To call a function, reply with one JSON object per call inside <tool_call></tool_call> tags, like this:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}
</tool_call>
Call a function only when it helps to answer; otherwise answer in plain text."""


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def _template_source(tokenizer, chat_template: str | None) -> str | None:
    if chat_template is not None:
        return chat_template
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one, or the tool_use one
        return source.get("tool_use") or source.get("default")
    return source


def _calls_of(message: dict) -> list[ToolCall]:
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(function.get("name", ""), arguments, call.get("id") or ""))
    return calls


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that knows tools: tool-call arguments as objects (HF's convention)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.name, "arguments": c.arguments_dict()}} for c in _calls_of(message)]
            message = {**message, "tool_calls": calls, "content": message.get("content") or ""}
        out.append(message)
    return out


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for a template without tools: the fallback prompt, calls and results as text."""
    out: list[dict] = []
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listed)
        if messages and messages[0].get("role") in ("system", "developer"):
            prompt = f"{messages[0].get('content') or ''}\n\n{prompt}".lstrip()
            messages = messages[1:]
        out.append({"role": "system", "content": prompt})
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            blocks = [f'<tool_call>\n{json.dumps({"name": c.name, "arguments": c.arguments_dict()}, ensure_ascii=False)}'
                      "\n</tool_call>" for c in _calls_of(message)]
            text = "\n".join(([message["content"]] if message.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block  # results of parallel calls share one turn
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(message)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                chat_template: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation, with ``tools`` (OpenAI's function tool objects) if any."""
    has_tool_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not tools and not has_tool_turns:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if template_knows_tools(_template_source(tokenizer, chat_template)):
        return tokenizer.apply_chat_template(native_messages(messages), tools=tools or None,
                                             chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), chat_template=chat_template,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)
