"""Preemption by recompute vs by swap, with a KV cache forced small.

Two workloads of random-token prompts (ids < 20, the special tokens, are
avoided), all submitted at once, greedy with EOS ignored so every output has
its fixed length:

* short: --short-requests prompts of 128 tokens, --short-output-len new tokens;
* long:  --long-requests prompts of 2,048 tokens, --long-output-len new tokens.

Each workload gets a KV cache of --short-num-blocks / --long-num-blocks
blocks: room to admit a few prompts (20 short ones, 2 long ones, by
default) but not for them all to grow to their full length, so decoding
runs the cache dry and preempts the youngest running request, again and
again (admission takes a prompt only when its whole chunk fits). Each
workload runs once per mode on a fresh engine (default model, float32, the
engine's default swap space of 4 GiB): `--preemption-mode recompute` drops
a preempted request's KV and computes it again; `swap` copies its blocks to
the host pool and back.

Prefix caching is off unless --prefix-caching: with it on, a recomputed
request finds again whatever of its freed blocks the cache has not evicted
yet, so "recompute" then measures the prefix cache as much as recompute.

Reports per mode: wall time, output tokens/s, preemptions, swaps out/in,
blocks and MB swapped, seconds spent copying swapped blocks, tokens whose KV
recompute dropped, tokens the model computed beyond the workload's minimum
(prompt + output - 1 per request: the recompute cost actually paid), and
whether both modes produced the same tokens. Prints a table and writes
benchmarks/results/preemption_modes.json (preemption_modes_prefix_caching.json
with --prefix-caching; a _quick suffix with --quick).

    .venv/bin/python benchmarks/preemption_modes.py            # full run (~5 min on 2 quiet cores)
    .venv/bin/python benchmarks/preemption_modes.py --quick    # smoke test (~2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIN_TOKEN_ID = 20  # ids below are SmolLM2's special tokens

# Defaults for a full run and for --quick; explicit flags override either.
# Blocks of 16 tokens: a short prompt takes 8, a long one 128 (+1 for its first decode).
FULL = {"short_requests": 32, "short_output_len": 128, "short_num_blocks": 160,
        "long_requests": 4, "long_output_len": 48, "long_num_blocks": 260}
QUICK = {"short_requests": 8, "short_output_len": 32, "short_num_blocks": 36,
         "long_requests": 2, "long_output_len": 32, "long_num_blocks": 258}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_mode(args, mode: str, prompts: list[list[int]], output_len: int, num_blocks: int) -> tuple[dict, list]:
    from pagoda import LLM, SamplingParams
    from pagoda.worker import model_runner

    max_model_len = math.ceil((len(prompts[0]) + output_len) / args.block_size) * args.block_size
    llm = LLM(args.model, show_progress=False, dtype=args.dtype, num_blocks=num_blocks, block_size=args.block_size,
              max_model_len=max_model_len, preemption_mode=mode, swap_space=args.swap_space,
              enable_prefix_caching=args.prefix_caching, load_format=args.load_format)
    engine = llm.engine
    llm.generate([[MIN_TOKEN_ID + i for i in range(16)]], SamplingParams(max_tokens=2))  # warm-up

    # Count the tokens the model computes, and time the swap copies (both measured from outside).
    computed = [0]
    schedule = engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        computed[0] += out.total_num_tokens
        return out

    engine.scheduler.schedule = counting_schedule
    copy_seconds = [0.0]
    move_blocks = model_runner.move_blocks

    def timed_move_blocks(*a, **kw):
        start = time.perf_counter()
        move_blocks(*a, **kw)
        copy_seconds[0] += time.perf_counter() - start

    model_runner.move_blocks = timed_move_blocks
    try:
        before = engine.stats()
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        stats = engine.stats()
    finally:
        model_runner.move_blocks = move_blocks
        engine.scheduler.schedule = schedule

    block_bytes = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in engine.kv_caches)
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    minimum = sum(len(p) + output_len - 1 for p in prompts)
    swapped_blocks = stats.num_blocks_swapped_out_total - before.num_blocks_swapped_out_total
    row = {
        "mode": mode,
        "num_blocks": num_blocks,
        "swap_blocks": engine.swap_space.num_blocks if engine.swap_space is not None else 0,
        "wall_s": wall,
        "output_tokens": num_output,
        "output_tok_s": num_output / wall,
        "preemptions": stats.num_preemptions_total - before.num_preemptions_total,
        "swapped_out": stats.num_swapped_out_total - before.num_swapped_out_total,
        "swapped_in": stats.num_swapped_in_total - before.num_swapped_in_total,
        "blocks_swapped_out": swapped_blocks,
        "blocks_swapped_in": stats.num_blocks_swapped_in_total - before.num_blocks_swapped_in_total,
        "mb_swapped_out": swapped_blocks * block_bytes / 1e6,
        "swap_copy_s": copy_seconds[0],
        "tokens_dropped": stats.num_tokens_dropped_total - before.num_tokens_dropped_total,
        "prefix_cache_hits": stats.prefix_cache_hits_total - before.prefix_cache_hits_total,
        "tokens_computed": computed[0],
        "tokens_recomputed": computed[0] - minimum,
        "peak_swap_blocks": engine.swap_space.pool.peak_blocks_in_use if engine.swap_space is not None else 0,
    }
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm, engine
    return row, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run to check that the script works")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights from a config.json folder (e.g. benchmarks/configs/llama-3-8b)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for swapped blocks")
    parser.add_argument("--prefix-caching", action="store_true", help="keep prefix caching on (off by default)")
    parser.add_argument("--short-len", type=int, default=128)
    parser.add_argument("--long-len", type=int, default=2048)
    parser.add_argument("--short-requests", type=int, default=None)
    parser.add_argument("--short-output-len", type=int, default=None)
    parser.add_argument("--long-requests", type=int, default=None)
    parser.add_argument("--long-output-len", type=int, default=None)
    parser.add_argument("--short-num-blocks", type=int, default=None, help="KV cache blocks for the short workload")
    parser.add_argument("--long-num-blocks", type=int, default=None, help="KV cache blocks for the long workload")
    parser.add_argument("--workloads", nargs="+", choices=["short", "long"], default=["short", "long"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            # The default block counts are for blocks of 16 tokens: the same token room otherwise.
            setattr(args, key, math.ceil(value * 16 / args.block_size) if key.endswith("num_blocks") else value)
    name = "preemption_modes" + ("_prefix_caching" if args.prefix_caching else "") + ("_quick" if args.quick else "")
    output_path = args.output or RESULTS / f"{name}.json"

    import torch

    rng = random.Random(args.seed)
    workloads = []
    for name, prompt_len, num_requests, output_len, num_blocks in (
        ("short", args.short_len, args.short_requests, args.short_output_len, args.short_num_blocks),
        ("long", args.long_len, args.long_requests, args.long_output_len, args.long_num_blocks),
    ):
        prompts = [[rng.randrange(MIN_TOKEN_ID, 49152) for _ in range(prompt_len)] for _ in range(num_requests)]
        if name in args.workloads:
            workloads.append((name, prompts, output_len, num_blocks))

    results = []
    for name, prompts, output_len, num_blocks in workloads:
        rows, tokens = [], {}
        for mode in ("recompute", "swap"):
            log(f"{name}: {len(prompts)} x {len(prompts[0])}-token prompts, {output_len} new tokens, "
                f"{num_blocks} blocks, {mode}")
            row, tokens[mode] = run_mode(args, mode, prompts, output_len, num_blocks)
            log(f"  {row['wall_s']:.1f} s, {row['preemptions']} preemptions, {row['swapped_out']} swapped out")
            rows.append(row)
        results.append({"workload": name, "prompt_len": len(prompts[0]), "num_requests": len(prompts),
                        "output_len": output_len, "num_blocks": num_blocks, "rows": rows,
                        "same_tokens": tokens["recompute"] == tokens["swap"]})

    print(f"\nBlocks of {args.block_size} tokens, {args.dtype}, swap space {args.swap_space} GiB, prefix caching "
          f"{'on' if args.prefix_caching else 'off'}; "
          "'dropped': tokens whose KV recompute dropped; 'recomputed': tokens computed beyond the minimum")
    header = (f"{'workload':>9} {'blocks':>6} {'mode':>9} {'wall s':>7} {'out tok/s':>9} {'preempt':>7} {'swaps':>6} "
              f"{'MB out':>7} {'copy s':>6} {'dropped':>7} {'recomputed':>10} {'same':>5}")
    print(header)
    for result in results:
        for r in result["rows"]:
            label = f"{result['workload']} {result['prompt_len']}"
            print(f"{label:>9} {r['num_blocks']:>6} {r['mode']:>9} {r['wall_s']:>7.1f} {r['output_tok_s']:>9.1f} "
                  f"{r['preemptions']:>7} {r['swapped_out']:>6} {r['mb_swapped_out']:>7.0f} {r['swap_copy_s']:>6.2f} "
                  f"{r['tokens_dropped']:>7} {r['tokens_recomputed']:>10} {result['same_tokens']!s:>5}")
    for result in results:
        recompute, swap = result["rows"]
        winner = "swap" if swap["wall_s"] < recompute["wall_s"] else "recompute"
        ratio = max(recompute["wall_s"], swap["wall_s"]) / min(recompute["wall_s"], swap["wall_s"])
        result["faster"] = winner
        result["speedup"] = ratio
        print(f"{result['workload']} ({result['prompt_len']}-token prompts): {winner} is {ratio:.2f}x faster")

    RESULTS.mkdir(exist_ok=True)
    output_path.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
                    "loadavg_at_end": os.getloadavg()},
        "results": results,
    }, indent=2))
    log(f"wrote {output_path}")
    return 0 if all(r["same_tokens"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
