"""MCP servers for `pagoda chat --mcp`: start them over stdio, list their tools, call them.

`McpServers` runs every connection in one asyncio loop on a daemon thread
(the chat itself is synchronous: it steps the engine), so the sessions live
in one task, entered and left in order with an `AsyncExitStack`, as the SDK
(`mcp`, the official Python SDK) requires; calls are sent to that loop and
waited for.

- Each ``--mcp`` value is a command line (split like a shell, no shell
  features), started with pagoda's own environment.
- The servers' tools become OpenAI function tools: name, description,
  ``inputSchema`` as ``parameters``. Two servers offering the same tool name
  is refused at start, naming both (pagoda does not rename tools: the model
  and the log see the server's own names). A name pagoda's tool rendering
  does not accept (1-64 of ``A-Za-z0-9_.-``) is left out, with a notice.
- A call's result is its text content joined by newlines; images, audio and
  resources are summarized in brackets; a result with only structured content
  is that content as JSON. A failing call (``isError``, an exception, a
  timeout, unknown tool, arguments that are not a JSON object) is a
  `ToolResult` with ``is_error``: the chat feeds it to the model and goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TextIO

from pagoda.entrypoints.tool_loop import ToolResult
from pagoda.tools.choice import ToolRequestError, validate_tools

CONNECT_TIMEOUT_S = 60.0  # start, initialize and list tools, per server
CALL_TIMEOUT_S = 300.0  # one tool call
MAX_RESULT_CHARS = 16_000  # a result longer than this reaches the model cut, with a note


class McpStartError(ValueError):
    """An MCP server could not be started or used (the CLI prints it as one line)."""


@dataclass
class McpTool:
    name: str
    description: str
    input_schema: dict
    server: str  # the command that started its server

    def to_openai(self) -> dict:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


def parse_command(command: str) -> tuple[str, list[str]]:
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise McpStartError(f"--mcp {command!r} is not a valid command line ({error})") from None
    if not words:
        raise McpStartError("--mcp needs a command that starts an MCP server over stdio")
    return words[0], words[1:]


def _size_of_base64(data: str) -> int:
    return len(data) * 3 // 4


def result_text(result: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """A `CallToolResult` as the text the model reads."""
    parts = []
    for block in result.content or ():
        kind = getattr(block, "type", "?")
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.mime_type}, {_size_of_base64(block.data)} bytes]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}" + (f": {block.description}]" if block.description else "]"))
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None
                         else f"[resource {resource.uri} ({resource.mime_type or 'binary'})]")
        else:
            parts.append(f"[{kind} content]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if len(text) > limit:
        text = text[:limit] + f"\n[... {len(text) - limit} more characters cut]"
    return text


def _errlog(stream: TextIO | None) -> TextIO:
    """Where the servers' stderr goes: a real file (a subprocess needs a descriptor)."""
    stream = stream if stream is not None else sys.stderr
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def _reason(error: BaseException) -> str:
    """One line for an error, looking inside exception groups (the SDK's task groups raise them)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = str(error) or type(error).__name__
    if isinstance(error, TimeoutError) or "timed out" in text.lower():
        return f"no answer in time ({text})"
    return text if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {text}"


class McpServers:
    """Connections to the MCP servers started by ``commands``; use as a context manager."""

    def __init__(self, commands: list[str], *, errlog: TextIO | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, call_timeout: float = CALL_TIMEOUT_S,
                 env: dict[str, str] | None = None):
        self.commands = list(commands)
        self.parsed = [parse_command(c) for c in self.commands]
        self.errlog = _errlog(errlog)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.env = dict(os.environ if env is None else env)
        self.tools: list[McpTool] = []
        self.notices: list[str] = []  # tools left out, and why
        self.server_names: list[str] = []
        self._sessions: dict[str, Any] = {}  # tool name -> its ClientSession
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Event | None = None
        self._serving: Future | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> McpServers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Starts every server, initializes it and lists its tools; raises `McpStartError`."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pagoda-mcp", daemon=True)
        self._thread.start()
        ready: Future = Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(ready), self._loop)
        try:
            ready.result()
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        """Ends the sessions and stops the servers (waits a few seconds at most)."""
        if self._loop is None:
            return
        if self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
        if self._serving is not None:
            try:
                self._serving.result(timeout=10)
            except BaseException:  # noqa: BLE001 - closing: nothing left to report to
                pass
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not loop.is_running():
            loop.close()

    async def _serve(self, ready: Future) -> None:
        from mcp import ClientSession, StdioServerParameters, stdio_client

        self._closing = asyncio.Event()
        failure: BaseException | None = None
        async with AsyncExitStack() as stack:
            try:
                for command, (program, args) in zip(self.commands, self.parsed):
                    params = StdioServerParameters(command=program, args=args, env=self.env)
                    try:
                        read, write = await stack.enter_async_context(stdio_client(params, errlog=self.errlog))
                        session = await stack.enter_async_context(
                            ClientSession(read, write, read_timeout_seconds=self.connect_timeout))
                        init = await session.initialize()
                        listed = await self._list_tools(session)
                    except Exception as error:
                        raise McpStartError(f"MCP server {command!r} did not start: {_reason(error)}") from None
                    self.server_names.append(init.server_info.name if init.server_info else command)
                    self._add_tools(command, session, listed)
            except BaseException as error:  # leave the stack first: the servers started so far stop
                failure = error
            else:
                ready.set_result(None)
                await self._closing.wait()
        if failure is not None:
            ready.set_exception(failure if isinstance(failure, McpStartError)
                                else McpStartError(f"MCP servers did not start: {_reason(failure)}"))

    @staticmethod
    async def _list_tools(session) -> list:
        from mcp.types import PaginatedRequestParams

        tools, cursor = [], None
        while True:
            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools

    def _add_tools(self, command: str, session, listed: list) -> None:
        for listed_tool in listed:
            schema = listed_tool.input_schema if isinstance(listed_tool.input_schema, dict) else {}
            tool = McpTool(listed_tool.name, listed_tool.description or "",
                           schema or {"type": "object", "properties": {}}, command)
            try:  # what pagoda's tool rendering takes (names of 1-64 of A-Za-z0-9_.-, object schemas)
                validate_tools([tool.to_openai()])
            except ToolRequestError as error:
                self.notices.append(f"tool {tool.name!r} of {command!r} left out: {error}")
                continue
            if tool.name in self._sessions:
                other = next(t.server for t in self.tools if t.name == tool.name)
                raise McpStartError(f"MCP servers {other!r} and {command!r} both offer a tool named "
                                    f"{tool.name!r}; pagoda chat needs tool names to be unique")
            self.tools.append(tool)
            self._sessions[tool.name] = session

    # -- use ---------------------------------------------------------------------------------------

    def openai_tools(self) -> list[dict]:
        return [tool.to_openai() for tool in self.tools]

    def call(self, name: str, arguments: str | dict) -> ToolResult:
        """Calls tool ``name`` with ``arguments`` (JSON text or a dict); failures are results."""
        session = self._sessions.get(name)
        if session is None:
            known = ", ".join(t.name for t in self.tools) or "none"
            return ToolResult(f"Error: there is no tool named {name!r} (the tools: {known})", is_error=True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                return ToolResult(f"Error: the arguments of {name} are not valid JSON ({error})", is_error=True)
        if not isinstance(arguments, dict):
            return ToolResult(f"Error: the arguments of {name} must be a JSON object", is_error=True)
        if self._loop is None:
            return ToolResult("Error: the MCP servers are closed", is_error=True)
        future = asyncio.run_coroutine_threadsafe(
            session.call_tool(name, arguments, read_timeout_seconds=self.call_timeout), self._loop)
        try:
            result = future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise
        except Exception as error:  # the server broke the call: the model reads why
            return ToolResult(f"Error: calling {name} failed: {_reason(error)}", is_error=True)
        return ToolResult(result_text(result), is_error=bool(result.is_error))
