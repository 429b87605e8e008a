"""Tool calls found in a model's text, and the partial-JSON scanner that finds them.

A call is ``{"name": <string>, "arguments" | "parameters": <JSON value>}``.
`scan_call` reads one such object from text that may still be arriving and
reports what is known so far: the name once its string is complete, and the
raw text of the arguments value as far as it has come. The raw text only
grows as text arrives, so a stream can send it in fragments and the
fragments always join to the final arguments (the non-streamed answer uses
the same raw text).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One complete call: ``arguments`` is JSON text (OpenAI's wire form)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def arguments_dict(self) -> dict:
        """The arguments parsed (Ollama's wire form and chat templates want an object)."""
        try:
            value = json.loads(self.arguments)
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {"value": value}


@dataclass
class CallScan:
    """What is known of one call object so far."""

    name: str | None = None
    arguments: str = ""  # raw text of the arguments value so far (object or array values stream)
    streamable: bool = True  # False for a string-valued arguments (sent whole at the end)
    complete: bool = False
    end: int = 0  # index just past the object's closing brace, when complete
    valid: bool = True  # False once the text cannot be a call object


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """Index just past the JSON string starting at text[i] == '"', or None if it is not closed yet."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None if it is not complete yet.

    Scalars end at the next delimiter (complete only once a delimiter follows).
    """
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def scan_call(text: str, start: int = 0) -> CallScan:
    """Reads the call object starting at ``text[start]`` (which must be '{')."""
    scan = CallScan()
    i = _skip_ws(text, start)
    if i >= len(text):
        return scan
    if text[i] != "{":
        scan.valid = False
        return scan
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.complete, scan.end = True, i + 1
            return scan
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            scan.valid = False
            return scan
        key_end = _string_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = _skip_ws(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            scan.valid = False
            return scan
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return scan
        end = value_end(text, i)
        if key in ARGUMENT_KEYS:
            if text[i] == '"':
                scan.streamable = False
                if end is not None:
                    scan.arguments = json.loads(text[i:end])
            elif text[i] in "{[":
                scan.arguments = text[i:end] if end is not None else text[i:]
            elif end is not None:
                scan.arguments = text[i:end]
        elif key == "name" and end is not None and text[i] == '"':
            scan.name = json.loads(text[i:end])
        if end is None:
            return scan
        i = end


def parse_call(text: str) -> ToolCall | None:
    """A complete call object (and nothing after it but blanks), or None."""
    scan = scan_call(text)
    if not (scan.valid and scan.complete and scan.name) or text[scan.end:].strip():
        return None
    return ToolCall(scan.name, scan.arguments or "{}")
