"""RMSNorm, computed in float32 and cast back, exactly as HF Llama/Qwen do.

On CPU tensors a compiled op does the same arithmetic in one pass
(`torch.ops.pagoda.rms_norm`), and the residual add of the decoder is fused
into the norm (`fused_add_rms_norm`, as vLLM does); on CUDA tensors a Triton
kernel does both (layers/triton_fused.py); elsewhere, or without the extension
or Triton, the torch code below runs.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.model.layers.fused import cpu_ops_for, triton_ops_for


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given `residual`, (norm(x + residual), x + residual).

        The fused form may reuse the storage of `x` and `residual` (use the
        returned tensors, not the arguments, afterwards). `x + residual` is
        rounded to the activation dtype before the norm, as HF's separate add.
        """
        weight = self.weight
        if x.dtype == weight.dtype and x.dim() in (2, 3) and x.stride(-1) == 1:
            triton_ops = triton_ops_for(x)
            if triton_ops is not None:  # CUDA: one Triton kernel
                if residual is None:
                    return triton_ops.rms_norm(x, weight, self.eps)
                if (x.dim() == 2 and residual.dtype == x.dtype and residual.shape == x.shape
                        and residual.stride(-1) == 1):
                    triton_ops.fused_add_rms_norm(x, residual, weight, self.eps)
                    return x, residual
        ops = cpu_ops_for(x) if x.dtype == weight.dtype and x.dim() <= 3 else None
        if residual is None:
            if ops is not None and x.stride(-1) == 1:
                return ops.rms_norm(x, weight, self.eps)
            return rms_norm_torch(x, weight, self.eps)
        if (ops is not None and x.stride(-1) == 1 and residual.stride(-1) == 1
                and residual.dtype == x.dtype and x.shape == residual.shape):
            ops.fused_add_rms_norm(x, residual, weight, self.eps)
            return x, residual
        residual = x + residual
        return rms_norm_torch(residual, weight, self.eps), residual
