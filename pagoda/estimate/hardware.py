"""Accelerators for the estimator: peak dense TFLOP/s per dtype, memory, bandwidth.

Figures are the vendors' dense (no sparsity) tensor-core peaks. `cpu` is not
in the table: it is measured on this machine (a large matmul per dtype and a
large tensor copy), since CPUs differ too much for one row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Accelerator:
    name: str
    tflops: dict[str, float]  # dtype name -> dense peak TFLOP/s
    memory_gb: float
    bandwidth_gbs: float
    notes: str = ""
    measured: dict = field(default_factory=dict)

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for `dtype`; int8/int4 weights compute in the 16-bit rate (weight-only quantization)."""
        compute = {"int8": "bf16", "int4": "bf16"}.get(dtype, dtype)
        if compute == "fp16" and "fp16" not in self.tflops:
            compute = "bf16"
        if compute not in self.tflops:
            raise ValueError(f"dtype={dtype!r} has no peak on {self.name}: it has {', '.join(self.tflops)}")
        return self.tflops[compute] * 1e12

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


def _gpu(name: str, bf16: float, memory_gb: float, bandwidth_gbs: float, fp8: float | None = None,
         fp32: float | None = None) -> Accelerator:
    tflops = {"bf16": bf16, "fp16": bf16}
    if fp8 is not None:
        tflops["fp8"] = fp8
    if fp32 is not None:
        tflops["fp32"] = fp32
    return Accelerator(name, tflops, memory_gb, bandwidth_gbs)


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in [
    _gpu("A10", 125, 24, 600, fp32=31.2),
    _gpu("L4", 121, 24, 300, fp8=242, fp32=30.3),
    _gpu("L40S", 362, 48, 864, fp8=733, fp32=91.6),
    _gpu("A100-40GB", 312, 40, 1555, fp32=19.5),
    _gpu("A100-80GB", 312, 80, 2039, fp32=19.5),
    _gpu("H100-SXM", 989, 80, 3350, fp8=1979, fp32=67),
    _gpu("H100-PCIe", 756, 80, 2000, fp8=1513, fp32=51),
    _gpu("H200", 989, 141, 4800, fp8=1979, fp32=67),
    _gpu("RTX-4090", 165, 24, 1008, fp8=330, fp32=82.6),
]}


def lookup(name: str) -> Accelerator:
    """A table entry by name (case and '-'/'_'/' ' insensitive)."""
    def key(text: str) -> str:
        return text.lower().replace("_", "-").replace(" ", "-")

    for accelerator in ACCELERATORS.values():
        if key(accelerator.name) == key(name):
            return accelerator
    raise ValueError(f"gpu={name!r} is not in the table; known: {', '.join(ACCELERATORS)}, cpu "
                     "(or give --tflops, --bandwidth and --memory)")


def custom(tflops: float, bandwidth_gbs: float, memory_gb: float, name: str = "custom") -> Accelerator:
    return Accelerator(name, {"bf16": tflops, "fp16": tflops, "fp32": tflops, "fp8": tflops}, memory_gb,
                       bandwidth_gbs)


def measure_cpu(matmul_size: int = 2048, copy_mib: int = 512, repeats: int = 3,
                dtypes: tuple[str, ...] = ("fp32", "bf16")) -> Accelerator:
    """This machine's CPU: best-of-`repeats` linear-layer rate per dtype and copy bandwidth (read + write).

    Timed with F.linear (x @ W.T, the layout of model weights): on some CPUs
    torch's plain bf16 `a @ b` takes a path 20x slower than the one layers use.
    """
    import os

    import torch
    import torch.nn.functional as F

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    tflops = {}
    for name in dtypes:
        size = matmul_size if name == "fp32" else matmul_size // 2  # emulated 16-bit math can be slow
        x = torch.randn(size, size, dtype=torch_dtypes[name])
        w = torch.randn(size, size, dtype=torch_dtypes[name])
        F.linear(x, w)
        best = min(_timed(lambda: F.linear(x, w)) for _ in range(repeats))
        tflops[name] = 2 * size**3 / best / 1e12
    if "bf16" in tflops and "fp16" not in tflops:
        tflops["fp16"] = tflops["bf16"]
    source = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    bandwidth = 2 * source.numel() * 4 / best / 1e9
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return Accelerator("cpu", tflops, memory_gb, bandwidth,
                       notes=f"measured: linear {matmul_size}^3 (16-bit: {matmul_size // 2}^3), "
                             f"{copy_mib} MiB copy, {torch.get_num_threads()} threads",
                       measured={"threads": torch.get_num_threads()})


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
