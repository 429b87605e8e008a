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
import logging
from collections.abc import Iterator

import torch

from pagoda.kernels import cpu_ext

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
logger = logging.getLogger(__name__)

_switch = {"enabled": True}


def cpu_ops_for(x: torch.Tensor):
    if not x.is_cpu or x.dtype not in FUSED_DTYPES or not _switch["enabled"]:
        return None
    return cpu_ext.cpu_ops()


# The Triton module once imported (None: no triton), and per (device, dtype) whether the
# kernels passed their self-test there (triton_fused.self_test), so a GPU or Triton build that
# cannot compile or run them falls back to the torch code with one warning, as the CPU ops do.
_triton: dict = {"module": None, "tried": False, "on_cpu": False, "checked": {}}


def triton_ops_for(x: torch.Tensor):
    # The device first: CPU tensors (every call on the CPU path) leave at once.
    if not (x.is_cuda or (_triton["on_cpu"] and x.is_cpu)):
        return None
    if x.dtype not in FUSED_DTYPES or not _switch["enabled"]:
        return None
    if not _triton["tried"]:
        _triton["tried"] = True
        try:
            from pagoda.model.layers import triton_fused
        except ImportError:  # no triton: the torch code runs
            triton_fused = None
        _triton["module"] = triton_fused
    module = _triton["module"]
    if module is None:
        return None
    key = (x.device, x.dtype)
    ok = _triton["checked"].get(key)
    if ok is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return module  # no test inside a graph capture (the warm-up runs before it tested them)
        problem = module.self_test(x.device, x.dtype)
        if problem is not None:
            logger.warning("fused Triton kernels failed their self-test on %s (%s): %s; RMSNorm, rotary and "
                           "SwiGLU run the torch code there", x.device, x.dtype, problem)
        ok = _triton["checked"][key] = problem is None
    return module if ok else None


@contextlib.contextmanager
def triton_ops_on_cpu() -> Iterator[None]:
    """Within the block, CPU tensors take the Triton kernels too (tests, under TRITON_INTERPRET=1);
    the self-tests run afresh inside and after it."""
    before = _triton["on_cpu"]
    _triton["on_cpu"] = True
    _triton["checked"] = {}
    try:
        yield
    finally:
        _triton["on_cpu"] = before
        _triton["checked"] = {}


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
