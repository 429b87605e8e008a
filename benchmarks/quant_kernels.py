"""Microbenchmark of the linear kernels behind pagoda's quantization methods.

For SmolLM2-135M's weight shapes and batch rows M, times ``x[M, K] @ W[N, K].T``:
bf16 ``F.linear`` (the float method), int4 groups (``_weight_int4pack_mm_for_cpu``),
int8 weight-only (``_weight_int8pack_mm``) and W8A8 (per-row int8 activations,
``_int_mm``), each as pagoda's packed forms call them (activation quantization and
output scaling included). Kernels run interleaved, round-robin, and each cell is the
*minimum* over rounds of the mean of a burst of calls: robust on a shared machine.
This sets ``pagoda.model.quant.packed.SMALL_M_MAX``.

    python benchmarks/quant_kernels.py [--rounds 7] [--out benchmarks/results/quant_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pagoda.model.quant.packed import Int4Weight, Int8Weight

SHAPES = {"qkv 576->960": (960, 576), "gate_up 576->3072": (3072, 576), "down 1536->576": (576, 1536),
          "lm_head 576->49152": (49152, 576)}


def burst_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 256])
    parser.add_argument("--out", default="benchmarks/results/quant_kernels.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        i4 = Int4Weight.quantize(w, with_w8a8=False)
        i8 = Int8Weight.quantize(w)
        for m in args.ms:
            if label.startswith("lm_head") and m > 64:
                continue
            x = torch.randn(m, k, dtype=torch.bfloat16)
            kernels = {
                "bf16": lambda: F.linear(x, w_bf16),
                "int4": lambda: i4.matmul_int4(x),
                "int8_wo": lambda: i8.matmul_weight_only(x),
                "w8a8": lambda: i8.matmul_w8a8(x).to(torch.bfloat16),
            }
            calls = max(3, int(2000 / max(1, m)))
            best = {name: float("inf") for name in kernels}
            for _ in range(args.rounds):
                for name, fn in kernels.items():
                    fn()
                    best[name] = min(best[name], burst_us(fn, calls))
            row = {"shape": label, "N": n, "K": k, "M": m, **{f"{name}_us": round(v, 1) for name, v in best.items()}}
            rows.append(row)
            print(f"{label:20s} M={m:4d} " + " ".join(f"{name}={v:8.1f}" for name, v in best.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
