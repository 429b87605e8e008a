"""`pagoda chat --mcp`: the MCP client against tests/mcp_server.py, the tool loop with a fake
model and fake tools, and the whole chat as a subprocess with the default model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp import types  # noqa: E402

from pagoda.entrypoints.mcp_client import McpServers, McpStartError, parse_command, result_text  # noqa: E402
from pagoda.entrypoints.tool_loop import ToolLoop, ToolResult  # noqa: E402
from pagoda.tools.choice import hermes_required_tag, required_schema  # noqa: E402
from tests.conftest import requires_smollm2  # noqa: E402

SERVER = Path(__file__).resolve().parents[1] / "mcp_server.py"
REPO = Path(__file__).resolve().parents[2]


def server_command(*args: str) -> str:
    return " ".join([sys.executable, str(SERVER), *args])


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the client, against the test server ---------------------------------------------------------

@pytest.fixture(scope="module")
def call_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mcp") / "calls.jsonl"


@pytest.fixture(scope="module")
def servers(call_log):
    env = {**os.environ, "PAGODA_MCP_TEST_LOG": str(call_log)}
    with McpServers([server_command(), server_command("--prefix", "x_", "--only", "pixel")], env=env) as started:
        yield started


def test_lists_the_tools_of_every_server_with_their_schemas(servers):
    assert [t.name for t in servers.tools] == ["add", "get_weather", "fail", "pixel", "x_pixel"]
    assert servers.server_names == ["pagoda-test-tools", "pagoda-test-tools"]
    add = servers.openai_tools()[0]
    assert add["type"] == "function"
    assert add["function"]["name"] == "add"
    assert add["function"]["description"] == "Add two integers and return their sum."
    parameters = add["function"]["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["a", "b"]
    assert {k: v["type"] for k, v in parameters["properties"].items()} == {"a": "integer", "b": "integer"}
    assert servers.openai_tools()[3]["function"]["parameters"]["type"] == "object"  # no arguments


def test_a_call_runs_the_tool_and_returns_its_text(servers, call_log):
    assert servers.call("add", '{"a": 2, "b": 40}') == ToolResult("42", is_error=False)
    weather = servers.call("get_weather", {"city": "Oslo"})
    assert not weather.is_error
    assert weather.text.startswith("Sunny") and "Oslo" in weather.text
    assert {"tool": "add", "arguments": {"a": 2, "b": 40}} in read_log(call_log)


def test_failures_are_error_results_not_exceptions(servers):
    failed = servers.call("fail", '{"reason": "on purpose"}')
    assert failed.is_error and "on purpose" in failed.text
    assert servers.call("add", '{"a": "two"}').is_error  # the server refuses the arguments
    unknown = servers.call("nope", "{}")
    assert unknown.is_error and "nope" in unknown.text and "add" in unknown.text
    assert servers.call("add", "{not json").is_error
    assert servers.call("add", "[1, 2]").is_error
    assert servers.call("add", '{"a": 1, "b": 1}').text == "2"  # the session is still fine


def test_non_text_content_is_summarized(servers):
    result = servers.call("x_pixel", "")
    assert not result.is_error
    assert result.text.startswith("[image image/png")


def test_the_same_tool_name_on_two_servers_is_refused_at_start():
    with pytest.raises(McpStartError, match="'add'"):
        McpServers([server_command(), server_command("--only", "add")]).start()


def test_a_server_that_does_not_start_is_one_clear_error(tmp_path):
    with pytest.raises(McpStartError, match="did not start"):
        McpServers([str(tmp_path / "no-such-server")]).start()
    with pytest.raises(McpStartError, match="did not start"):
        McpServers([f"{sys.executable} -c pass"]).start()  # exits at once
    with pytest.raises(McpStartError, match="not a valid command line"):
        McpServers(["'unclosed"])
    with pytest.raises(McpStartError, match="needs a command"):
        McpServers(["  "])


def test_tools_pagoda_cannot_render_are_left_out_with_a_notice():
    servers = McpServers(["srv"])
    servers._add_tools("srv", object(), [
        types.Tool(name="ok", input_schema={"type": "object", "properties": {}}),
        types.Tool(name="bad name", input_schema={"type": "object"}),
    ])
    assert [t.name for t in servers.tools] == ["ok"]
    assert len(servers.notices) == 1 and "'bad name'" in servers.notices[0]
    with pytest.raises(McpStartError, match="'srv' and 'other' both offer a tool named 'ok'"):
        servers._add_tools("other", object(), [types.Tool(name="ok", input_schema={"type": "object"})])


def test_parse_command_splits_like_a_shell():
    assert parse_command("uvx 'my server' --flag=1") == ("uvx", ["my server", "--flag=1"])


def test_result_text_kinds():
    structured = types.CallToolResult(content=[], structured_content={"temp": 21})
    assert result_text(structured) == '{"temp": 21}'
    resource = types.CallToolResult(content=[
        types.TextContent(type="text", text="head"),
        types.EmbeddedResource(type="resource", resource=types.TextResourceContents(uri="file:///a.txt", text="body")),
        types.ResourceLink(type="resource_link", name="b", uri="file:///b.bin"),
    ])
    assert result_text(resource) == "head\nbody\n[resource link file:///b.bin]"
    long = types.CallToolResult(content=[types.TextContent(type="text", text="x" * 50)])
    assert result_text(long, limit=10) == "x" * 10 + "\n[... 40 more characters cut]"


# -- the loop, with a fake model and fake tools ----------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": name, "description": name, "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}} for name in ("one", "two")]


class FakeModel:
    """Answers round k with ``replies[k]`` (in small pieces), recording what each round was shown."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.rounds: list[dict] = []

    def __call__(self, messages, tools, constraint):
        self.rounds.append({"messages": [dict(m) for m in messages], "tools": tools, "constraint": constraint})
        text = self.replies[len(self.rounds) - 1]
        for i in range(0, len(text), 3):
            yield text[i:i + 3]


