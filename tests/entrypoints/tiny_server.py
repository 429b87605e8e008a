"""In-process servers on the tiny chat model: a TestClient, or a real uvicorn on loopback
(for what a TestClient cannot do: disconnects, slow and idle connections)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi.testclient import TestClient

from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.async_engine import AsyncLLM
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.http_guard import guarded_protocol
from pagoda.entrypoints.openai.api_server import ServerConfig, build_app
from pagoda.metrics import EngineMetrics
from tests.entrypoints.serve_process import free_port

MODEL = "tiny"


def make_engine(folder: Path, **cache) -> AsyncLLM:
    config = EngineConfig(model=str(folder), dtype="float32",
                          cache=CacheConfig(kv_cache_memory=32 * 1024**2, **cache))
    return AsyncLLM(LLMEngine(config, show_progress=False))


def make_app(engine: AsyncLLM, **overrides):
    metrics = EngineMetrics(engine)
    engine.on_finished = metrics.observe_finished
    return build_app(engine, ServerConfig(served_model_name=MODEL, **overrides), metrics)


def client_for(engine: AsyncLLM, **overrides) -> TestClient:
    # raise_server_exceptions=False: a 500 must reach the test as a response, as a client would see it.
    return TestClient(make_app(engine, **overrides), raise_server_exceptions=False)


@contextlib.contextmanager
def live_server(engine: AsyncLLM, request_timeout: float = 30.0, keep_alive: float = 5.0,
                **overrides) -> Iterator[str]:
    """A real uvicorn serving the app on a free loopback port; yields its base URL."""
    app = make_app(engine, request_timeout=request_timeout, **overrides)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=guarded_protocol(request_timeout), timeout_keep_alive=keep_alive))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Polls `condition` until it holds (True) or `timeout` passes (False); never a timed assertion:
    the timeout only bounds a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
