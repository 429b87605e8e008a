"""Server behaviour under engine failure and overload, in process (tiny model, token-id prompts)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.async_engine import AsyncLLM
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.openai.api_server import ServerConfig, build_app


@pytest.fixture
def engine(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), dtype="float32", cache=CacheConfig(kv_cache_memory=32 * 1024**2))
    async_engine = AsyncLLM(LLMEngine(config, show_progress=False))
    yield async_engine
    async_engine.shutdown()


def _app(engine, **overrides):
    return TestClient(build_app(engine, ServerConfig(served_model_name="tiny", **overrides)))


def test_completion_with_token_ids(engine):
    client = _app(engine)
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4,
                                                    "ignore_eos": True, "temperature": 0})
    assert response.status_code == 200
    assert response.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                        "prompt_tokens_details": {"cached_tokens": 0}}


def test_health_turns_503_when_the_engine_loop_dies(engine, monkeypatch):
    # A failed request is a server error, not an exception in the test client.
    client = TestClient(build_app(engine, ServerConfig(served_model_name="tiny")), raise_server_exceptions=False)
    assert client.get("/health").status_code == 200

    def broken(_):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(engine.engine.executor, "execute_model", broken)
    # A permanently broken device: each request fails alone (the engine cannot tell a broken
    # request from a broken device) until max_consecutive_failed_steps steps in a row have
    # failed; then the engine loop ends and the request in flight gets a 503.
    limit = engine.engine.max_consecutive_failed_steps
    statuses = []
    for _ in range(limit + 1):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4})
        statuses.append(response.status_code)
        if response.status_code == 503:
            break
    assert statuses[-1] == 503 and len(statuses) == limit
    assert all(code >= 500 for code in statuses)
    assert "engine loop died" in response.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while engine.is_healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/health").status_code == 503
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2}).status_code == 503


def test_backpressure_answers_503_with_retry_after(engine):
    client = _app(engine, max_queued_requests=0)
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "max_queued_requests=0" in response.json()["error"]["message"]


def test_api_key_is_required_when_set(engine):
    client = _app(engine, api_key="sesame")
    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # health stays open for probes


def test_truncate_prompt_tokens_keeps_the_tail(engine):
    client = _app(engine)
    max_len = engine.engine.max_model_len
    too_long = {"model": "tiny", "prompt": [3 + i % 500 for i in range(max_len + 10)], "max_tokens": 2, "ignore_eos": True}
    refused = client.post("/v1/completions", json=too_long)
    assert refused.status_code == 400 and str(max_len) in refused.json()["error"]["message"]
    kept = client.post("/v1/completions", json={**too_long, "truncate_prompt_tokens": 100})
    assert kept.status_code == 200 and kept.json()["usage"]["prompt_tokens"] == 100
    bad = client.post("/v1/completions", json={**too_long, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"
