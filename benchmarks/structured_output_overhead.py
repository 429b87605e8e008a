#!/usr/bin/env python
"""Structured-output overhead: output tok/s of 32 concurrent requests constrained by a JSON
schema vs the same requests unconstrained, on the default model (offline engine).

A grammar cannot be combined with ignore_eos, so the two runs are made to do the same work:
the constrained run goes first (greedy, max_tokens 256: the schema's bounded strings let
every answer finish with "stop"); then the free run generates, for each request, exactly as
many tokens as its constrained answer had (ignore_eos, max_tokens = that count). Same
prompts, same per-request lengths, so the same batch at every step: the difference in
wall time is the cost of structured outputs (the engine's bitmask fill and matcher updates,
the worker's masking). Each run is repeated (alternating) and the best time kept.

The time spent in each piece of structured-output work (the engine's bitmask fill, the
matchers' token updates, the worker's masking) is also timed: their sum over the free
run's wall time is an overhead estimate that other processes on the machine disturb far
less than a difference of two wall times does.

Prints a table and writes benchmarks/results/structured_output_overhead.json.

    .venv/bin/python benchmarks/structured_output_overhead.py            # 32 requests, 3 rounds
    .venv/bin/python benchmarks/structured_output_overhead.py --quick    # 8 requests, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import pagoda.structured_output.bitmask as bitmask_module  # noqa: E402
from pagoda import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from pagoda.structured_output.request import StructuredOutputRequest  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "structured_output_overhead.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"type": "string", "enum": ["happy", "calm", "grumpy"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "country": {"type": "string", "maxLength": 24}},
                    "required": ["city", "country"], "additionalProperties": False},
    },
    "required": ["name", "age", "mood", "hobbies", "address"],
    "additionalProperties": False,
}
JOBS = ["sailor", "baker", "astronaut", "librarian", "beekeeper", "drummer", "chef", "runner", "engineer",
        "farmer", "pirate", "poet", "nurse", "musician", "painter", "teacher"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Describe a {JOBS[i % len(JOBS)]} (person {i}) as a JSON profile."}]
            for i in range(n)]


def timed(llm: LLM, conversations, params) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 8, 1
        args.out = args.out.with_name(args.out.stem + "_quick.json")

    load = os.getloadavg()
    log(f"load average {load[0]:.2f} (quiet machine: < 0.5)")
    llm = LLM("smollm2-135m-instruct", show_progress=False, max_num_seqs=max(args.requests, 32))
    conversations = prompts(args.requests)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))

    # Time in each piece of structured-output work: the engine's bitmask fill, the matchers'
    # token updates (scheduler), the worker's masking (sampler).
    parts = {"fill": 0.0, "accept": 0.0, "mask": 0.0}

    def timing(part, function):
        def timed_function(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - start
        return timed_function

    manager = llm.engine.structured_output
    manager.grammar_bitmask = timing("fill", manager.grammar_bitmask)
    StructuredOutputRequest.accept_token = timing("accept", StructuredOutputRequest.accept_token)
    bitmask_module.apply_grammar_bitmask = timing("mask", bitmask_module.apply_grammar_bitmask)

    log("warm-up (and the schema's compile)")
    _, outputs = timed(llm, conversations, constrained)
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    reasons = [o.outputs[0].finish_reason for o in outputs]
    valid = 0
    for o in outputs:
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except ValueError:
            pass
    free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    timed(llm, conversations, free)  # warm-up of the free path

    times = {"constrained": [], "free": []}
    part_times = []
    for round_ in range(args.rounds):
        for mode in ("free", "constrained"):
            for part in parts:
                parts[part] = 0.0
            seconds, outs = timed(llm, conversations, constrained if mode == "constrained" else free)
            assert [len(o.outputs[0].token_ids) for o in outs] == lengths, "the runs must do the same work"
            times[mode].append(seconds)
            if mode == "constrained":
                part_times.append(dict(parts))
            log(f"round {round_ + 1} {mode}: {seconds:.2f} s (load average {os.getloadavg()[0]:.2f})")

    tokens = sum(lengths)
    best = {mode: min(values) for mode, values in times.items()}
    rate = {mode: tokens / best[mode] for mode in best}
    overhead = best["constrained"] / best["free"] - 1
    best_parts = {part: min(p[part] for p in part_times) for part in parts}
    parts_overhead = sum(best_parts.values()) / best["free"]
    rows = [("free (same lengths, ignore_eos)", best["free"], rate["free"]),
            ("JSON schema", best["constrained"], rate["constrained"])]
    print(f"\n{args.requests} concurrent requests, {tokens} output tokens "
          f"(per request {min(lengths)}-{max(lengths)}), greedy, best of {args.rounds}")
    print(f"{'run':<34}{'wall s':>9}{'output tok/s':>14}")
    for name, seconds, tok_s in rows:
        print(f"{name:<34}{seconds:>9.2f}{tok_s:>14.1f}")
    print(f"overhead, wall time: {overhead * 100:+.1f}% (target < 10%)")
    print(f"overhead, structured-output work: {parts_overhead * 100:.2f}% of the free run "
          f"(bitmask fill {best_parts['fill']:.3f} s, matcher updates {best_parts['accept']:.3f} s, "
          f"masking {best_parts['mask']:.3f} s)")
    print(f"{valid}/{len(outputs)} answers parse as JSON, finish reasons {sorted(set(reasons))}; "
          f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}")

    result = {
        "benchmark": "structured_output_overhead",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": load},
        "config": {"requests": args.requests, "rounds": args.rounds, "max_tokens": args.max_tokens,
                   "model": "smollm2-135m-instruct", "dtype": str(llm.engine.dtype), "schema": SCHEMA},
        "output_tokens": tokens, "lengths": lengths, "finish_reasons": reasons, "valid_json": valid,
        "seconds": times, "best_seconds": best, "output_tok_s": rate, "overhead": overhead,
        "structured_output_work_seconds": part_times, "structured_output_work_overhead": parts_overhead,
        "load_average_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
