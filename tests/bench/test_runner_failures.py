"""The load runner against a small real HTTP server that misbehaves on purpose:
every failure is counted with its reason and the run always finishes."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from itertools import islice

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from pagoda.bench.datasets import BenchRequest
from pagoda.bench.runner import LoadShape, arrival_gaps, run_load


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}) + "\n\n"


def _app() -> FastAPI:
    app = FastAPI()
    state = {"in_flight": 0, "peak": 0}
    app.state.counters = state

    @app.post("/ok/v1/completions")
    async def ok():
        async def events():
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
            try:
                for word in ("a", "b", "c"):
                    await asyncio.sleep(0.01)
                    yield _chunk(word)
                yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3,
                                                                      "total_tokens": 7}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/nousage/v1/completions")
    async def no_usage():
        async def events():
            yield _chunk("hello")
            yield _chunk(" world")
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/error/v1/completions")
    async def error():
        return JSONResponse({"error": {"message": "model is on fire", "type": "server_error"}}, status_code=500)

    @app.post("/malformed/v1/completions")
    async def malformed():
        async def events():
            yield _chunk("a")
            yield "data: {this is not json\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/truncated/v1/completions")
    async def truncated():
        async def events():
            yield _chunk("a")
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/slow/v1/completions")
    async def slow():
        await asyncio.sleep(5)
        return JSONResponse({})

    return app


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = _app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app.state.counters
    server.should_exit = True
    thread.join(5)


REQUESTS = [BenchRequest(f"prompt {i}", 4, 3) for i in range(6)]


def _run(url: str, shape: LoadShape, timeout: float = 600.0, tokenizer=None):
    return asyncio.run(run_load(url, "completions", "m", REQUESTS, shape, tokenizer=tokenizer, timeout_s=timeout))


def test_good_stream_is_timed_and_concurrency_is_capped(fake_server):
    base, counters = fake_server
    records, wall = _run(f"{base}/ok/v1/completions", LoadShape(concurrency=2))
    assert len(records) == 6 and all(r.success for r in records)
    assert [r.index for r in records] == list(range(6))
    for r in records:
        assert r.output_tokens == 3 and r.prompt_tokens == 4
        assert 0 < r.ttft_s < r.latency_s <= wall
        assert len(r.itl_s) == 2  # three content chunks -> two gaps
    assert counters["peak"] == 2


def test_missing_usage_is_recounted_with_the_tokenizer(fake_server):
    class WordTokenizer:
        def encode(self, text, add_special_tokens=False):
            return text.split()

    records, _ = _run(f"{fake_server[0]}/nousage/v1/completions", LoadShape(concurrency=1, num_prompts=2),
                      tokenizer=WordTokenizer())
    assert [r.output_tokens for r in records] == [2, 2]


@pytest.mark.parametrize(("route", "reason"), [
    ("error", "HTTP 500: model is on fire"),
    ("malformed", "malformed stream: data is not JSON"),
    ("truncated", "malformed stream: stream ended without data: [DONE]"),
])
def test_server_failures_are_counted_with_their_reason(fake_server, route, reason):
    records, _ = _run(f"{fake_server[0]}/{route}/v1/completions", LoadShape(concurrency=3))
    assert len(records) == 6
    assert all(not r.success and r.error.startswith(reason) for r in records)


def test_timeouts_and_refused_connections_are_failures_not_crashes(fake_server):
    records, _ = _run(f"{fake_server[0]}/slow/v1/completions", LoadShape(concurrency=6), timeout=0.3)
    assert all(not r.success and r.error.startswith("timeout") for r in records)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    records, _ = _run(f"http://127.0.0.1:{closed_port}/v1/completions", LoadShape(concurrency=2))
    assert len(records) == 6 and all(not r.success and "ConnectError" in r.error for r in records)


def test_request_rate_paces_arrivals(fake_server):
    records, wall = _run(f"{fake_server[0]}/ok/v1/completions", LoadShape(request_rate=20.0, num_prompts=6, seed=1))
    starts = [r.start_s for r in records]
    assert starts == sorted(starts) and starts[-1] > 0.05  # not all at once
    gaps = list(islice(arrival_gaps(LoadShape(request_rate=20.0, seed=1)), 6))
    # Paced: no request starts before its scheduled arrival (a loaded machine may only make it late).
    assert sum(gaps) - 0.02 <= starts[-1] < sum(gaps) + 5.0


def test_gamma_gaps_have_the_asked_mean_and_burstiness():
    for burstiness in (0.5, 1.0, 4.0):
        gaps = list(islice(arrival_gaps(LoadShape(request_rate=10.0, burstiness=burstiness, seed=0)), 20000))
        mean = sum(gaps) / len(gaps)
        variance = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        assert mean == pytest.approx(0.1, rel=0.05)
        # gamma(k, theta): coefficient of variation^2 = 1/k
        assert variance / mean**2 == pytest.approx(1 / burstiness, rel=0.1)
    assert list(islice(arrival_gaps(LoadShape()), 3)) == [0.0, 0.0, 0.0]


def test_duration_stops_sending(fake_server):
    records, wall = _run(f"{fake_server[0]}/ok/v1/completions", LoadShape(concurrency=1, duration_s=0.4))
    assert 1 <= len(records) < 100 and all(r.success for r in records)
    assert all(r.start_s < 0.4 for r in records)


@pytest.mark.parametrize(("field", "kwargs"), [("concurrency", {"concurrency": 0}),
                                               ("request_rate", {"request_rate": 0.0}),
                                               ("burstiness", {"burstiness": -1.0}),
                                               ("duration", {"duration_s": 0.0})])
def test_bad_load_shapes_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LoadShape(**kwargs)
    assert math.isinf(LoadShape().request_rate)
