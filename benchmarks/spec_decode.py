"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain decoding, on the default model.

Two prompt sets (benchmarks/data/spec_decode_tasks.json): "grounded" tasks whose answer
copies the input (spelling fixes, rewrites, code edits), where prompt lookup drafts well,
and free "chat". For each set, greedy decoding (max_tokens each) runs:
- single stream: the prompts one after the other;
- concurrency 8: the 8 prompts at once (one batch).
Each configuration (plain, ngram) is one engine, loaded once; rounds alternate between
them; tok/s are each engine's best round, and the speedup is the median over rounds of the
paired ratio (the two engines run back to back within a round; the machine is shared).
Reported: output tok/s, speedup, mean acceptance length (tokens a verifying step emits:
accepted drafts + 1), and whether greedy tokens were identical to plain decoding.

`--method draft_model`: self-speculation, the target with float weights
(`--target-quantization`, default none: bf16 on a CPU with native bf16) drafted for by its
own weights packed (`--draft-quantization`, default int4); plain is the same float target
without drafts, and the default engine (GGUF blocks packed, no drafts) runs alongside as
the reference ("default" column).

    python benchmarks/spec_decode.py [--rounds 3] [--max-tokens 128] [--k 4] [--out benchmarks/results/spec_decode.json]
    python benchmarks/spec_decode.py --method draft_model --k 3 [--draft-quantization int4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from soak import cpu_model  # the benchmarks' one CPU-name helper

from pagoda import LLM, SamplingParams

DATA = Path(__file__).resolve().parent / "data" / "spec_decode_tasks.json"


def run(llm: LLM, chats: list, params: SamplingParams, concurrent: bool) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    if concurrent:
        outs = llm.chat(chats, params)
    else:
        outs = [llm.chat(c, params)[0] for c in chats]
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return wall, sum(len(t) for t in tokens), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-lookup-min", type=int, default=2, help="ngram: shortest suffix n-gram looked up")
    parser.add_argument("--prompt-lookup-max", type=int, default=5, help="ngram: longest suffix n-gram looked up")
    parser.add_argument("--max-tokens-per-step", type=int, default=None,
                        help="speculative_config.max_tokens_per_step (default: the engine's)")
    parser.add_argument("--step-cost", type=float, nargs="+", default=None,
                        help="speculative_config.step_cost: relative cost of a step of 1, 2, ... tokens "
                             "(default: the engine's; 1 = drafts are free: every proposal is verified)")
    parser.add_argument("--method", choices=("ngram", "draft_model"), default="ngram")
    parser.add_argument("--target-quantization", default=None,
                        help="draft_model: the target's quantization (default none: float weights)")
    parser.add_argument("--draft-quantization", default="int4", help="draft_model: the draft's quantization")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/spec_decode.json (ngram), spec_decode_draft_model.json")
    args = parser.parse_args()
    results_dir = Path(__file__).resolve().parent / "results"
    if args.out is None:
        args.out = results_dir / ("spec_decode.json" if args.method == "ngram" else "spec_decode_draft_model.json")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    data = json.loads(DATA.read_text())
    sets = {name: [[{"role": "user", "content": p}] for p in data[name]] for name in ("grounded", "chat")}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    kwargs = {"num_threads": args.threads, "show_progress": False}
    if args.model:
        kwargs["model"] = args.model
    method = args.method
    tokens_per_step = {} if args.max_tokens_per_step is None else {"max_tokens_per_step": args.max_tokens_per_step}
    if args.step_cost is not None:
        tokens_per_step["step_cost"] = args.step_cost
    if method == "ngram":
        spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.prompt_lookup_min,
                       "prompt_lookup_max": args.prompt_lookup_max, **tokens_per_step}
        engines = {"plain": LLM(**kwargs), "ngram": LLM(speculative_config=spec_config, **kwargs)}
    else:
        target = {**kwargs, "quantization": args.target_quantization or "none"}
        spec_config = {"method": "draft_model", "num_speculative_tokens": args.k,
                       "quantization": args.draft_quantization, **tokens_per_step}
        engines = {"plain": LLM(**target), "draft_model": LLM(speculative_config=spec_config, **target),
                   "default": LLM(**kwargs)}
    # Decode rows unsplit in both, as speculation requires: the same arithmetic, so the same tokens.
    engines["plain"].engine.runner.attention.num_splits = 1
    if "default" in engines:
        engines["default"].engine.runner.attention.num_splits = 1
    for llm in engines.values():  # warm up (kernels, caches)
        llm.chat(sets["chat"][0], SamplingParams(temperature=0, max_tokens=8))
    results = []
    for set_name, chats in sets.items():
        for mode in ("single", "concurrency 8"):
            best: dict[str, tuple] = {}
            # Tokens are compared within a round: from the second round on, prompts hit the prefix
            # cache, whose short tails take other kernels than a whole prompt (bf16 may then
            # flip a near-tie in both engines alike); speculation must not change a round's tokens.
            identical = True
            ratios = []  # per round: the speculating engine's tok/s over plain's, measured side by side
            for _ in range(args.rounds):
                round_tokens, round_rate = {}, {}
                for name, llm in engines.items():
                    stats = llm.engine.scheduler.spec_stats
                    before = (stats.num_drafts, stats.num_accepted_tokens)
                    wall, count, tokens = run(llm, chats, params, mode != "single")
                    drafts = stats.num_drafts - before[0]
                    accepted = stats.num_accepted_tokens - before[1]
                    round_tokens[name] = tokens
                    round_rate[name] = count / wall
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, count, tokens, drafts, accepted)
                identical = identical and round_tokens["plain"] == round_tokens[method]
                ratios.append(round_rate[method] / round_rate["plain"])
            plain, spec = best["plain"], best[method]
            row = {
                "set": set_name, "mode": mode,
                "plain_tok_s": plain[1] / plain[0], f"{method}_tok_s": spec[1] / spec[0],
                # The median of the rounds' paired ratios: on a shared machine one lucky round of
                # either engine moves a ratio of bests; the pairs share their minute.
                "speedup": statistics.median(ratios), "round_speedups": ratios,
                "speedup_of_best_rounds": (spec[1] / spec[0]) / (plain[1] / plain[0]),
                "mean_acceptance_length": 1 + spec[4] / spec[3] if spec[3] else 1.0,
                "drafts": spec[3], "identical_tokens": identical,
                "output_tokens": spec[1],
            }
            if "default" in best:
                row["default_tok_s"] = best["default"][1] / best["default"][0]
            results.append(row)
            default = f"  default {row['default_tok_s']:7.1f} tok/s" if "default" in best else ""
            print(f"{set_name:9s} {mode:14s} plain {row['plain_tok_s']:7.1f} tok/s  {method} "
                  f"{row[f'{method}_tok_s']:7.1f} tok/s  x{row['speedup']:.2f}  acceptance length "
                  f"{row['mean_acceptance_length']:.2f}  identical {row['identical_tokens']}{default}", flush=True)
    print()
    label = {"ngram": "n-gram", "draft_model": "draft model"}[method]
    extra = " default (packed, no drafts) tok/s |" if method == "draft_model" else ""
    print(f"| prompts | mode | plain tok/s | {label} tok/s | speedup | mean acceptance length | same tokens |{extra}")
    print("|---|---|---:|---:|---:|---:|---|" + ("---:|" if extra else ""))
    for r in results:
        tail = f" {r['default_tok_s']:.1f} |" if extra else ""
        print(f"| {r['set']} | {r['mode']} | {r['plain_tok_s']:.1f} | {r[f'{method}_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['mean_acceptance_length']:.2f} | "
              f"{'yes' if r['identical_tokens'] else 'no'} |{tail}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The machine is shared: the load average (1, 5, 15 minutes) next to the numbers.
    setup = {"method": method, "speculative_config": spec_config,
             "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if method == "draft_model":
        setup["target_quantization"] = args.target_quantization or "none"
        setup["target_dtype"] = str(engines["plain"].engine.dtype).removeprefix("torch.")
    args.out.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "k": args.k,
                                    "max_tokens": args.max_tokens, "rounds": args.rounds,
                                    "torch": torch.__version__, **setup, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
