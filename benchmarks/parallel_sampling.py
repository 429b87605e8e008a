"""KV memory of parallel sampling and beam search: peak KV blocks for n = 4
and n = 8 samples (and beam widths 4 and 8) of a 512-token prompt with 128
new tokens each, with the sequences sharing blocks (copy on write, the
default) and without (every sample holds its own copy of the prompt's KV;
every beam fork copies all of its parent's blocks). Default model, same
session.

Prints a table and writes benchmarks/results/parallel_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--beam-width", type=int, nargs="*", default=[4, 8])
    args = parser.parse_args()

    from pagoda import LLM, SamplingParams

    rng = random.Random(0)
    prompt = [rng.randrange(20, 49000) for _ in range(args.prompt_len)]
    rows = []
    cases = [("sampling", n) for n in args.n] + [("beam", w) for w in args.beam_width]
    for mode, n in cases:
        for sharing in (True, False):
            llm = LLM(args.model, show_progress=False, enable_fork_sharing=sharing, enable_prefix_caching=sharing)
            if mode == "beam":
                params = SamplingParams(n=1, use_beam_search=True, beam_width=n, max_tokens=args.output_len,
                                        ignore_eos=True)
            else:
                params = SamplingParams(n=n, temperature=0.8, seed=1, max_tokens=args.output_len, ignore_eos=True)
            start = time.perf_counter()
            output = llm.generate([prompt], params)[0]
            wall = time.perf_counter() - start
            kv = llm.engine.kv_cache_manager
            rows.append({"mode": mode, "n": n, "shared": sharing, "peak_blocks": kv.pool.peak_blocks_in_use,
                         "block_size": kv.block_size, "wall_s": wall,
                         "tokens": [list(c.token_ids) for c in output.outputs]})
            print(f"{mode} n={n} shared={sharing}: peak {kv.pool.peak_blocks_in_use} blocks, {wall:.1f} s",
                  file=sys.stderr, flush=True)
            del llm
    print(f"\n{args.prompt_len}-token prompt, {args.output_len} new tokens per sample, blocks of "
          f"{rows[0]['block_size']} tokens")
    print(f"{'mode':>14} {'shared blocks':>14} {'unshared blocks':>16} {'saving':>7} {'same output':>12}")
    summary = []
    for mode, n in cases:
        shared, unshared = (next(r for r in rows if r["mode"] == mode and r["n"] == n and r["shared"] is s)
                            for s in (True, False))
        saving = 1 - shared["peak_blocks"] / unshared["peak_blocks"]
        same = shared["tokens"] == unshared["tokens"]
        summary.append({"mode": mode, "n": n, "shared_peak_blocks": shared["peak_blocks"],
                        "unshared_peak_blocks": unshared["peak_blocks"], "saving": saving, "same_tokens": same})
        label = f"n={n}" if mode == "sampling" else f"beam width={n}"
        print(f"{label:>14} {shared['peak_blocks']:>14} {unshared['peak_blocks']:>16} {saving:>7.1%} {str(same):>12}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parallel_sampling.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                                "runs": [{k: v for k, v in r.items() if k != "tokens"}
                                                                         for r in rows]}, indent=2))
    return 0 if all(s["same_tokens"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
