"""Speculative decoding (n-gram prompt lookup) against plain decoding, on the default model.

Two prompt sets (benchmarks/data/spec_decode_tasks.json): "grounded" tasks whose answer
copies the input (spelling fixes, rewrites, code edits), where prompt lookup drafts well,
and free "chat". For each set, greedy decoding (max_tokens each) runs:
- single stream: the prompts one after the other;
- concurrency 8: the 8 prompts at once (one batch).
Each configuration (plain, ngram) is one engine, loaded once; rounds alternate between
them and the best round of each is kept (the machine is shared with whatever else runs).
Reported: output tok/s, speedup, mean acceptance length (tokens a verifying step emits:
accepted drafts + 1), and whether greedy tokens were identical to plain decoding.

    python benchmarks/spec_decode.py [--rounds 3] [--max-tokens 128] [--k 4] [--out benchmarks/results/spec_decode.json]
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--max-tokens-per-step", type=int, default=None,
                        help="speculative_config.max_tokens_per_step (default: the engine's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "spec_decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = json.loads(DATA.read_text())
    sets = {name: [[{"role": "user", "content": p}] for p in data[name]] for name in ("grounded", "chat")}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    kwargs = {"num_threads": args.threads, "show_progress": False}
    if args.model:
        kwargs["model"] = args.model
    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
                   "prompt_lookup_max": 5}
    if args.max_tokens_per_step is not None:
        spec_config["max_tokens_per_step"] = args.max_tokens_per_step
    engines = {"plain": LLM(**kwargs), "ngram": LLM(speculative_config=spec_config, **kwargs)}
    # Decode rows unsplit in both, as speculation requires: the same arithmetic, so the same tokens.
    engines["plain"].engine.runner.attention.num_splits = 1
    for llm in engines.values():  # warm up (kernels, caches)
        llm.chat(sets["chat"][0], SamplingParams(temperature=0, max_tokens=8))
    results = []
    for set_name, chats in sets.items():
        for mode in ("single", "concurrency 8"):
            best: dict[str, tuple] = {}
            for _ in range(args.rounds):
                for name, llm in engines.items():
                    stats = llm.engine.scheduler.spec_stats
                    before = (stats.num_drafts, stats.num_accepted_tokens)
                    wall, count, tokens = run(llm, chats, params, mode != "single")
                    drafts = stats.num_drafts - before[0]
                    accepted = stats.num_accepted_tokens - before[1]
                    if name not in best or wall < best[name][0]:
                        best[name] = (wall, count, tokens, drafts, accepted)
            plain, spec = best["plain"], best["ngram"]
            row = {
                "set": set_name, "mode": mode,
                "plain_tok_s": plain[1] / plain[0], "ngram_tok_s": spec[1] / spec[0],
                "speedup": (spec[1] / spec[0]) / (plain[1] / plain[0]),
                "mean_acceptance_length": 1 + spec[4] / spec[3] if spec[3] else 1.0,
                "drafts": spec[3], "identical_tokens": plain[2] == spec[2],
                "output_tokens": spec[1],
            }
            results.append(row)
            print(f"{set_name:9s} {mode:14s} plain {row['plain_tok_s']:7.1f} tok/s  ngram {row['ngram_tok_s']:7.1f} "
                  f"tok/s  x{row['speedup']:.2f}  acceptance length {row['mean_acceptance_length']:.2f}  "
                  f"identical {row['identical_tokens']}", flush=True)
    print()
    print("| prompts | mode | plain tok/s | n-gram tok/s | speedup | mean acceptance length | same tokens |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['set']} | {r['mode']} | {r['plain_tok_s']:.1f} | {r['ngram_tok_s']:.1f} | {r['speedup']:.2f}x "
              f"| {r['mean_acceptance_length']:.2f} | {'yes' if r['identical_tokens'] else 'no'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "k": args.k,
                                    "max_tokens_per_step": spec_config.get("max_tokens_per_step"),
                                    "max_tokens": args.max_tokens, "rounds": args.rounds,
                                    "torch": torch.__version__, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
