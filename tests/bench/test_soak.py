"""benchmarks/soak.py's loop for a few seconds against a real `pagoda serve` on the default
model: every kind of client runs, nothing fails, the server drains, memory is sampled.
No timing is asserted."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2
from tests.entrypoints.serve_process import free_port, start_server

pytestmark = requires_smollm2

_PATH = Path(__file__).parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("pagoda_bench_soak", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_soak_loop_against_a_server(soak):
    process, url = start_server(free_port(), "--kv-cache-memory", str(64 * 1024**2), "--max-model-len", "2048",
                                   "--max-num-seqs", "8")
    try:
        # Short outputs; hung-up requests long enough that the client hangs up first.
        run = asyncio.run(soak.soak(url, 3.0, len(soak.KINDS), pid=process.pid, sample_every=1.0, idle=30.0,
                                    output_tokens=(2, 8), disconnect_output_tokens=(48, 64)))
        summary = soak.summarize(run, warmup_seconds=1.0)
    finally:
        process.terminate()
        process.wait(60)

    assert summary["failures"] == 0, summary["failure_examples"]
    assert set(summary["requests"]) == set(soak.KINDS)  # worker i starts with kind i
    for kind in ("chat", "completion", "chat-stream", "completion-stream"):
        assert summary["requests"][kind].get("ok", 0) >= 1
    assert summary["drained"], summary["after_idle"]
    tokens = summary["tokens"]
    assert tokens["clients_completed"] > 0
    # Every completed request's tokens are in the counter; hung-up non-streaming requests may add more.
    assert tokens["metrics_generation_tokens"] >= tokens["clients_completed"]
    memory = summary["memory"]
    assert memory is not None and memory["start_bytes"] > 0 and memory["end_bytes"] > 0
    # The server exports its own resident memory too (process_resident_memory_bytes).
    assert run.samples[-1].metrics.get("process_resident_memory_bytes", 0) > 0


def test_parse_metrics_reads_unlabelled_samples(soak):
    text = ("# HELP pagoda:num_requests_running Requests in the running batch.\n"
            "# TYPE pagoda:num_requests_running gauge\n"
            "pagoda:num_requests_running 3.0\n"
            "pagoda:generation_tokens_total 1234.0\n"
            "pagoda:generation_tokens_created 1.7e+09\n"
            "pagoda:time_to_first_token_seconds_bucket{le=\"0.01\"} 0.0\n")
    assert soak.parse_metrics(text) == {"pagoda:num_requests_running": 3.0, "pagoda:generation_tokens_total": 1234.0}
