"""Tool-call parsers: where a model's text holds content and where it holds calls.

One parser per family of models (``--tool-call-parser``), as in vLLM:

| name | the model writes |
|---|---|
| ``hermes`` | ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2/2.5/3, SmolLM; pagoda's fallback tool prompt asks for it) |
| ``llama3_json`` | ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``; several joined by ``;``) |
| ``mistral`` | ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` |

Two more are used by the server itself when a grammar forces the shape
(`pagoda.tools.choice`): ``json_array`` (``tool_choice: "required"``: a JSON
array of calls) and `NamedToolParser` (a named ``tool_choice``: the whole
text is the arguments).

Every parser answers `split(text, final)`: the content that is surely
content (text that may be the start of a call marker is held back until more
arrives, unless ``final``) and the calls scanned so far. `extract` is the
non-streamed answer; `ToolCallStream` turns successive texts into OpenAI's
incremental ``delta.tool_calls``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.tools.calls import CallScan, ToolCall, value_end, new_call_id, scan_call


@dataclass
class Split:
    content: str
    calls: list[CallScan] = field(default_factory=list)
    in_calls: bool = False  # the text has entered its calls part (what follows is not content)


def held_back(text: str, marker: str) -> int:
    """Characters at the end of ``text`` that may be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def scan_array(text: str, i: int) -> list[CallScan] | None:
    """Calls of the JSON array starting at text[i] ('['); None if it is not an array of objects."""
    i = _skip_ws(text, i)
    if i >= len(text):
        return []
    if text[i] != "[":
        return None
    calls: list[CallScan] = []
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] == "]":
            return calls
        if text[i] == ",":
            i += 1
            continue
        if text[i] != "{":
            return None
        scan = scan_call(text, i)
        calls.append(scan)
        if not scan.complete or not scan.valid:
            return calls
        i = scan.end


class ToolParser:
    name = ""

    def split(self, text: str, final: bool) -> Split:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, calls) of a finished text. Calls that do not parse leave the text as content."""
        split = self.split(text, final=True)
        calls = [ToolCall(c.name, c.arguments if isinstance(c.arguments, str) and c.arguments else "{}")
                 for c in split.calls if c.valid and c.complete and c.name]
        if not calls or len(calls) != len(split.calls):
            return (text or None), []
        content = split.content.strip()
        return (content or None), calls


class HermesToolParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> Split:
        start = text.find(self.START)
        if start < 0:
            keep = len(text) if final else len(text) - held_back(text, self.START)
            return Split(text[:keep])
        out = Split(text[:start], in_calls=True)
        pos = start
        while True:
            body = _skip_ws(text, pos + len(self.START))
            if text.startswith("[", body):  # a JSON array of calls in one block (SmolLM2 writes this)
                array = scan_array(text, body)
                out.calls.extend(array if array is not None else [CallScan(valid=False)])
                if not array or not all(c.complete and c.valid for c in array):
                    return out
                end = value_end(text, body)
                if end is None:
                    return out
            else:
                scan = scan_call(text, body)
                out.calls.append(scan)
                if not (scan.complete and scan.valid):
                    return out
                end = scan.end
            close = text.find(self.END, end)
            if close < 0:
                return out
            pos = _skip_ws(text, close + len(self.END))
            if not text.startswith(self.START, pos):
                return out


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def split(self, text: str, final: bool) -> Split:
        i = _skip_ws(text, 0)
        if text.startswith(self.TAG, i):
            i = _skip_ws(text, i + len(self.TAG))
        elif not final and self.TAG.startswith(text[i:]):
            return Split("", in_calls=False)  # may be the tag, or nothing yet
        if i >= len(text):
            return Split("" if not final else text)
        if text[i] != "{":
            return Split(text)
        out = Split("", in_calls=True)
        while True:
            scan = scan_call(text, i)
            out.calls.append(scan)
            if not (scan.complete and scan.valid):
                return out
            i = _skip_ws(text, scan.end)
            if i < len(text) and text[i] == ";":
                i = _skip_ws(text, i + 1)
            if i >= len(text) or text[i] != "{":
                return out


class MistralToolParser(ToolParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"

    def split(self, text: str, final: bool) -> Split:
        start = text.find(self.MARKER)
        if start < 0:
            keep = len(text) if final else len(text) - held_back(text, self.MARKER)
            return Split(text[:keep])
        calls = scan_array(text, start + len(self.MARKER))
        return Split(text[:start], calls if calls is not None else [CallScan(valid=False)], in_calls=True)


class JsonArrayToolParser(ToolParser):
    """The whole text is a JSON array of calls (what ``tool_choice: "required"`` forces)."""

    name = "json_array"

    def split(self, text: str, final: bool) -> Split:
        calls = scan_array(text, 0)
        return Split("", calls if calls is not None else [CallScan(valid=False)], in_calls=True)


class NamedToolParser(ToolParser):
    """The whole text is the arguments of one named function (a named ``tool_choice``)."""

    name = "named"

    def __init__(self, function_name: str):
        self.function_name = function_name

    def split(self, text: str, final: bool) -> Split:
        return Split("", [CallScan(name=self.function_name, arguments=text, complete=final)], in_calls=True)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser={name!r} is not one of {', '.join(sorted(TOOL_PARSERS))}") from None


@dataclass
class _Sent:
    id: str
    name_sent: bool = False
    arguments_sent: int = 0


class ToolCallStream:
    """Turns the growing text of one choice into content deltas and OpenAI ``delta.tool_calls``.

    Each call goes out as one delta with its id, type and name (arguments ""),
    then argument fragments; the fragments join to the final arguments text.
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.sent: list[_Sent] = []

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for the text ``delta`` that just arrived."""
        self.text += delta
        split = self.parser.split(self.text, final)
        if final and not self.sent and split.in_calls and not any(c.valid and c.complete for c in split.calls):
            # Calls that never parsed are content after all (as the non-streamed answer says).
            split = Split(self.text)
        content = split.content[self.content_sent:] if len(split.content) > self.content_sent else ""
        self.content_sent += len(content)
        deltas = []
        for index, scan in enumerate(split.calls):
            if not scan.valid or scan.name is None:
                break
            if index == len(self.sent):
                self.sent.append(_Sent(new_call_id()))
            sent = self.sent[index]
            if not sent.name_sent:
                sent.name_sent = True
                deltas.append({"index": index, "id": sent.id, "type": "function",
                               "function": {"name": scan.name, "arguments": ""}})
            arguments = scan.arguments if isinstance(scan.arguments, str) else ""
            if scan.complete and not arguments:
                arguments = "{}"
            if not scan.streamable and not scan.complete:
                continue
            if len(arguments) > sent.arguments_sent:
                deltas.append({"index": index, "function": {"arguments": arguments[sent.arguments_sent:]}})
                sent.arguments_sent = len(arguments)
        return content, deltas

    def call_ids(self) -> list[str]:
        return [s.id for s in self.sent]
