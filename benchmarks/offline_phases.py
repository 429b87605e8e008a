#!/usr/bin/env python
"""Where the offline mix's time goes: steps that carry prompt tokens vs decode-only steps.

Runs cpu_peers.py's offline workload (64 requests, prompts 16-256 random token ids,
outputs 16-128, greedy, EOS ignored; the same draw) through one `LLM.generate` and
times every `execute_model` call of the engine's executor, split into
- prompt steps: the step computes at least one prompt token (prefill chunks, with
  whatever decodes share the step), and
- decode-only steps, bucketed by batch size (tokens in the step).
Time outside the executor (scheduling, detokenizing, outputs) is the rest of the wall time.
For the ops inside a step, run torch.profiler over a generate of your own (docs/benchmarks.md).

Prints tables and writes benchmarks/results/offline_phases.json.

    .venv/bin/python benchmarks/offline_phases.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import cpu_peers  # noqa: E402  (the workload and machine helpers)
from pagoda import LLM, SamplingParams  # noqa: E402

BUCKETS = [(1, 8), (9, 16), (17, 32), (33, 48), (49, 64), (65, 1 << 30)]


def bucket_of(tokens: int) -> str:
    for lo, hi in BUCKETS:
        if lo <= tokens <= hi:
            return f"{lo}-{hi}" if hi < 1 << 30 else f"{lo}+"
    return "0"


class StepTimer:
    """Wraps an executor's execute_model; records (kind, tokens, seconds) per step."""

    def __init__(self, executor):
        self.records: list[tuple[str, int, float]] = []
        self._inner = executor.execute_model
        executor.execute_model = self

    def __call__(self, step):
        start = time.perf_counter()
        out = self._inner(step)
        seconds = time.perf_counter() - start
        tokens = sum(row.num_new_tokens for row in step.rows)
        # A row computes prompt tokens when it does not sample (a chunk short of the prompt's
        # end) or computes several tokens at once (a prompt's last chunk).
        prompt = any(not row.samples or row.num_new_tokens > 1 for row in step.rows)
        self.records.append(("prompt" if prompt else "decode", tokens, seconds))
        return out


def summarize(records, wall: float, output_tokens: int) -> dict:
    phases = {}
    for kind in ("prompt", "decode"):
        mine = [r for r in records if r[0] == kind]
        phases[kind] = {"steps": len(mine), "tokens": sum(r[1] for r in mine),
                        "seconds": round(sum(r[2] for r in mine), 3)}
    by_bucket: dict[str, list[float]] = defaultdict(list)
    tokens_in: dict[str, int] = defaultdict(int)
    for kind, tokens, seconds in records:
        if kind == "decode":
            by_bucket[bucket_of(tokens)].append(seconds)
            tokens_in[bucket_of(tokens)] += tokens
    buckets = {b: {"steps": len(v), "seconds": round(sum(v), 3), "median_ms": round(1e3 * statistics.median(v), 2),
                   "tokens_per_s": round(tokens_in[b] / sum(v), 1)} for b, v in by_bucket.items()}
    inside = sum(r[2] for r in records)
    return {"wall_s": round(wall, 3), "output_tok_s": round(output_tokens / wall, 1), "phases": phases,
            "outside_executor_s": round(wall - inside, 3), "decode_buckets": buckets}


def print_round(i: int, res: dict) -> None:
    print(f"round {i}: {res['output_tok_s']} output tok/s, wall {res['wall_s']} s, "
          f"outside the executor {res['outside_executor_s']} s")
    print(f"  {'phase':<8}{'steps':>7}{'tokens':>8}{'seconds':>9}{'share':>7}")
    for kind, p in res["phases"].items():
        print(f"  {kind:<8}{p['steps']:>7}{p['tokens']:>8}{p['seconds']:>9.2f}{p['seconds'] / res['wall_s']:>7.0%}")
    print(f"  {'decode batch':<14}{'steps':>6}{'seconds':>9}{'ms/step':>9}{'tok/s':>8}")
    for b, v in sorted(res["decode_buckets"].items(), key=lambda kv: int(kv[0].split('-')[0].rstrip('+'))):
        print(f"  {b:<14}{v['steps']:>6}{v['seconds']:>9.2f}{v['median_ms']:>9.2f}{v['tokens_per_s']:>8.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="timed generate calls after a warm-up (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pagoda-kwargs", default="{}", help="JSON object of extra LLM(...) arguments")
    ap.add_argument("--output", default=str(HERE / "results" / "offline_phases.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gguf = cpu_peers.find_default_gguf()
    vocab = cpu_peers.gguf_vocab_size(gguf)
    requests = cpu_peers.make_requests(0, 64, 16, 256, 16, 128, vocab)
    llm = LLM(str(gguf), dtype="auto", num_threads=args.threads, show_progress=False,
              enable_prefix_caching=False, **json.loads(args.pagoda_kwargs))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    prompts = [p for p, _ in requests]
    output_tokens = sum(n for _, n in requests)
    llm.generate(prompts[:2], params[:2])  # warm-up
    timer = StepTimer(llm.engine.executor)
    rounds = []
    for i in range(args.rounds):
        timer.records.clear()
        start = time.perf_counter()
        llm.generate(prompts, params)
        res = summarize(timer.records, time.perf_counter() - start, output_tokens)
        rounds.append(res)
        print_round(i, res)
    llm.engine.executor.execute_model = timer._inner
    result = {"machine": cpu_peers.machine_info(args.threads), "torch": torch.__version__,
              "workload": "64 requests, prompts 16-256, outputs 16-128 (cpu_peers.py offline mix, seed 0)",
              "rounds": rounds}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