class FakeTools:
    def __init__(self, **answers):
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name, arguments):
        self.calls.append((name, arguments))
        answer = self.answers[name]
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, ToolResult) else ToolResult(answer)


def run(loop_kwargs: dict, model: FakeModel, tools: FakeTools) -> tuple[list[dict], str, str]:
    out, log = io.StringIO(), io.StringIO()
    loop = ToolLoop(TOOLS, tools, out=out, log=log, **loop_kwargs)
    messages = [{"role": "user", "content": "go"}]
    added = loop.run_turn(messages, model)
    assert messages[1:] == added
    return added, out.getvalue(), log.getvalue()


def hermes(name: str, a: int) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"a": {a}}}}}\n</tool_call>'


def test_required_forces_the_first_round_then_the_model_answers():
    model = FakeModel('<tool_call>\n{"name": "one", "arguments": {"a":1}}\n</tool_call>', "One says hi.")
    tools = FakeTools(one="hi")
    added, out, log = run({"tool_choice": "required"}, model, tools)
    assert model.rounds[0]["constraint"] == ("structural_tag", hermes_required_tag(TOOLS, True))
    assert model.rounds[0]["tools"] == TOOLS
    assert model.rounds[1]["constraint"] is None and model.rounds[1]["tools"] == TOOLS
    assert tools.calls == [("one", '{"a":1}')]
    call = added[0]["tool_calls"][0]
    assert added[0]["role"] == "assistant" and call["function"] == {"name": "one", "arguments": '{"a":1}'}
    assert added[1] == {"role": "tool", "tool_call_id": call["id"], "content": "hi"}
    assert added[2] == {"role": "assistant", "content": "One says hi."}
    assert model.rounds[1]["messages"][1:] == added[:2]  # the model saw its call and the result
    assert out == "One says hi.\n"  # the forced calls are not shown as reply text
    assert "[tool] one(" in log and "[tool] one -> hi" in log


def test_other_parsers_force_a_json_array():
    model = FakeModel('[{"name":"one","parameters":{"a":1}}]', "ok")
    added, out, _ = run({"tool_choice": "required", "parser": "llama3_json"}, model, FakeTools(one="x"))
    assert model.rounds[0]["constraint"] == ("json", required_schema(TOOLS, True))
    assert added[0]["tool_calls"][0]["function"] == {"name": "one", "arguments": '{"a":1}'}
    assert out == "ok\n"


def test_parallel_calls_are_answered_in_order_with_their_ids():
    model = FakeModel('[{"name":"two","parameters":{"a":2}},{"name":"one","parameters":{"a":1}}]', "done")
    tools = FakeTools(one="first", two="second")
    added, _, _ = run({"tool_choice": "required", "parser": "llama3_json"}, model, tools)
    ids = [c["id"] for c in added[0]["tool_calls"]]
    assert len(set(ids)) == 2
    assert tools.calls == [("two", '{"a":2}'), ("one", '{"a":1}')]
    assert [(m["tool_call_id"], m["content"]) for m in added[1:3]] == [(ids[0], "second"), (ids[1], "first")]
    assert added[3]["content"] == "done"


def test_no_parallel_calls_forces_one_call():
    model = FakeModel(hermes("one", 1), "ok")
    run({"tool_choice": "required", "parallel": False}, model, FakeTools(one="x"))
    assert model.rounds[0]["constraint"] == ("structural_tag", hermes_required_tag(TOOLS, False))


def test_a_failing_tool_is_fed_back_and_the_turn_goes_on():
    model = FakeModel(hermes("one", 1) + hermes("two", 2), "Sorry.")
    tools = FakeTools(one=ToolResult("quota exceeded", is_error=True), two=RuntimeError("server went away"))
    added, out, log = run({}, model, tools)
    assert added[1]["content"] == "Error: quota exceeded"
    assert added[2]["content"] == "Error: RuntimeError: server went away"
    assert added[3] == {"role": "assistant", "content": "Sorry."}
    assert "[tool] one -> error: quota exceeded" in log
    assert out == "Sorry.\n"


