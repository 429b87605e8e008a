"""The Responses API's request body, and its translation into a chat request.

A Responses request is a chat request in other clothes: ``input`` (a string or
a list of items) and ``instructions`` become chat messages, function tools and
``tool_choice`` take the chat form, ``text.format`` becomes
``response_format``. serving_responses.py runs the chat request and dresses
the answer as a Response.

Fields that would change the answer and that pagoda does not implement
(``UNSUPPORTED``) are refused with a 400 naming them when set to anything but
their neutral value; unknown fields are ignored with a logged warning, as on
the other endpoints.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import Field

from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.protocol import INT64_MAX, INT64_MIN, _show, _Strict

logger = logging.getLogger(__name__)


class ResponsesRequest(_Strict):
    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    user: str | None = None
    # pagoda/vLLM extensions, as on chat.
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    top_k: int | None = None
    # Accepted, do not change the answer.
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    stream_options: dict | None = None
    # Refused unless neutral (UNSUPPORTED).
    reasoning: dict | None = None
    include: list | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: dict | None = None
    max_tool_calls: int | None = None
    truncation: str | None = None
    top_logprobs: int | None = None


_NEUTRAL: dict[str, tuple] = {
    "reasoning": (None, {}),
    "include": (None, []),
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "max_tool_calls": (None,),
    "truncation": (None, "disabled"),
    "top_logprobs": (None, 0),
}
UNSUPPORTED = tuple(_NEUTRAL)

_TEXT_PARTS = ("input_text", "output_text", "text")


def refuse_unsupported(body: ResponsesRequest) -> None:
    for name, neutral in _NEUTRAL.items():
        if getattr(body, name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server (yet); remove it or send "
                                f"{_show(neutral)}", name, code="unsupported_parameter")
    if body.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


def _text_of(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}[{j}].type={kind!r} is not supported: this model takes text parts only "
                                "(input_text, output_text)", f"{where}[{j}].type", code="unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}].text must be a string", f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(body: ResponsesRequest) -> list[dict]:
    """``input`` as chat-template messages (without ``instructions``)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role={role!r} is invalid: user, assistant, system or developer",
                               f"{where}.role")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{where}.{key} must be a string", f"{where}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id must be a string", f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        else:
            raise APIError(400, f"{where}.type={kind!r} is not supported: message, function_call or "
                                "function_call_output", f"{where}.type", code="unsupported_parameter")
    return messages


def chat_tools(tools: list | None) -> list | None:
    """Responses function tools ({type, name, description, parameters}) in the chat form."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"tools[{i}].type={kind!r} is not supported: only \"function\" tools",
                           f"tools[{i}].type", code="unsupported_parameter")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict | None) -> dict | None:
    """``text.format`` as chat's ``response_format``."""
    if not text:
        return None
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return fmt


def chat_body(body: ResponsesRequest) -> dict:
    """The chat request (as a dict for ChatCompletionRequest) that answers ``body``; messages apart."""
    out = {
        "model": body.model,
        "messages": [{"role": "user", "content": ""}],  # placeholder: the caller passes the real messages
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "tools": chat_tools(body.tools),
        "tool_choice": chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "stream": body.stream,
        "user": body.user,
    }
    fmt = response_format(body.text)
    if fmt is not None and fmt != {"type": "text"}:
        out["response_format"] = fmt
    return {k: v for k, v in out.items() if v is not None}


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)
