"""Rotary position embedding (HF "rotate_half" layout) with rope scaling.

Supported `rope_type`s: default, linear, dynamic (NTK), llama3. The cos/sin
tables are built once for every position up to `max_position` in float32.

`dynamic` differs from HF in one documented way: HF re-derives the base for
the current sequence length once it exceeds the trained context; we derive
it once for `max_position` (vLLM does the same). Within the trained context
both are the unscaled rope, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.model.layers.fused import cpu_ops_for, triton_ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    head_dim: int
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


def rope_spec_from_hf_config(hf_config, head_dim: int) -> RopeSpec:
    """Reads rope_theta and rope_scaling / rope_parameters (transformers 4 or 5 style)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    if isinstance(scaling, dict):
        params = {**scaling, **params} if params else dict(scaling)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    original = params.get("original_max_position_embeddings") or getattr(
        hf_config, "max_position_embeddings", None
    )
    return RopeSpec(
        head_dim=head_dim,
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def compute_inv_freq(spec: RopeSpec, max_position: int) -> torch.Tensor:
    dim = spec.head_dim
    if spec.rope_type == "default":
        return _base_inv_freq(dim, spec.theta)
    if spec.rope_type == "linear":
        return _base_inv_freq(dim, spec.theta) / spec.factor
    if spec.rope_type == "dynamic":
        original = spec.original_max_position or max_position
        base = spec.theta
        if max_position > original:
            base = base * ((spec.factor * max_position / original) - (spec.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base)
    if spec.rope_type == "llama3":
        inv_freq = _base_inv_freq(dim, spec.theta)
        old_len = spec.original_max_position
        low_wavelen = old_len / spec.low_freq_factor
        high_wavelen = old_len / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
        smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope type {spec.rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    def __init__(self, spec: RopeSpec, max_position: int):
        super().__init__()
        self.spec = spec
        self.max_position = max_position
        self.build(torch.empty(0).device)

    def build(self, device: torch.device) -> None:
        """(Re)computes the float32 cos/sin tables on `device`.

        Called again after the model is materialized from the meta device.
        """
        inv_freq = compute_inv_freq(self.spec, self.max_position)
        positions = torch.arange(self.max_position, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos().to(device), persistent=False)
        self.register_buffer("sin_cache", emb.sin().to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, heads, head_dim], k: [N, kv_heads, head_dim]; returns the rotated (q, k).

        On CPU tensors the compiled op (on CUDA tensors a Triton kernel) rotates
        q and k in place (views into a fused qkv output are fine: only the last
        dim must be contiguous) with the same roundings as the torch code; use
        the returned tensors.
        """
        if (k.dtype == q.dtype and q.dim() == 3 and k.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
                and self.cos_cache.device == q.device):
            triton_ops = triton_ops_for(q)
            if triton_ops is not None:  # CUDA: one Triton kernel rotates q and k in place
                triton_ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
                return q, k
        ops = cpu_ops_for(q)
        if (ops is not None and k.dtype == q.dtype and q.dim() == 3 and k.dim() == 3
                and q.stride(-1) == 1 and k.stride(-1) == 1 and self.cos_cache.is_cpu):
            ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        return self.forward_torch(positions, q, k)

    def forward_torch(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
