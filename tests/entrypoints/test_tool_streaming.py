"""The chat and Responses endpoints' handling of a model that writes tool calls itself
(tool_choice "auto" and the hermes parser), with the engine's outputs scripted: the same
text in every chunking gives the same calls, streamed or not."""

from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import RequestOutputKind
from tests.entrypoints.tiny_server import MODEL, client_for, make_engine

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
TEXT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome, \\"IT\\""}}\n</tool_call>')
CALLS = [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome, \\"IT\\""}')]


@pytest.fixture(scope="module")
def client(tiny_chat_llama):
    engine = make_engine(tiny_chat_llama)
    yield client_for(engine)
    engine.shutdown()


def script(monkeypatch, pieces: list[str], finish_reason: str = "stop"):
    """Makes every request answer with ``pieces``: one DELTA output each, or one FINAL_ONLY output."""
    async def start(self, prompt_ids, params, request_id, options=None):
        parts = ["".join(pieces)] if params.output_kind == RequestOutputKind.FINAL_ONLY else pieces
        outputs = [RequestOutput(request_id, None, prompt_ids, [CompletionOutput(
            0, piece, [7], None, None, finish_reason if k == len(parts) - 1 else None)],
            finished=k == len(parts) - 1) for k, piece in enumerate(parts)]

        async def rest():
            for output in outputs[1:]:
                yield output
        return outputs[0], rest()

    monkeypatch.setattr(OpenAIServingChat, "start", start)


def sse(response) -> list[dict]:
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(e) for e in events if e != "[DONE]"]


@pytest.mark.parametrize("step", [1, 3, 7, len(TEXT)])
def test_chat_auto_tool_calls_streamed_and_not(client, monkeypatch, step):
    script(monkeypatch, [TEXT[i:i + step] for i in range(0, len(TEXT), step)])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] == "Checking."
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["message"]["tool_calls"]]
    assert got == CALLS
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        choice = chunk["choices"][0]
        content += choice["delta"].get("content") or ""
        finishes += [choice["finish_reason"]] if choice["finish_reason"] else []
        for delta in choice["delta"].get("tool_calls") or ():
            call = calls.setdefault(delta["index"], ["", ""])
            call[0] += delta["function"].get("name") or ""
            call[1] += delta["function"]["arguments"]
    assert content.strip() == "Checking." and "<tool_call>" not in content
    assert [tuple(calls[i]) for i in sorted(calls)] == CALLS
    assert finishes == ["tool_calls"]


def test_responses_auto_tool_calls_streamed_and_not(client, monkeypatch):
    script(monkeypatch, [TEXT[i:i + 5] for i in range(0, len(TEXT), 5)])
    tools = [{"type": "function", **TOOLS[0]["function"]}]
    body = {"model": MODEL, "input": "weather?", "tools": tools}
    response = client.post("/v1/responses", json=body).json()
    assert [item["type"] for item in response["output"]] == ["message", "function_call", "function_call"]
    assert [(i["name"], i["arguments"]) for i in response["output"][1:]] == CALLS
    events = sse(client.post("/v1/responses", json={**body, "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == "".join(a for _, a in CALLS)
    assert [(i["name"], i["arguments"]) for i in events[-1]["response"]["output"][1:]] == CALLS


def test_text_without_calls_is_untouched(client, monkeypatch):
    script(monkeypatch, ["Plain ", "<tool", " words"], finish_reason="length")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "stream": True}
    chunks = sse(client.post("/v1/chat/completions", json=body))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Plain <tool words"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_auto_can_be_switched_off(tiny_chat_llama):
    engine = make_engine(tiny_chat_llama)
    try:
        client = client_for(engine, tool_call_parser=None)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 2}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
        assert client.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200
    finally:
        engine.shutdown()


def script_ollama(monkeypatch, pieces: list[str]):
    """The Ollama routes' engine answers with ``pieces`` (DELTA outputs, or one FINAL_ONLY)."""
    from pagoda.entrypoints.ollama import routes

    async def run_request(engine, config, prompt_ids, params, request_id, options=None):
        parts = ["".join(pieces)] if params.output_kind == RequestOutputKind.FINAL_ONLY else pieces
        for k, piece in enumerate(parts):
            last = k == len(parts) - 1
            yield RequestOutput(request_id, None, prompt_ids, [CompletionOutput(
                0, piece, [7], None, None, "stop" if last else None)], finished=last)

    monkeypatch.setattr(routes, "run_request", run_request)


def test_ollama_client_tool_calls(tiny_chat_llama, monkeypatch):
    ollama = pytest.importorskip("ollama")
    from tests.entrypoints.tiny_server import live_server

    script_ollama(monkeypatch, [TEXT[i:i + 4] for i in range(0, len(TEXT), 4)])
    engine = make_engine(tiny_chat_llama)
    try:
        with live_server(engine) as base:
            client = ollama.Client(host=base)
            messages = [{"role": "user", "content": "weather?"}]
            response = client.chat(model=MODEL, messages=messages, tools=TOOLS, stream=False)
            calls = [(c.function.name, dict(c.function.arguments)) for c in response.message.tool_calls]
            assert calls == [(name, json.loads(args)) for name, args in CALLS]
            assert response.message.content == "Checking."
            streamed = list(client.chat(model=MODEL, messages=messages, tools=TOOLS, stream=True))
            content = "".join(chunk.message.content or "" for chunk in streamed)
            got = [(c.function.name, dict(c.function.arguments)) for chunk in streamed
                   for c in chunk.message.tool_calls or ()]
            assert got == calls and content.strip() == "Checking." and streamed[-1].done
            # The calls and their results go back into the conversation (Ollama's message shapes).
            history = messages + [{"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}]
            assert client.chat(model=MODEL, messages=history, tools=TOOLS, stream=False).message is not None
    finally:
        engine.shutdown()
