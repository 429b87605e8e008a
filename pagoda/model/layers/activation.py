"""SwiGLU on a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.model.layers.fused import cpu_ops_for, triton_ops_for


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where the last dim holds [gate | up].

    CPU tensors take one compiled pass (`torch.ops.pagoda.silu_and_mul`, same
    roundings as the torch code), CUDA tensors one Triton kernel.
    """
    if gate_up.dim() == 2 and gate_up.stride(-1) == 1:
        triton_ops = triton_ops_for(gate_up)
        if triton_ops is not None:  # CUDA: one Triton kernel
            return triton_ops.silu_and_mul(gate_up)
    ops = cpu_ops_for(gate_up)
    if ops is not None and gate_up.dim() <= 2 and gate_up.stride(-1) == 1:
        return ops.silu_and_mul(gate_up)
    return silu_and_mul_torch(gate_up)
