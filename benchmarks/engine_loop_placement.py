"""Engine loop on a thread vs in its own process, under many concurrent streams.

For each placement, starts `pagoda serve --engine-loop PLACEMENT` with the
default model, warms it up, then sends the same streaming completion
requests (token-id prompts of 32-256 tokens, 64-128 output tokens,
ignore_eos) at a fixed concurrency. From /metrics it reads
pagoda:engine_busy_seconds and pagoda:engine_steps before and after, and
reports:

  busy share  = seconds inside engine steps / wall time of the load
                (how busy the step loop kept the model; 100% = never idle)
  gap / step  = (wall - busy) / steps: time between steps (command handling,
                output hand-off, GIL waits)

next to output tokens/s and TTFT. Prints a table and writes
benchmarks/results/engine_loop_placement.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import RESULTS, _requests, _run_level, _start_server  # noqa: E402


def _loop_counters(url: str) -> tuple[float, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("pagoda:engine_busy_seconds_total", "pagoda:engine_steps_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values["pagoda:engine_busy_seconds_total"], values["pagoda:engine_steps_total"]


def _measure(placement: str, requests, concurrency: int) -> dict:
    process, url = _start_server("--engine-loop", placement)
    try:
        asyncio.run(_run_level(url, requests[:4], 4))  # warm-up
        busy0, steps0 = _loop_counters(url)
        start = time.perf_counter()
        level = asyncio.run(_run_level(url, requests, concurrency))
        wall = time.perf_counter() - start
        busy1, steps1 = _loop_counters(url)
    finally:
        process.terminate()
        process.wait(60)
    steps = steps1 - steps0
    return {"placement": placement, "concurrency": concurrency, "wall_s": wall, "steps": steps,
            "busy_share": (busy1 - busy0) / wall, "gap_per_step_ms": 1000 * (wall - (busy1 - busy0)) / steps,
            "output_tok_s": level["output_tok_s"], "ttft_p50_s": level["ttft_p50_s"],
            "tpot_p50_s": level["tpot_p50_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--placements", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    requests = _requests(args.num_requests, args.seed)
    rows = []
    for placement in args.placements:
        rows.append(_measure(placement, requests, args.concurrency))
        print(f"{placement}: done", file=sys.stderr, flush=True)

    print(f"\n{args.num_requests} streaming requests at concurrency {args.concurrency}, prompts 32-256, "
          f"outputs 64-128; {platform.machine()}")
    print(f"{'loop':>8} {'busy share':>11} {'gap/step ms':>12} {'steps':>6} {'tok/s':>7} {'TTFT p50':>9} {'TPOT p50':>9}")
    for r in rows:
        print(f"{r['placement']:>8} {r['busy_share']:>11.1%} {r['gap_per_step_ms']:>12.2f} {r['steps']:>6.0f} "
              f"{r['output_tok_s']:>7.1f} {r['ttft_p50_s']:>9.3f} {r['tpot_p50_s']:>9.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_loop_placement.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
