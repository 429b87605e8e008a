"""Prefix caching: 64 requests sharing a 1,000-token system prompt, each with a
distinct 50-token question, through the offline engine with prefix caching on
and off (default model, same session).

All requests are submitted at once (32 output tokens each, greedy,
ignore_eos). Reports TTFT (arrival -> first token, from the engine's request
metrics) p50/p90, total wall time, prompt tokens computed vs found in the
cache, and checks that both runs produce the same tokens. Prints a table
and writes benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--system-len", type=int, default=1000)
    parser.add_argument("--question-len", type=int, default=50)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pagoda import LLM, SamplingParams

    rng = random.Random(args.seed)
    system = [rng.randrange(20, 49000) for _ in range(args.system_len)]
    prompts = [system + [rng.randrange(20, 49000) for _ in range(args.question_len)] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rows, tokens = [], {}
    for caching in (False, True):
        llm = LLM(args.model, show_progress=False, enable_prefix_caching=caching)
        llm.generate([[20 + i for i in range(16)]], SamplingParams(max_tokens=2))  # warm-up (no shared prefix)
        before = llm.engine.stats()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        stats = llm.engine.stats()
        ttfts = sorted(o.metrics.first_token_time - o.metrics.arrival_time for o in outputs)
        hits = stats.prefix_cache_hits_total - before.prefix_cache_hits_total
        rows.append({"prefix_caching": caching, "wall_s": wall, "ttft_p50_s": statistics.median(ttfts),
                     "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))], "ttft_max_s": ttfts[-1],
                     "prompt_tokens": sum(map(len, prompts)), "cached_prompt_tokens": hits,
                     "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall})
        tokens[caching] = [list(o.outputs[0].token_ids) for o in outputs]
        print(f"prefix caching {'on' if caching else 'off'}: {wall:.1f} s", file=sys.stderr, flush=True)
        del llm
    same = tokens[True] == tokens[False]

    print(f"\n{args.num_requests} requests: a shared {args.system_len}-token system prompt + a distinct "
          f"{args.question_len}-token question each, {args.output_len} output tokens, all submitted at once")
    print(f"{'prefix caching':>15} {'wall s':>8} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'cached prompt tokens':>21} "
          f"{'output tok/s':>13}")
    for r in rows:
        print(f"{'on' if r['prefix_caching'] else 'off':>15} {r['wall_s']:>8.1f} {r['ttft_p50_s']:>11.2f} "
              f"{r['ttft_p90_s']:>11.2f} {r['cached_prompt_tokens']:>10} of {r['prompt_tokens']:<8} "
              f"{r['output_tok_s']:>13.1f}")
    print(f"speed-up: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x total, "
          f"{rows[0]['ttft_p50_s'] / rows[1]['ttft_p50_s']:.2f}x TTFT p50; same greedy tokens: {same}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefix_cache.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                           "same_tokens": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
