"""The tool loop of `pagoda chat`: the model calls tools, pagoda runs them, the model continues.

One user turn is a series of rounds. Each round renders the conversation
(with the tools shown, or not), lets the model answer, and reads tool calls
out of its text. Calls are run in order, each answered by a ``tool`` message
with its ``tool_call_id``, and the next round starts; a round without calls
is the reply and ends the turn.

- ``tool_choice="required"``: the first round of every user turn is forced by
  a grammar to make one or more calls, as the server does for
  ``tool_choice: "required"`` (`pagoda.tools.choice.plan_tools`: with the
  ``hermes`` parser, ``<tool_call>`` blocks back to back; with the others, a
  JSON array of calls); the rounds after it show the tools and read the text
  with the ``auto`` parser (``hermes`` by default).
- ``tool_choice="auto"``: every round shows the tools and the model decides.
- After ``max_rounds`` rounds that called tools, one last round runs with no
  tools shown, so the model answers in text.

The loop knows neither MCP nor the engine: ``generate`` and ``call_tool`` are
callables (the CLI passes the engine and `pagoda.entrypoints.mcp_client`; the
tests pass fakes). A tool's failure is its result (``is_error``), fed back to
the model like any other; it never ends the chat.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from pagoda.tools.calls import ToolCall
from pagoda.tools.choice import ToolPlan, plan_tools
from pagoda.tools.parsers import ToolCallStream

TOOL_CHOICES = ("auto", "required")
SHORT_RESULT_CHARS = 160


@dataclass
class ToolResult:
    """What a tool answered, as the text the model reads; ``is_error``: the call failed."""

    text: str
    is_error: bool = False


# (messages, tools shown or None, what the whole output must follow or None) -> text deltas; the
# constraint is a structured-outputs (kind, value): ("json", schema) or ("structural_tag", tag).
Generate = Callable[[list[dict], "list[dict] | None", "tuple[str, dict] | None"], Iterable[str]]
# (tool name, arguments as JSON text) -> its result
CallTool = Callable[[str, str], ToolResult]


def short(text: str, limit: int = SHORT_RESULT_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def model_text(result: ToolResult) -> str:
    """The tool message's content: a failure says so, so the model can tell it from an answer."""
    text = result.text or "(no output)"
    if result.is_error and not text.lower().startswith("error"):
        text = f"Error: {text}"
    return text


class ToolLoop:
    """Runs user turns with tools. ``out`` gets the reply text as it streams; ``log`` a line per
    call and per result (dim when it is a terminal)."""

    def __init__(self, tools: list[dict], call_tool: CallTool, *, tool_choice: str = "auto",
                 parser: str = "hermes", max_rounds: int = 5, parallel: bool = True,
                 out: TextIO | None = None, log: TextIO | None = None):
        if tool_choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice={tool_choice!r} is invalid: one of {', '.join(TOOL_CHOICES)}")
        if max_rounds < 0:
            raise ValueError(f"max_tool_rounds={max_rounds} is invalid: 0 or more")
        self.tools = tools
        self.call_tool = call_tool
        self.tool_choice = tool_choice
        self.parser_name = parser
        self.max_rounds = max_rounds
        self.parallel = parallel
        self.out = out if out is not None else sys.stdout
        self.log = log if log is not None else sys.stderr
        # The three kinds of round, planned once (bad tools or an unknown parser fail here, not mid-chat).
        self._plans = {"none": ToolPlan(None, None, None, "none")}
        if tools:
            for choice in ("auto", "required"):
                self._plans[choice] = plan_tools(tools, choice, parallel, parser)

    def _round(self, index: int) -> ToolPlan:
        if not self.tools or index >= self.max_rounds:
            return self._plans["none"]
        return self._plans["required" if index == 0 and self.tool_choice == "required" else "auto"]

    def _note(self, text: str) -> None:
        dim = getattr(self.log, "isatty", lambda: False)()
        self.log.write(f"\033[2m{text}\033[0m\n" if dim else f"{text}\n")
        self.log.flush()

    def _stream(self, plan: ToolPlan, deltas: Iterable[str]) -> tuple[str, bool]:
        """Writes the reply part of the text to ``out`` as it comes; (whole text, interrupted)."""
        stream = ToolCallStream(plan.parser) if plan.parser is not None else None
        text, shown, interrupted = "", False, False
        try:
            for delta in deltas:
                text += delta
                content = stream.feed(delta)[0] if stream is not None else delta
                if content:
                    self.out.write(content)
                    self.out.flush()
                    shown = True
        except KeyboardInterrupt:  # stop this reply, keep the chat
            interrupted = True
        if stream is not None and not interrupted:
            content = stream.feed("", final=True)[0]
            if content:
                self.out.write(content)
                shown = True
        if shown or plan.parser is None or interrupted:
            self.out.write("\n")
            self.out.flush()
        return text, interrupted

    def run_turn(self, messages: list[dict], generate: Generate) -> list[dict]:
        """Answers the conversation ``messages`` (its last message is the user's); appends the
        assistant's messages and the tool results to it, and returns those it appended."""
        start = len(messages)
        index = 0
        while True:
            plan = self._round(index)
            text, interrupted = self._stream(plan, generate(messages, plan.tools, plan.constraint))
            if interrupted:
                messages.append({"role": "assistant", "content": text})
                break
            content, calls = plan.parser.extract(text) if plan.parser is not None else (text, [])
            if not calls:
                if plan.constraint is not None:  # a forced round that did not finish its calls (length)
                    self._note("[tools] the forced tool call did not complete; the model answers freely")
                    index += 1
                    continue
                messages.append({"role": "assistant", "content": text})
                break
            messages.append({"role": "assistant", "content": content,
                             "tool_calls": [call.to_openai() for call in calls]})
            if not self._run_calls(messages, calls):
                break
            index += 1
            if index == self.max_rounds and self.tools:
                self._note(f"[tools] {self.max_rounds} rounds of tool calls: the model answers without tools")
        return messages[start:]

    def _run_calls(self, messages: list[dict], calls: list[ToolCall]) -> bool:
        """Runs ``calls`` in order, appending one tool message per call; False if interrupted
        (the calls not run are answered as interrupted, so every call has its result)."""
        interrupted = False
        for call in calls:
            if interrupted:
                result = ToolResult("Error: not run (interrupted by the user)", is_error=True)
            else:
                self._note(f"[tool] {call.name}({short(call.arguments, 200)})")
                try:
                    result = self.call_tool(call.name, call.arguments)
                except KeyboardInterrupt:
                    interrupted = True
                    result = ToolResult("Error: interrupted by the user", is_error=True)
                except Exception as error:  # a broken tool never ends the chat
                    result = ToolResult(f"Error: {type(error).__name__}: {error}", is_error=True)
                self._note(f"[tool] {call.name} -> {'error: ' if result.is_error else ''}{short(result.text)}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": model_text(result)})
        return not interrupted
