"""The guard of tests/gpu's modules that run Triton kernels compiled for CUDA."""

from __future__ import annotations

import os

import pytest
import torch


def require_compiled_triton() -> None:
    """At module level, with CUDA: skip the module without triton, or where this process runs
    Triton's interpreter (tests/kernels/ sets TRITON_INTERPRET=1: run tests/gpu in a process of
    its own, as benchmarks/gpu_suite.py does). Without CUDA the module's `pytestmark` skips each test."""
    if not torch.cuda.is_available():
        return
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process", allow_module_level=True)
