"""A small MCP server for the tests, over stdio: `python tests/mcp_server.py [--prefix P]`.

Deterministic tools: ``add(a, b)``, ``get_weather(city)`` (a fixed sentence),
``fail(reason)`` (always raises a ToolError) and ``pixel()`` (an image, no text). Each call
appends one JSON line ``{"tool": ..., "arguments": ...}`` to the file named by
the environment variable ``PAGODA_MCP_TEST_LOG`` (when set), so a test can see
that the tool really ran. ``--prefix P`` names every tool ``P<name>`` (a second
server with other names, or the same names for a clash); ``--only a,b`` offers
only those tools (without the prefix).
"""

from __future__ import annotations

import argparse
import json
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ImageContent

WEATHER = "Sunny, 21 degrees C, light wind from the west"


def _log(tool: str, arguments: dict) -> None:
    path = os.environ.get("PAGODA_MCP_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


def build(prefix: str = "", only: set[str] | None = None) -> MCPServer:
    server = MCPServer("pagoda-test-tools", log_level="WARNING")

    @server.tool(name=f"{prefix}add", description="Add two integers and return their sum.")
    def add(a: int, b: int) -> int:
        _log(f"{prefix}add", {"a": a, "b": b})
        return a + b

    @server.tool(name=f"{prefix}get_weather", description="The current weather in a city.")
    def get_weather(city: str) -> str:
        _log(f"{prefix}get_weather", {"city": city})
        return f"{WEATHER} in {city}."

    @server.tool(name=f"{prefix}fail", description="A tool that always fails (for tests).")
    def fail(reason: str) -> str:
        _log(f"{prefix}fail", {"reason": reason})
        raise ToolError(f"fail was asked to fail: {reason}")

    @server.tool(name=f"{prefix}pixel", description="A 1x1 PNG image.")
    def pixel() -> ImageContent:
        _log(f"{prefix}pixel", {})
        return ImageContent(type="image", data="iVBORw0KGgo=", mime_type="image/png")

    for name in ("add", "get_weather", "fail", "pixel"):
        if only is not None and name not in only:
            server.remove_tool(f"{prefix}{name}")
    return server


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", default="")
    parser.add_argument("--only", default=None, help="comma-separated tool names")
    args = parser.parse_args()
    build(args.prefix, set(args.only.split(",")) if args.only else None).run("stdio")
