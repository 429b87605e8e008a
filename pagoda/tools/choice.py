"""What a request's ``tools`` and ``tool_choice`` ask for: validated once, at the edge.

- ``none``: no tools are shown to the model; it answers in text.
- ``auto`` (the default when tools are given): tools are shown; the model's text
  is read by the server's tool-call parser (``--tool-call-parser``).
- ``required``: a grammar forces one or more calls (one when
  ``parallel_tool_calls`` is false) whose names are the tools' and whose
  arguments follow the function's schema, so every call parses and
  validates. With the ``hermes`` parser (the default) the calls take the
  form the tool prompt teaches, ``<tool_call>{"name": ..., "arguments":
  ...}</tool_call>`` blocks back to back (an xgrammar structural tag): a
  small model then ends after its calls far more often than in a JSON
  array, where greedy decoding tends to repeat calls until the token limit.
  With other parsers: a JSON array of ``{"name", "parameters"}`` objects, as
  vLLM does.
- a named function: a grammar forces the function's arguments object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pagoda.tools.parsers import (
    HermesToolParser,
    JsonArrayToolParser,
    NamedToolParser,
    ToolParser,
    get_tool_parser,
)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolRequestError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class ToolPlan:
    """How one request uses tools."""

    tools: list[dict] | None  # OpenAI function tools shown to the model (None: none shown)
    parser: ToolParser | None  # reads calls out of the text (None: the text is all content)
    # What the whole output must follow (required / named), as a structured-outputs kind and
    # value: ("json", schema) or ("structural_tag", tag); None: free text.
    constraint: tuple[str, dict] | None
    mode: str  # "none" | "auto" | "required" | "named"

    @property
    def finish_reason_for_calls(self) -> str:
        # OpenAI answers a forced named function with "stop", any other call with "tool_calls".
        return "stop" if self.mode == "named" else "tool_calls"


def validate_tools(tools: list) -> list[dict]:
    """OpenAI function tools, checked and normalized (parameters default to an empty object)."""
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ToolRequestError(where, f"{where} must be an object")
        if tool.get("type") != "function":
            raise ToolRequestError(f"{where}.type", f"{where}.type={tool.get('type')!r} is not supported: "
                                                    "only \"function\" tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolRequestError(f"{where}.function", f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolRequestError(f"{where}.function.name", f"{where}.function.name={name!r} is invalid: "
                                   "1-64 letters, digits, '_', '-' or '.'")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if parameters is None:
            parameters = EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise ToolRequestError(f"{where}.function.parameters",
                                   f"{where}.function.parameters must be a JSON schema object")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolRequestError(f"{where}.function.description", f"{where}.function.description must be a string")
        out.append({"type": "function", "function": {**function, "parameters": parameters}})
    names = [t["function"]["name"] for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ToolRequestError("tools", f"tools has two functions named {duplicates[0]!r}")
    return out


def required_schema(tools: list[dict], parallel: bool) -> dict:
    options = [{"type": "object",
                "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": t["function"]["parameters"]},
                "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": options[0] if len(options) == 1 else {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def hermes_required_tag(tools: list[dict], parallel: bool) -> dict:
    """xgrammar structural tag: ``<tool_call>`` blocks (HermesToolParser's form), one per call, back to back."""
    tags = [{"type": "tag", "begin": '<tool_call>\n{"name": ' + json.dumps(t["function"]["name"]) + ', "arguments": ',
             "content": {"type": "json_schema", "json_schema": t["function"]["parameters"]},
             "end": "}\n</tool_call>"} for t in tools]
    return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "",
                                                 "at_least_one": True, "stop_after_first": not parallel}}


def plan_tools(tools: list | None, tool_choice, parallel_tool_calls: bool | None,
               auto_parser: str | None) -> ToolPlan:
    """The request's ToolPlan. ``auto_parser``: the server's parser for ``auto`` (None: auto is off)."""
    tools = validate_tools(tools) if tools else []
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice == "none":
            return ToolPlan(None, None, None, "none")
        if tool_choice not in ("auto", "required"):
            raise ToolRequestError("tool_choice", f"tool_choice={tool_choice!r} is invalid: \"none\", \"auto\", "
                                   "\"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        if not tools:
            raise ToolRequestError("tool_choice", f"tool_choice={tool_choice!r} needs tools")
        if tool_choice == "required":
            if (auto_parser or "hermes") == "hermes":
                return ToolPlan(tools, HermesToolParser(), ("structural_tag", hermes_required_tag(tools, parallel)),
                                "required")
            return ToolPlan(tools, JsonArrayToolParser(), ("json", required_schema(tools, parallel)), "required")
        if auto_parser is None:
            raise ToolRequestError("tool_choice", "tool_choice=\"auto\" is off on this server (started with "
                                   "--disable-auto-tool-choice): use \"required\", a named function or \"none\"")
        return ToolPlan(tools, get_tool_parser(auto_parser), None, "auto")
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" \
            or not isinstance(tool_choice.get("function"), dict):
        raise ToolRequestError("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    name = tool_choice["function"].get("name")
    by_name = {t["function"]["name"]: t for t in tools}
    if name not in by_name:
        raise ToolRequestError("tool_choice.function.name", f"tool_choice.function.name={name!r} is not one of "
                               f"the tools ({', '.join(sorted(by_name)) or 'none given'})")
    return ToolPlan([by_name[name]], NamedToolParser(name), ("json", by_name[name]["function"]["parameters"]),
                    "named")
