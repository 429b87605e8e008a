"""Attention backends behind one interface, and the choice between them.

A backend turns the runner's `StepLayout` into its own metadata once per step
(`build_metadata`), then runs every layer's attention with it (`forward`).
Backends:

- ``torch`` (`torch_paged.py`): gathers blocks into dense copies and calls
  SDPA; runs anywhere and is the reference every other backend is tested
  against.
- ``cpu`` (`cpu_paged.py`): the compiled kernel in
  ``pagoda/csrc/cpu/attention.cpp``, reading K/V blocks in place.
- ``triton`` (`triton_paged.py`): Triton kernels for CUDA, reading K/V blocks
  in place; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``,
  for tests).

``auto`` picks ``cpu`` on a CPU device where the compiled kernel loads,
``triton`` on a CUDA device where triton imports, else ``torch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pagoda.config import ATTENTION_BACKENDS, ConfigError
from pagoda.model.attention.metadata import AttentionMetadata, StepLayout

class AttentionBackend(ABC):
    """One way of computing paged attention. Stateless across steps: everything a step
    needs is in the metadata it builds."""

    name: str

    @abstractmethod
    def build_metadata(self, layout: StepLayout) -> AttentionMetadata:
        """This backend's metadata for one step (built once, used by every layer)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [N, H, D]; k, v: [N, KVH, D] (this step's tokens); caches
        [num_blocks, block_size, KVH, D]. Writes this step's K/V into the caches
        first, then returns the attention output [N, H * D] in q's dtype."""


def select_attention_backend(
    name: str, device: torch.device, num_heads: int, num_kv_heads: int
) -> AttentionBackend:
    """The backend `name` ("auto", "torch", "cpu" or "triton") resolves to on `device`.

    Raises ConfigError when "cpu" or "triton" is asked for explicitly and cannot run here.
    """
    # Backends import this module for the base class: import them here, not at the top.
    from pagoda.model.attention.cpu_paged import CpuAttentionBackend, load_cpu_attention_op
    from pagoda.model.attention.torch_paged import TorchAttentionBackend

    if name not in ATTENTION_BACKENDS:
        raise ConfigError("attention_backend", name, f"must be one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "torch":
        return TorchAttentionBackend(num_heads // num_kv_heads)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        backend = _triton_backend(name, device, num_heads, num_kv_heads)
        if backend is not None:
            return backend
    if device.type != "cpu":
        if name == "cpu":
            raise ConfigError("attention_backend", name, f"runs on device='cpu' only (this engine runs on "
                                                         f"{device.type}); use 'torch' or 'auto'")
        return TorchAttentionBackend(num_heads // num_kv_heads)
    op = load_cpu_attention_op()
    if op is not None:
        return CpuAttentionBackend(op)
    if name == "cpu":
        raise ConfigError("attention_backend", name,
                          "its compiled kernel could not be built or loaded on this machine (the log says why; "
                          "PAGODA_DISABLE_CPU_KERNELS=1 also turns it off); use 'torch' or 'auto'")
    return TorchAttentionBackend(num_heads // num_kv_heads)


def _triton_backend(name: str, device: torch.device, num_heads: int, num_kv_heads: int) -> AttentionBackend | None:
    """The Triton backend where it can run: CUDA with triton importable, or CPU under Triton's
    interpreter (TRITON_INTERPRET=1 when triton_paged was first imported; tests). None for
    "auto" where it cannot; a ConfigError saying why for "triton"."""
    import os

    problem = None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        problem = ("runs on CUDA devices (on CPU only under Triton's interpreter, TRITON_INTERPRET=1, "
                   "for tests); use 'cpu', 'torch' or 'auto'")
    elif device.type not in ("cpu", "cuda"):
        problem = f"runs on CUDA devices (this engine runs on {device.type}); use 'torch' or 'auto'"
    else:
        try:
            from pagoda.model.attention.triton_paged import TritonAttentionBackend, interpreter_active
        except ImportError as error:
            problem = f"triton cannot be imported ({error}); pip install triton, or use 'torch' or 'auto'"
        else:
            if device.type == "cpu" and not interpreter_active():
                problem = ("its kernels were built for the GPU (TRITON_INTERPRET=1 must be set before "
                           "pagoda.model.attention.triton_paged is first imported)")
            elif device.type == "cuda" and interpreter_active():
                problem = "TRITON_INTERPRET=1 is set: its kernels run only on CPU tensors in this process"
            else:
                return TritonAttentionBackend(num_heads, num_kv_heads)
    if name == "triton":
        raise ConfigError("attention_backend", name, problem)
    return None
