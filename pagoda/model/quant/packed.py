"""Packed weight forms and their matmuls (torch's CPU kernels).

Each form computes ``x @ W.T`` for ``x[M, K]`` without materializing a float ``W``.
Kernels (measured on an AMD EPYC Zen 5, 2 threads; docs/quantization.md):

- weight-only, ``torch._weight_int4pack_mm_for_cpu`` / ``torch._weight_int8pack_mm``
  with bf16 activations: ~3x faster than a bf16 matmul at M=1 (they read 0.5 / 1 byte
  per weight instead of 2), but 1.5-2.5x *slower* than bf16 at M >= 16. Quality:
  perplexity within 0.15% of the float model.
- W8A8, int8 weights times per-row dynamically quantized int8 activations with
  ``torch._int_mm`` (VNNI): ~2x faster than bf16 at M >= 16, but the int8
  activations cost +3.2% perplexity on SmolLM2-135M. So only the ``int8`` method
  uses it, for ``M > SMALL_M_MAX``; every other form stays weight-only at every M.

Invariant: a form holds integer weights and small per-row / per-group scales, plus,
for small models only, ``dense``: a bf16 copy of the same (dequantized) weights that
serves batches of more than SMALL_M_MAX rows, where torch's packed kernels lose to a
bf16 matmul and W8A8 loses quality (`pagoda.model.quant.methods.DENSE_COPY_MAX_BYTES`
says when; a packed large-batch kernel would retire it). The weight-only kernels are fast only with bf16 activations (float32 ones take a
scalar path, ~50x slower), so activations are cast to bf16 and results back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.model.quant.gguf_blocks import Int4Codes

# Rows up to which the weight-only kernels beat W8A8 (benchmarks/quant_kernels.py);
# forms that use W8A8 switch to it above this.
SMALL_M_MAX = 8

_KERNEL_DTYPE = torch.bfloat16


def _as_2d(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


@dataclass
class Int8Weight:
    """``W[n, k] ~= scale[n] * q[n, k]``, q int8 in [-127, 127] (symmetric, per output row)."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]
    scale_kernel: torch.Tensor  # the same scales in bf16, as _weight_int8pack_mm takes them
    w8a8_at_large_m: bool = False  # M > SMALL_M_MAX: W8A8 (fast, less exact) or weight-only
    dense: torch.Tensor | None = None  # bf16 [N, K] for M > SMALL_M_MAX (small models; module docstring)

    @classmethod
    def quantize(cls, weight: torch.Tensor, w8a8_at_large_m: bool = False) -> Int8Weight:
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale, scale.to(_KERNEL_DTYPE), w8a8_at_large_m)

    @property
    def nbytes(self) -> int:
        dense = self.dense.numel() * 2 if self.dense is not None else 0
        return self.q.numel() + self.scale.numel() * 6 + dense

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of W in ``dtype`` (an embedding lookup on a tied lm_head)."""
        if self.dense is not None:
            return self.dense[ids].to(dtype)
        return (self.q[ids].float() * self.scale[ids].unsqueeze(-1)).to(dtype)

    def matmul_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(_KERNEL_DTYPE), self.q, self.scale_kernel)

    def matmul_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x_scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
        xq = torch.round(xf / x_scale).to(torch.int8)
        acc = torch._int_mm(xq, self.q.t())
        return acc.float().mul_(x_scale).mul_(self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2, lead = _as_2d(x)
        if self.dense is not None and x2.shape[0] > SMALL_M_MAX:
            y = torch.nn.functional.linear(x2.to(self.dense.dtype), self.dense)
        elif self.w8a8_at_large_m and x2.shape[0] > SMALL_M_MAX:
            y = self.matmul_w8a8(x2)
        else:
            y = self.matmul_weight_only(x2)
        return y.to(x.dtype).reshape(*lead, -1)


@dataclass
class Int4Weight:
    """Group-wise 4-bit weights in ``_weight_int4pack_mm_for_cpu``'s layout.

    torch's kernel computes ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``
    (``g = k // group_size``; ``scales_zeros[..., 0]`` / ``[..., 1]``, in the
    activation dtype), so codes ``w = s * q + o`` (GGUF Q4_1: ``d * q + m``) map
    exactly with ``zero = o + 8 * s`` up to rounding scale and zero to bf16.
    ``w8a8``: an int8 per-row copy of the same weights for W8A8 at large M (None: int4
    at every M; what the built-in methods use, for quality).
    """

    packed: torch.Tensor  # uint8 [N, K // 2]
    scales_zeros: torch.Tensor  # bf16 [K // group_size, N, 2]
    group_size: int
    w8a8: Int8Weight | None
    dense: torch.Tensor | None = None  # bf16 [N, K] for M > SMALL_M_MAX (small models; module docstring)

    @classmethod
    def from_codes(cls, codes: Int4Codes, with_w8a8: bool = False) -> Int4Weight:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.q.to(torch.int32).contiguous(), 1)
        zero = codes.offset + 8.0 * codes.scale
        scales_zeros = torch.stack([codes.scale.t(), zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
        w8a8 = Int8Weight.quantize(codes.dequantize(), w8a8_at_large_m=True) if with_w8a8 else None
        return cls(packed, scales_zeros, codes.group_size, w8a8)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32, with_w8a8: bool = False) -> Int4Weight:
        """Asymmetric min/max 4-bit groups of ``group_size`` along K (like GGUF Q4_1)."""
        return cls.from_codes(quantize_int4_codes(weight, group_size), with_w8a8)

    @property
    def nbytes(self) -> int:
        extra = self.w8a8.nbytes if self.w8a8 is not None else 0
        extra += self.dense.numel() * 2 if self.dense is not None else 0
        return self.packed.numel() + self.scales_zeros.numel() * 2 + extra

    def dequantize_bf16(self) -> torch.Tensor:
        """W [N, K] in bf16, exactly as the int4 kernel sees it (W.T = I @ W.T through it)."""
        k = self.packed.shape[1] * 2
        return self.matmul_int4(torch.eye(k, dtype=_KERNEL_DTYPE)).t().contiguous()

    def matmul_int4(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x.to(_KERNEL_DTYPE), self.packed, self.group_size,
                                                 self.scales_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == _KERNEL_DTYPE and x.shape[0] <= SMALL_M_MAX:
            # The decode hot path (bf16 rows, few of them): one kernel call, no casts or reshapes.
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        x2, lead = _as_2d(x)
        if self.dense is not None and x2.shape[0] > SMALL_M_MAX:
            y = torch.nn.functional.linear(x2.to(self.dense.dtype), self.dense)
        elif x2.shape[0] <= SMALL_M_MAX or self.w8a8 is None:
            y = self.matmul_int4(x2)
        else:
            y = self.w8a8.matmul_w8a8(x2)
        return y.to(x.dtype).reshape(*lead, -1)


def quantize_int4_codes(weight: torch.Tensor, group_size: int) -> Int4Codes:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of the int4 group size {group_size}.")
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Codes(q.reshape(n, k), scale, lo, group_size)
