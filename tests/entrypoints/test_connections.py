"""What happens on the wire: clients that leave, connections that idle or send half a
request, streams whose engine fails under them. A real uvicorn on loopback (in process)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.entrypoints.tiny_server import MODEL, client_for, live_server, make_engine, wait_until

LONG = {"model": MODEL, "prompt": "Hello", "max_tokens": 500, "ignore_eos": True}


@pytest.fixture
def slow_engine(tiny_chat_llama, monkeypatch):
    """An engine whose steps take 20 ms: a 500-token request would run 10 s."""
    engine = make_engine(tiny_chat_llama)
    execute = engine.engine.executor.execute_model

    def slow(scheduler_output):
        time.sleep(0.02)
        return execute(scheduler_output)

    monkeypatch.setattr(engine.engine.executor, "execute_model", slow)
    yield engine
    engine.shutdown()


def _drained(engine) -> bool:
    return (engine.num_unfinished == 0 and not engine.engine.has_unfinished_requests()
            and engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0)


def _leave_early(url: str, body: dict, stream: bool = False) -> None:
    """Sends the request, gives up after 0.3 s (the connection is closed)."""
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(timeout=httpx.Timeout(5.0, read=0.3)) as client:
            if stream:
                with client.stream("POST", url, json=body) as response:
                    for _ in response.iter_lines():
                        pass
            else:
                client.post(url, json=body)


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500,
                              "ignore_eos": True}),
    ("/v1/completions", {**LONG, "prompt": ["a", "b"], "n": 2, "temperature": 1.0}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 500}}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                   "options": {"num_predict": 500}}),
])
def test_a_non_streaming_request_is_aborted_when_its_client_leaves(slow_engine, route, body):
    with live_server(slow_engine) as url:
        _leave_early(url + route, body)
        # 500 steps of 20 ms would take 10 s; the abort comes within a step or two of the disconnect.
        assert wait_until(lambda: _drained(slow_engine), timeout=8.0)
        assert slow_engine.num_steps < 300
        assert _metric(httpx.get(url + "/metrics").text, "pagoda:request_aborted_total") >= 1


def test_a_stream_still_waiting_for_its_first_output_is_aborted(tiny_chat_llama, monkeypatch):
    engine = make_engine(tiny_chat_llama)
    execute = engine.engine.executor.execute_model

    def very_slow(scheduler_output):
        time.sleep(0.5)
        return execute(scheduler_output)

    monkeypatch.setattr(engine.engine.executor, "execute_model", very_slow)
    try:
        with live_server(engine) as url:
            _leave_early(url + "/v1/completions", {**LONG, "stream": True}, stream=True)
            assert wait_until(lambda: _drained(engine), timeout=8.0)
            assert engine.num_steps < 10
    finally:
        engine.shutdown()


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 10 s bound for a hung test)."""
    sock.settimeout(10)
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


def test_idle_and_half_sent_connections_are_closed(tiny_chat_llama):
    engine = make_engine(tiny_chat_llama)
    try:
        with live_server(engine, request_timeout=0.5) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as idle:
                assert _closed_by_server(idle) == b""
            with socket.create_connection(("127.0.0.1", port)) as half_head:
                half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                assert _closed_by_server(half_head) == b""
            with socket.create_connection(("127.0.0.1", port)) as half_body:
                half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                                  b"Content-Type: application/json\r\n\r\n{\"model\":")
                answer = _closed_by_server(half_body)
                assert answer.startswith(b"HTTP/1.1 408")
                assert b"not received within" in answer
            # A normal client still gets answers.
            assert httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
    finally:
        engine.shutdown()


def _events(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_a_stream_whose_engine_fails_ends_with_an_error_event_and_done(slow_engine, monkeypatch):
    client = client_for(slow_engine)
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]

        def broken(_):
            raise RuntimeError("injected device failure")

        monkeypatch.setattr(slow_engine.engine.executor, "execute_model", broken)
        events = _events(lines)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "injected device failure" in error["message"] and error["type"] == "server_error"


def test_an_ollama_stream_whose_engine_fails_ends_with_an_error_line_and_done(slow_engine, monkeypatch):
    client = client_for(slow_engine)
    body = {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 500}}
    with client.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False

        def broken(_):
            raise RuntimeError("injected device failure")

        monkeypatch.setattr(slow_engine.engine.executor, "execute_model", broken)
        rest = [json.loads(line) for line in lines if line]
    assert "injected device failure" in rest[-2]["error"]
    assert rest[-1]["done"] is True and rest[-1]["done_reason"] == "error"


def test_a_stream_open_at_engine_shutdown_ends_with_an_error_event_and_done(slow_engine):
    client = client_for(slow_engine)
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        slow_engine.shutdown()
        events = _events(lines)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "shut down" in error["message"] and error["type"] == "server_error"
    assert client.get("/health").status_code == 503


def test_one_failing_request_gets_a_500_and_the_others_go_on(tiny_chat_llama, monkeypatch):
    """A request that raises inside the step (here: its detokenizer) fails alone, in the API's shape."""
    from pagoda.engine.detokenizer import IncrementalDetokenizer

    engine = make_engine(tiny_chat_llama)
    add_tokens = IncrementalDetokenizer.add_tokens

    def poisoned(self, token_ids, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.params.seed == 666 and self.calls >= 3:  # after two tokens went out
            raise RuntimeError("poisoned request")
        return add_tokens(self, token_ids, *args, **kwargs)

    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", poisoned)
    try:
        client = client_for(engine)
        bad = client.post("/v1/completions", json={**LONG, "max_tokens": 5, "seed": 666})
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert "poisoned request" in error["message"] and error["type"] == "server_error"
        with client.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 5, "seed": 666,
                                                             "stream": True}) as response:
            assert response.status_code == 200
            events = _events(response.iter_lines())
        assert json.loads(events[0])["choices"][0]["text"]  # the stream had begun
        assert events[-1] == "[DONE]" and "poisoned request" in json.loads(events[-2])["error"]["message"]
        ok = client.post("/v1/completions", json={**LONG, "max_tokens": 5, "seed": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert client.get("/health").status_code == 200
        assert wait_until(lambda: _drained(engine))
        metrics = client.get("/metrics").text
        assert _metric(metrics, "pagoda:request_failure_total") == 2
        assert _metric(metrics, 'pagoda:request_success_total{finished_reason="length"}') == 1
    finally:
        engine.shutdown()


def _metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])
