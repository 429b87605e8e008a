"""Offload tiers for prefix-cache blocks: TTFT on a shared-prefix workload whose
prefixes do not all fit in the KV cache.

Eight 1,000-token system prompts, 32 requests taking them in turn (each
prefix comes back every eighth request) with a distinct 50-token question
and 16 new tokens; requests run one at a time, so TTFT is the request's own
prefill. The KV cache is forced to ~3 prefixes, so least-recently-used
eviction has always dropped a prefix by the time it comes back.

Configurations, same model and session:
- no tiers: prefix caching only (evicted prefixes are recomputed);
- host tier: --kv-offload-cpu-gb 2 (evicted blocks wait in host memory);
- host + disk, cold folder: as above, writing every block to a fresh folder;
- restart with disk: a new engine on that folder (its first requests hit disk).

Prints a table and writes benchmarks/results/kv_offload.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--question-len", type=int, default=50)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--cache-prefixes", type=float, default=3.0, help="KV cache size, in prefixes")
    parser.add_argument("--quick", action="store_true", help="a small run to check the script works")
    args = parser.parse_args()
    if args.quick:
        args.num_prefixes, args.prefix_len, args.num_requests = 4, 200, 8

    from pagoda import LLM, SamplingParams

    rng = random.Random(0)
    prefixes = [[rng.randrange(20, 49000) for _ in range(args.prefix_len)] for _ in range(args.num_prefixes)]
    prompts = [prefixes[i % args.num_prefixes] + [rng.randrange(20, 49000) for _ in range(args.question_len)]
               for i in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    block_size = 16
    num_blocks = int(args.cache_prefixes * (args.prefix_len + args.question_len + args.output_len) / block_size)
    folder = Path(tempfile.mkdtemp(prefix="pagoda-kv-offload-"))
    configs = [
        ("no tiers", {}),
        ("host tier", {"kv_offload_cpu_gb": 2.0}),
        ("host + disk, cold folder", {"kv_offload_cpu_gb": 2.0, "kv_offload_disk": str(folder)}),
        ("restart with disk", {"kv_offload_cpu_gb": 2.0, "kv_offload_disk": str(folder)}),
    ]
    rows = []
    reference = None
    for name, extra in configs:
        llm = LLM(args.model, dtype="float32", show_progress=False, num_blocks=num_blocks, block_size=block_size,
                  max_model_len=min(2048, num_blocks * block_size), **extra)
        ttfts, cached = [], 0
        tokens = []
        start = time.perf_counter()
        for prompt in prompts:
            [output] = llm.generate([prompt], params)
            ttfts.append(output.metrics.first_token_time - output.metrics.arrival_time)
            cached += output.num_cached_tokens
            tokens.append(list(output.outputs[0].token_ids))
        wall = time.perf_counter() - start
        llm.close()
        stats = llm.engine.stats()
        reference = reference or tokens
        row = {"config": name, "wall_s": wall, "ttft_p50_s": statistics.median(ttfts),
               "ttft_mean_s": statistics.fmean(ttfts), "ttft_max_s": max(ttfts),
               "cached_prompt_tokens": cached, "prompt_tokens": sum(map(len, prompts)),
               "host_hit_blocks": stats.kv_offload_host_hits_total,
               "disk_hit_blocks": stats.kv_offload_disk_hits_total,
               "same_tokens_as_no_tiers": tokens == reference}
        rows.append(row)
        print(f"{name}: {wall:.1f} s, TTFT p50 {row['ttft_p50_s']:.3f} s", file=sys.stderr, flush=True)
        del llm

    print(f"\n{args.num_requests} requests over {args.num_prefixes} prefixes of {args.prefix_len} tokens, "
          f"KV cache {num_blocks} blocks of {block_size} (~{args.cache_prefixes:g} prefixes), float32")
    print(f"{'configuration':>26} {'total s':>8} {'TTFT p50':>9} {'TTFT mean':>10} {'cached tokens':>14} "
          f"{'host hits':>10} {'disk hits':>10} {'same tokens':>12}")
    for r in rows:
        print(f"{r['config']:>26} {r['wall_s']:>8.1f} {r['ttft_p50_s']:>9.3f} {r['ttft_mean_s']:>10.3f} "
              f"{r['cached_prompt_tokens']:>6}/{r['prompt_tokens']:<7} {r['host_hit_blocks']:>10} "
              f"{r['disk_hit_blocks']:>10} {str(r['same_tokens_as_no_tiers']):>12}")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kv_offload.json").write_text(json.dumps({"args": vars(args), "num_blocks": num_blocks,
                                                             "rows": rows}, indent=2))
    return 0 if all(r["same_tokens_as_no_tiers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
