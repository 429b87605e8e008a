"""The LoRA share of a step's linear layers: compiled `pagoda::lora_add_` vs the torch path.

A stand-in for the default model's decoder linears (SmolLM2-135M: 30 layers of qkv 576->960,
o 576->576, gate_up 576->3072, down 1536->576, bf16 weights as the dense copy a 32-token step
uses), each with 4 LoRA slots of rank 8 on every shard, all 4 adapters in the step
(tokens round-robin). Per step: the base linears alone, then the same plus the LoRA deltas
by each path. Time is the calling thread's CPU time (one thread), the best of `--repeats`
steps: it does not count the time the thread waits for a core, so it holds on a shared,
loaded machine where wall-clock numbers do not. Each linear has its own weights, so the
LoRA weights come from memory as in a real step (~0.65 MB per layer for 4 adapters).

    python benchmarks/lora_layers.py [--tokens 32 640] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from soak import cpu_model  # the benchmarks' one CPU-name helper

from pagoda.model.lora import layers
from pagoda.model.lora.layers import LoRALinearWeights, LoRAStepContext

SHAPES = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]  # qkv, o, gate_up, down


def build(num_layers: int, max_loras: int, rank: int, tokens: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    ctx = LoRAStepContext(torch.device("cpu"), max_loras)
    net = []
    for _ in range(num_layers):
        for in_features, shards in SHAPES:
            lora = LoRALinearWeights(ctx, max_loras, rank, in_features, shards, dtype, torch.device("cpu"))
            for slot in range(max_loras):
                lora.set_slot(slot, {i: (torch.randn(rank, in_features, generator=gen) * 0.02,
                                         torch.randn(size, rank, generator=gen) * 0.02)
                                     for i, size in enumerate(shards)})
            weight = torch.randn(sum(shards), in_features, generator=gen).to(dtype)
            x = torch.randn(tokens, in_features, generator=gen).to(dtype)
            net.append((weight, lora, x))
    return ctx, net


def step_ms(net, with_lora: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for weight, lora, x in net:
            y = F.linear(x, weight)
            if with_lora:
                lora.apply(x, y)
        best = min(best, time.thread_time() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 640])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "lora_layers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for tokens in args.tokens:
        ctx, net = build(30, 4, 8, tokens, torch.bfloat16)
        slots = np.arange(tokens) % 4
        ctx.set_step(slots)
        compiled = ctx.ops is not None
        base = step_ms(net, False, args.repeats)
        kernel = step_ms(net, True, args.repeats) if compiled else float("nan")
        with layers.lora_kernel_disabled():
            ctx.set_step(slots)
            torch_path = step_ms(net, True, args.repeats)
        rows.append({"tokens": tokens, "base_ms": round(base, 2), "lora_add_ms": round(kernel - base, 2),
                     "torch_path_ms": round(torch_path - base, 2)})
    print("| tokens | base linears (ms) | + LoRA, compiled op | + LoRA, torch path |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['base_ms']:.1f} | +{r['lora_add_ms']:.1f} ({r['lora_add_ms'] / r['base_ms']:.0%}) "
              f"| +{r['torch_path_ms']:.1f} ({r['torch_path_ms'] / r['base_ms']:.0%}) |")
    result = {"benchmark": "lora_layers", "layers": 30, "adapters": 4, "rank": 8, "dtype": "bfloat16",
              "threads": 1, "clock": "thread CPU time, best of repeats", "rows": rows, "cpu": cpu_model(),
              "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
