"""Which tensors may take the fused ops: the compiled CPU ops
(pagoda/csrc/cpu/{norm,rotary,activation}.cpp) or, on CUDA, the Triton kernels
(pagoda/model/layers/triton_fused.py).

`cpu_ops_for(x)` is ``torch.ops.pagoda`` when `x` is a CPU tensor of a dtype
those ops support and the extension loaded, else None: the caller then runs
its torch code, which the compiled ops reproduce rounding for rounding
(tests/unit/test_fused_ops.py). `triton_ops_for(x)` is the triton_fused module
when `x` is a CUDA tensor of such a dtype and Triton imports (and, for tests,
a CPU tensor inside `triton_ops_on_cpu()` under Triton's interpreter), else None.

`fused_ops_disabled()` forces the torch code for these layers only (the
side-by-side benchmark and tests); `PAGODA_DISABLE_CPU_KERNELS=1` turns off
every compiled CPU op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pagoda.kernels import cpu_ext

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_switch = {"enabled": True}


def cpu_ops_for(x: torch.Tensor):
    if not x.is_cpu or x.dtype not in FUSED_DTYPES or not _switch["enabled"]:
        return None
    return cpu_ext.cpu_ops()


_triton = {"module": None, "tried": False, "on_cpu": False}


def triton_ops_for(x: torch.Tensor):
    if x.dtype not in FUSED_DTYPES or not _switch["enabled"]:
        return None
    if not (x.is_cuda or (_triton["on_cpu"] and x.is_cpu)):
        return None
    if not _triton["tried"]:
        _triton["tried"] = True
        try:
            from pagoda.model.layers import triton_fused
        except ImportError:  # no triton: the torch code runs
            triton_fused = None
        _triton["module"] = triton_fused
    return _triton["module"]


@contextlib.contextmanager
def triton_ops_on_cpu() -> Iterator[None]:
    """Within the block, CPU tensors take the Triton kernels too (tests, under TRITON_INTERPRET=1)."""
    before = _triton["on_cpu"]
    _triton["on_cpu"] = True
    try:
        yield
    finally:
        _triton["on_cpu"] = before


def fused_enabled() -> bool:
    """False inside `fused_ops_disabled()`."""
    return _switch["enabled"]


@contextlib.contextmanager
def switched_off(switch: dict) -> Iterator[None]:
    """Within the block, ``switch["enabled"]`` is False (not thread-scoped); restored after."""
    before = switch["enabled"]
    switch["enabled"] = False
    try:
        yield
    finally:
        switch["enabled"] = before


def fused_ops_disabled():
    """Within the block, norm / rotary / SwiGLU run their torch code (not thread-scoped)."""
    return switched_off(_switch)
