"""pagoda's int4/int8 GEMV against torch's packed kernels, weights streamed from DRAM as in decode.

Decode reads every weight once per step, from memory (the default model's 70 MB of packed
weights do not fit the cache); a microbenchmark that multiplies one matrix over and over
times it from cache instead. So the int4 case cycles through 60 different 576->3072
matrices (40 MB) and the int8 case multiplies the 28 MB lm_head (576->49152). One thread,
CPU time of the calling thread (robust to other processes on a shared machine), best of
5 rounds; both kernels hold the same codes (`torch_kernel=True` builds torch's layout).
A bf16 `F.linear` column gives the float reference. pagoda's kernel runs with bf16
activations (int4_gemv.cpp) and with int8 ones (q8_gemv.cpp, VNNI; where built): the
default is bf16 for 4-bit weights and int8 for the 8-bit lm_head (packed.GEMV_Q8_ACTIVATIONS,
chosen by benchmarks/quant_quality.py).

    python benchmarks/gemv_kernels.py [--rows 1 2 4 5 8 16 64] [--out benchmarks/results/gemv_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from soak import cpu_model  # the benchmarks' one CPU-name helper

from pagoda.model.quant.packed import Int4Gemv, Int4Weight, Int8Weight, int4_gemv_available, q8_gemv_available


def cpu_us(fn, calls: int, rounds: int = 5) -> float:
    """Best of `rounds` mean thread-CPU microseconds per call of `fn`."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16, 64])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gemv_kernels.json")
    args = parser.parse_args()
    if not int4_gemv_available():
        raise SystemExit("pagoda's GEMV is not built here (needs the compiled ops and AVX-512 BF16)")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    weights = [torch.randn(3072, 576) * 0.05 for _ in range(60)]
    ours4 = [Int4Weight.quantize(w) for w in weights]
    q8 = q8_gemv_available()
    ours4_q8 = [Int4Gemv(f.gemv.packed, f.gemv.scales, f.gemv.group_size, q8=True) for f in ours4] if q8 else []
    torch4 = [Int4Weight.quantize(w, torch_kernel=True) for w in weights]
    dense = [w.bfloat16() for w in weights[:30]]  # 2 bytes per weight: 30 matrices are 106 MB
    head = torch.randn(49152, 576) * 0.05
    ours8 = Int8Weight.quantize(head, q8=False)
    ours8_q8 = Int8Weight.quantize(head, q8=True) if q8 else None
    torch8 = Int8Weight.quantize(head, torch_kernel=True)
    dense8 = head.bfloat16()
    results = []

    def cell(v: float | None, width: int = 10, digits: int = 1) -> str:
        return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"

    print(f"{'weights':28s} {'rows':>4s} {'pagoda us':>10s} {'int8-act us':>11s} {'torch us':>10s} {'bf16 us':>10s}")
    for m in args.rows:
        x = torch.randn(m, 576).bfloat16()
        row = {"weights": "576->3072 int4 (x60, 40 MB)", "rows": m,
               "pagoda_us": cpu_us(lambda: [f.matmul(x) for f in ours4], 3) / len(ours4),
               "pagoda_int8_act_us": (cpu_us(lambda: [g.matmul(x) for g in ours4_q8], 3) / len(ours4_q8)
                                      if q8 else None),
               "torch_us": cpu_us(lambda: [f.matmul(x) for f in torch4], 3) / len(torch4),
               "bf16_us": cpu_us(lambda: [torch.nn.functional.linear(x, d) for d in dense], 3) / len(dense)}
        results.append(row)
        print(f"{row['weights']:28s} {m:4d} {cell(row['pagoda_us'])} {cell(row['pagoda_int8_act_us'], 11)} "
              f"{cell(row['torch_us'])} {cell(row['bf16_us'])}", flush=True)
    for m in args.rows:
        x = torch.randn(m, 576).bfloat16()
        row = {"weights": "576->49152 int8 (lm_head)", "rows": m,
               "pagoda_us": cpu_us(lambda: ours8.gemv.matmul(x), 5),
               "pagoda_int8_act_us": cpu_us(lambda: ours8_q8.gemv.matmul(x), 5) if q8 else None,
               "torch_us": cpu_us(lambda: torch8.matmul_weight_only(x), 5),
               "bf16_us": cpu_us(lambda: torch.nn.functional.linear(x, dense8), 5)}
        results.append(row)
        print(f"{row['weights']:28s} {m:4d} {cell(row['pagoda_us'], 10, 0)} {cell(row['pagoda_int8_act_us'], 11, 0)} "
              f"{cell(row['torch_us'], 10, 0)} {cell(row['bf16_us'], 10, 0)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "threads": 1, "clock": "thread CPU time",
                                    "torch": torch.__version__, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