def test_auto_streams_the_text_and_hides_the_calls():
    model = FakeModel("Let me look." + hermes("one", 5), "Five.")
    added, out, _ = run({}, model, FakeTools(one="5"))
    assert model.rounds[0]["constraint"] is None
    assert added[0]["content"] == "Let me look."
    assert out == "Let me look.\nFive.\n"


def test_the_round_limit_ends_with_an_answer_without_tools():
    model = FakeModel(hermes("one", 1), hermes("one", 2), hermes("one", 3))
    tools = FakeTools(one="again")
    added, out, log = run({"max_rounds": 2}, model, tools)
    assert len(tools.calls) == 2
    assert [r["tools"] is None for r in model.rounds] == [False, False, True]
    assert added[-1] == {"role": "assistant", "content": hermes("one", 3)}  # shown as text, not run
    assert "2 rounds of tool calls" in log
    assert out.endswith(hermes("one", 3) + "\n")


def test_zero_rounds_shows_no_tools():
    model = FakeModel("Plain.")
    added, _, _ = run({"max_rounds": 0, "tool_choice": "required"}, model, FakeTools())
    assert model.rounds[0]["tools"] is None and model.rounds[0]["constraint"] is None
    assert added == [{"role": "assistant", "content": "Plain."}]


def test_a_forced_round_that_did_not_finish_falls_back_to_auto():
    model = FakeModel('<tool_call>\n{"name": "one", "argum', "Plain answer.")
    added, _, log = run({"tool_choice": "required"}, model, FakeTools())
    assert model.rounds[1]["constraint"] is None and model.rounds[1]["tools"] == TOOLS
    assert added == [{"role": "assistant", "content": "Plain answer."}]
    assert "did not complete" in log


def test_ctrl_c_during_a_call_ends_the_turn_with_every_call_answered():
    model = FakeModel(hermes("one", 1) + hermes("two", 2), "never asked")
    tools = FakeTools(one=KeyboardInterrupt(), two="unused")
    added, _, _ = run({}, model, tools)
    assert len(model.rounds) == 1 and tools.calls == [("one", '{"a": 1}')]
    ids = [c["id"] for c in added[0]["tool_calls"]]
    assert [m["tool_call_id"] for m in added[1:]] == ids
    assert all(m["content"].startswith("Error:") for m in added[1:])


def test_ctrl_c_during_a_reply_keeps_what_was_said_and_ends_the_turn():
    def interrupted(messages, tools, constraint):
        yield "Half a"
        raise KeyboardInterrupt

    out = io.StringIO()
    messages = [{"role": "user", "content": "go"}]
    added = ToolLoop(TOOLS, FakeTools(), out=out, log=io.StringIO()).run_turn(messages, interrupted)
    assert added == [{"role": "assistant", "content": "Half a"}]
    assert out.getvalue() == "Half a\n"


def test_bad_loop_settings_are_refused():
    with pytest.raises(ValueError, match="tool_choice"):
        ToolLoop(TOOLS, FakeTools(), tool_choice="none")
    with pytest.raises(ValueError, match="max_tool_rounds"):
        ToolLoop(TOOLS, FakeTools(), max_rounds=-1)
    with pytest.raises(ValueError, match="tool_call_parser"):
        ToolLoop(TOOLS, FakeTools(), parser="nope")


# -- the command ----------------------------------------------------------------------------------

def pagoda(*args: str, stdin: str = "", env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "pagoda", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def test_tool_flags_without_mcp_and_bad_servers_are_one_line_errors():
    result = pagoda("chat", "--tool-choice", "required")
    assert result.returncode == 2 and "--tool-choice needs --mcp" in result.stderr
    assert "Traceback" not in result.stderr
    result = pagoda("chat", "--mcp", f"{sys.executable} -c pass")
    assert result.returncode == 2 and "did not start" in result.stderr
    assert "Traceback" not in result.stderr


@requires_smollm2
def test_a_turn_that_outgrows_the_model_is_an_error_line_and_the_chat_goes_on():
    result = pagoda("chat", "--mcp", server_command(), "--max-model-len", "64", "--max-tokens", "8",
                    stdin="Weather in Paris?\nAnd in Rome?\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("more than max_model_len=64") == 2  # both turns tried, neither kept
    assert "Traceback" not in result.stderr


@requires_smollm2
def test_chat_calls_an_mcp_tool_and_answers(tmp_path):
    log = tmp_path / "calls.jsonl"
    result = pagoda("chat", "--mcp", server_command("--only", "add,get_weather"), "--tool-choice", "required",
                    "--temperature", "0", "--max-tokens", "48",
                    stdin="What is the weather in Paris?\n/bye\n", env={"PAGODA_MCP_TEST_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    calls = read_log(log)
    assert calls and {c["tool"] for c in calls} <= {"add", "get_weather"}  # the tool really ran
    shown = [line for line in result.stderr.splitlines() if line.startswith("[tool] ")]
    assert any(line.startswith(f"[tool] {calls[0]['tool']}(") for line in shown)
    assert any(line.startswith(f"[tool] {calls[0]['tool']} -> ") for line in shown)
    assert result.stdout.strip()  # a text reply follows the calls
