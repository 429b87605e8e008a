"""`pagoda bench throughput` and `pagoda bench latency` on a tiny checkpoint, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

ENGINE = ["--dtype", "float32", "--kv-cache-memory", str(32 * 1024**2)]


def test_throughput_continuous_static_and_hf(tiny_llama, tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "bench", "throughput", "--model", str(tiny_llama), "--num-prompts", "6",
         "--input-len", "4:40", "--output-len", "2:12", "--static-batch", "4", "--baseline", "hf",
         "--output-json", str(out), *ENGINE],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    systems = [r["system"] for r in data["results"]]
    assert systems == ["pagoda", "pagoda static", "hf static"]
    useful = {r["output_tokens"] for r in data["results"]}
    assert len(useful) == 1  # the same requests everywhere
    pagoda, static, hf = data["results"]
    assert pagoda["computed_output_tokens"] == pagoda["output_tokens"] == static["computed_output_tokens"]
    assert hf["computed_output_tokens"] >= hf["output_tokens"]  # static batches run to their longest output
    assert hf["batch_size"] == 4
    assert "| pagoda static | 4 |" in result.stdout and "| hf static |" in result.stdout


def test_latency_reports_prefill_and_decode(tiny_llama, tmp_path):
    out = tmp_path / "latency.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "bench", "latency", "--model", str(tiny_llama), "--batch-size", "3",
         "--input-len", "16", "--output-len", "5", "--repeats", "2", "--output-json", str(out), *ENGINE],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["repeats"] == 2 and data["batch_size"] == 3
    assert 0 < data["prefill_s"]["min"] <= data["prefill_s"]["max"]
    assert data["decode_step_s"]["p50"] > 0 and data["decode_tokens_per_s"] > 0
    assert "| decode step |" in result.stdout


def test_bad_arguments_are_one_clear_line(tiny_llama):
    result = subprocess.run([sys.executable, "-m", "pagoda", "bench", "latency", "--model", str(tiny_llama),
                             "--batch-size", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "batch_size=0" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "pagoda", "bench", "report", "--db", "/nonexistent/x.db", "abc"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr
