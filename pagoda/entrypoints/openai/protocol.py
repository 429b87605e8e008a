"""Request bodies of the OpenAI API, as pydantic models.

Types are strict: "10" is not a number and "yes" is not a boolean (400 naming
the field). Range checks live in `SamplingParams`, so the message names the
field and its limit in one place; only JSON-level bounds (64-bit integers)
are here.

Three kinds of fields:
- honoured: the typed fields below;
- refused: fields OpenAI defines that would change the answer and pagoda does
  not implement (`UNSUPPORTED`): a 400 naming the field when they are set to
  anything but their neutral value, never accepted and ignored;
- unknown: anything else is ignored with a logged warning (as vLLM does),
  since clients send fields of newer API versions that do not change the answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagoda.entrypoints.openai.errors import APIError

logger = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Keep only the last N prompt tokens (instead of refusing a prompt that is too long).
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    # Only requests with the same salt share prefix-cache blocks (tenant isolation).
    cache_salt: str | None = None
    # With `--scheduling-policy priority`: lower values are served first (vLLM's convention).
    priority: int = Field(default=0, ge=INT64_MIN, le=INT64_MAX)
    # Generate best_of samples, return the n with the highest cumulative logprob (not streamable).
    best_of: int | None = None
    # Beam search (vLLM's extension): the n best of beam_width beams (default: best_of, else n).
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # Structured outputs (structured_outputs.py): OpenAI's response_format (on the subclasses),
    # vLLM's `structured_outputs` object and its legacy guided_* fields.
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # Accepted, do not change the answer.
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    def warn_unknown_fields(self) -> None:
        if self.model_extra:
            logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    response_format: dict | None = None  # vLLM takes it on completions too
    # Refused when set (see UNSUPPORTED).
    suffix: str | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # An assistant turn's calls: [{"id", "type": "function", "function": {"name", "arguments"}}].
    tool_calls: list | None = None
    # Refused when set (the legacy form of tool_calls).
    function_call: dict | None = None
    audio: dict | None = None

    def text(self) -> str:
        """Content as plain text (text parts of a multi-part message joined)."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Tool calling (pagoda/tools): validated by plan_tools.
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Refused when set to anything but their neutral value (see UNSUPPORTED).
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None  # structured outputs (structured_outputs.py)
    modalities: list | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None


# Fields pagoda does not implement, with the values that mean "not used".
# A request that sets one to anything else is refused with a 400 naming it.
_NEUTRAL: dict[str, tuple] = {
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
UNSUPPORTED = tuple(_NEUTRAL)


def refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for the first field that asks for something pagoda does not do."""
    for name, neutral in _NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server (yet); remove it or send "
                                f"{_show(neutral)}", name, code="unsupported_parameter")
    if isinstance(body, ChatCompletionRequest):
        refuse_unsupported_messages(body.messages)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= body.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs={body.top_logprobs} is invalid: must be an integer in [0, 20]",
                               "top_logprobs")
    body.warn_unknown_fields()


def refuse_unsupported_messages(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        for name in ("function_call", "audio"):
            if getattr(message, name):
                raise APIError(400, f"messages[{i}].{name} is not supported by this server (yet)",
                               f"messages[{i}].{name}", code="unsupported_parameter")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if part.type != "text":
                    raise APIError(400, f"{where}.type={part.type!r} is not supported: this model takes text "
                                        "parts only", f"{where}.type", code="unsupported_parameter")
                if part.text is None:
                    raise APIError(400, f"{where}.text is missing: a text part needs a string", f"{where}.text")


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The conversation as chat-template dicts: text content, and tool calls / tool results kept."""
    out = []
    for i, message in enumerate(messages):
        entry: dict = {"role": message.role, "content": message.text()}
        if message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"messages[{i}].tool_calls is only for assistant messages",
                               f"messages[{i}].tool_calls")
            entry["tool_calls"] = [_checked_call(call, f"messages[{i}].tool_calls[{j}]")
                                   for j, call in enumerate(message.tool_calls)]
        if message.role == "tool":
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out


def _checked_call(call, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            "\"arguments\"}}", where)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise APIError(400, f"{where}.function.arguments must be a JSON string", f"{where}.function.arguments")
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def _show(values: tuple) -> str:
    shown = [json.dumps(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


class TokenizeRequest(_Strict):
    """Either a prompt, or chat messages (the chat template is applied, as a chat request would)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's `POST /v1/load_lora_adapter` body; `lora_path` must be under the server's --lora-dir."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # accepted for vLLM clients; the name decides
