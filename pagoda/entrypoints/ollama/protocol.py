"""Request bodies of the Ollama API, as strict pydantic models.

As on the OpenAI side: strict types (`num_predict: "10"` is a 400), fields
that would change the answer and are not implemented are refused by name
(`tools`, `images`, `template`, `suffix`, `think`, mirostat and
friends), runtime knobs that do not change the answer (`num_ctx`,
`num_thread`, `keep_alive`...) are accepted, and unknown option names are
ignored with a logged warning, as Ollama does.
"""

from __future__ import annotations

import json

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagoda.entrypoints.openai.errors import APIError
from pagoda.entrypoints.openai.protocol import INT64_MAX, INT64_MIN

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class OllamaOptions(_Strict):
    # Sampling, mapped onto SamplingParams.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    num_predict: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Runtime knobs: accepted, they do not change the answer here.
    num_ctx: int | None = None
    num_keep: int | None = None
    num_batch: int | None = None
    num_thread: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    mirostat_eta: float | None = None  # only used by mirostat, which is refused
    mirostat_tau: float | None = None
    # Sampling pagoda does not implement: refused unless neutral.
    mirostat: int | None = None
    tfs_z: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None


# option -> SamplingParams field
SAMPLING_OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "stop": "stop", "num_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}
_NEUTRAL_OPTIONS = {"mirostat": (None, 0), "tfs_z": (None, 1.0), "typical_p": (None, 1.0),
                    "repeat_last_n": (None, -1), "penalize_newline": (None, False)}


class OllamaMessage(_Strict):
    role: str
    content: str = ""
    thinking: str | None = None
    tool_name: str | None = None  # a tool result's function
    images: list | None = None  # refused when non-empty
    tool_calls: list | None = None  # an assistant turn's calls: [{"function": {"name", "arguments": {...}}}]


class _OllamaRequest(_Strict):
    model: str
    stream: bool = True
    options: OllamaOptions | None = None
    keep_alive: str | int | float | None = None
    format: Any = None  # "json" or a JSON schema: structured outputs (`constraint`)
    think: bool | str | None = None  # refused when truthy


class GenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    # Token ids a previous /api/generate answer returned: the conversation so far.
    context: list[int] | None = None
    images: list | None = None
    suffix: str | None = None
    template: str | None = None


class ChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: list | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None
    stream: bool = True


def refuse_unsupported(body: GenerateRequest | ChatRequest) -> None:
    """400 naming the first field or option that asks for something pagoda does not do."""
    def refuse(name: str) -> None:
        raise APIError(400, f"{name} is not supported by this server (yet)", name)

    if body.think:
        refuse("think")
    if isinstance(body, GenerateRequest):
        for name in ("images", "suffix", "template"):
            if getattr(body, name):
                refuse(name)
    else:
        for i, message in enumerate(body.messages):
            if message.images:
                refuse(f"messages[{i}].images")
    options = body.options
    if options is not None:
        for name, neutral in _NEUTRAL_OPTIONS.items():
            if getattr(options, name) not in neutral:
                refuse(f"options.{name}")
        if options.model_extra:
            logger.warning("ignoring unknown Ollama options: %s", ", ".join(sorted(options.model_extra)))
    if body.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


def constraint(body: GenerateRequest | ChatRequest):
    """`format`: "json" (any JSON object) or a JSON schema, as a checked StructuredOutputsParams;
    None for free text. 400 naming `format` when it is neither, or the schema is invalid."""
    from pagoda.structured_output.params import StructuredOutputsError, StructuredOutputsParams

    value = body.format
    if value in (None, ""):
        return None
    if value == "json":
        fields = {"json_object": True}
    elif isinstance(value, dict):
        fields = {"json": value}
    else:
        raise APIError(400, f"format={value!r:.120} is invalid: must be \"json\" or a JSON schema object", "format")
    try:
        params = StructuredOutputsParams(**fields)
        from pagoda.structured_output import grammar  # xgrammar: only for constrained requests

        grammar.check(params)
    except StructuredOutputsError as error:
        raise APIError(400, f"format={value!r:.120} is invalid: {error.problem}", "format") from None
    return params


def ollama_messages(messages: list[OllamaMessage]) -> list[dict]:
    """Ollama chat messages as chat-template dicts in OpenAI's form (pagoda/tools/render.py): an
    assistant's tool calls with JSON-string arguments, a tool result named by its function."""
    out = []
    for i, message in enumerate(messages):
        entry: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise APIError(400, f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\", "
                                        "\"arguments\"}}", f"messages[{i}].tool_calls[{j}]")
                arguments = function.get("arguments") or {}
                calls.append({"id": call.get("id") or f"call_{i}_{j}", "type": "function",
                              "function": {"name": function["name"],
                                           "arguments": arguments if isinstance(arguments, str)
                                           else json.dumps(arguments, ensure_ascii=False)}})
            entry["tool_calls"] = calls
        if message.role == "tool" and message.tool_name:
            entry["name"] = message.tool_name
        out.append(entry)
    return out
