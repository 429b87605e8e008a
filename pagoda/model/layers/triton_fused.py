"""RMSNorm (with the residual add), rotary embedding and SwiGLU as Triton kernels, for CUDA.

On a GPU the torch code of these layers launches ~30 small kernels per decoder layer (casts,
a reduction, the rotate-half concatenation, index lookups of the cos/sin tables): measured on
an H200 (benchmarks/results/gpu/profile_batch1.txt), they took ~45% of a batch-1 decode step of
a Llama-3.2-1B-shaped model inside its CUDA graph. Each op here is one kernel, and each rounds
where the torch code rounds (to the activation dtype after every op of the torch code), so the
results are the torch code's up to the order of the sum in the norm's reduction and fp32
contractions (tests/kernels/test_triton_fused.py compares them under Triton's interpreter).

- ``rms_norm(x, weight, eps)`` -> a new tensor (x 2-D, or 3-D per head); ``fused_add_rms_norm(x, residual, weight, eps)``
  in place: ``residual <- x + residual`` (rounded to the dtype), ``x <- norm(residual)``, as the
  CPU op does (pagoda/csrc/cpu/norm.cpp). Rows of x: [tokens, hidden], last dim contiguous.
- ``rotary_embedding(positions, q, k, cos_cache, sin_cache)`` rotates q [tokens, heads, dim]
  and k [tokens, kv_heads, dim] in place (HF's rotate-half layout; views into a fused qkv
  output are fine: only the last dim must be contiguous).
- ``silu_and_mul(gate_up)`` -> silu(gate) * up, gate_up [tokens, 2 * inter] = [gate | up].

pagoda.model.layers.fused.triton_ops_for(x) says when a layer takes them (CUDA tensors; on
CPU tensors under the interpreter only when a test asks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 `x` rounded to `dtype`, to nearest even as torch rounds. bf16 by hand: Triton's
    interpreter truncates fp32 -> bf16 casts (Triton 3.9), so the kernels round the bits
    themselves and then cast exactly; the same code runs compiled."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN stays a NaN (the carry would turn 0x7FFFFFFF into -0.0, a low-bits payload into Inf).
        bits = tl.where(x != x, tl.full(x.shape, 0x7FC00000, tl.uint32), bits)
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, out_ptr, w_ptr, stride_x, stride_xh, heads, stride_r, stride_o, hidden,
                     eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # Row `row` of the output is (token row // heads, head row % heads) of x: x may be
    # [tokens, hidden] (heads 1) or a [tokens, heads, head_dim] view (Qwen3's q/k norms).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x_row = x_ptr + (row // heads) * stride_x + (row % heads) * stride_xh
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:  # the decoder's residual add, rounded to the dtype as torch's add is
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = _round(x.to(tl.float32) + r.to(tl.float32), dtype)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden
    normed = _round(h * tl.rsqrt(variance + eps), dtype)  # h.to(dtype) in the torch code
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, _round(w.to(tl.float32) * normed.to(tl.float32), dtype), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [tokens, hidden] with a contiguous last dim, not {tuple(x.shape)} "
                         f"with strides {x.stride()}")


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A new contiguous tensor of x's shape; x: [tokens, hidden] or [tokens, heads, head_dim]
    (last dim contiguous, other strides free)."""
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D or 3-D with a contiguous last dim, not {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    heads, stride_h = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // hidden if hidden else 0
    block = triton.next_power_of_2(hidden)
    if rows:
        _rms_norm_kernel[(rows,)](x, x, out, weight, x.stride(0), stride_h, heads, 0, hidden, hidden, eps,
                                  HAS_RESIDUAL=False, BLOCK=block, num_warps=_num_warps(block))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- x + residual; x <- rms_norm(residual)."""
    _check_rows(x, "x")
    _check_rows(residual, "residual")
    block = triton.next_power_of_2(x.shape[-1])
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](x, residual, x, weight, x.stride(0), 0, 1, residual.stride(0), x.stride(0),
                                        x.shape[-1], eps, HAS_RESIDUAL=True, BLOCK=block,
                                        num_warps=_num_warps(block))


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_P2)
    d_mask = d < HALF
    # The tables hold cat(freqs, freqs): the first half serves both halves.
    cos = tl.load(cos_ptr + pos * stride_cache + d, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cache + d, mask=d_mask, other=0.0)
    heads = tl.arange(0, HEADS_P2)
    for which in tl.static_range(2):  # q, then k
        if which == 0:
            base = q_ptr + token * stride_qt
            stride_h = stride_qh
            n = num_q_heads
        else:
            base = k_ptr + token * stride_kt
            stride_h = stride_kh
            n = num_k_heads
        mask = (heads[:, None] < n) & d_mask[None, :]
        first = base + heads[:, None] * stride_h + d[None, :]
        x1 = tl.load(first, mask=mask, other=0.0)
        x2 = tl.load(first + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        c = _round(cos, dtype).to(tl.float32)[None, :]  # cos.to(q.dtype) in the torch code
        s = _round(sin, dtype).to(tl.float32)[None, :]
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        # q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-x2, x1); each product rounded
        out1 = _round(_round(a * c, dtype).to(tl.float32) + _round(-b * s, dtype).to(tl.float32), dtype)
        out2 = _round(_round(b * c, dtype).to(tl.float32) + _round(a * s, dtype).to(tl.float32), dtype)
        tl.store(first, out1, mask=mask)
        tl.store(first + HALF, out2, mask=mask)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> None:
    """In place on q [tokens, heads, dim] and k [tokens, kv_heads, dim] (last dims contiguous)."""
    if q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype != k.dtype:
        raise ValueError("q and k must be [tokens, heads, head_dim] of one dtype with contiguous last dims")
    if positions.dim() != 1 or positions.stride(0) != 1 or positions.device != q.device:
        raise ValueError(f"positions must be a contiguous 1-D tensor on {q.device}")
    # Positions are not bounds-checked here: the engine keeps them below max_model_len, which
    # the tables cover (RotaryEmbedding is built for max_position_embeddings or more).
    if q.shape[0] != k.shape[0] or q.shape[0] != positions.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree")
    dim = q.shape[-1]
    if dim % 2 or cos_cache.shape[-1] != dim or cos_cache.stride(-1) != 1 or sin_cache.stride() != cos_cache.stride():
        raise ValueError(f"head_dim {dim} must be even and match contiguous cos/sin tables {tuple(cos_cache.shape)}")
    if q.shape[0]:
        half = dim // 2
        heads = triton.next_power_of_2(max(q.shape[1], k.shape[1]))
        _rotary_kernel[(q.shape[0],)](positions, q, k, cos_cache, sin_cache, q.stride(0), q.stride(1),
                                      k.stride(0), k.stride(1), cos_cache.stride(0), q.shape[1], k.shape[1],
                                      HALF=half, HALF_P2=triton.next_power_of_2(half), HEADS_P2=heads,
                                      num_warps=4)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), dtype)  # F.silu: fp32 inside, rounded to the dtype
    tl.store(out_ptr + row * stride_o + offs, _round(silu.to(tl.float32) * up.to(tl.float32), dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    shape = gate_up.shape
    x = gate_up.reshape(-1, shape[-1])
    _check_rows(x, "gate_up")
    inter = shape[-1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x.shape[0]:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter,
                                                                       BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], inter)


def self_test(device: torch.device, dtype: torch.dtype) -> str | None:
    """Runs each kernel once on small inputs on `device` in `dtype` against the layers' torch
    code: None when they compile, run and agree, else what went wrong (the layers then use
    the torch code there: pagoda.model.layers.fused.triton_ops_for)."""
    from pagoda.model.layers.activation import silu_and_mul_torch
    from pagoda.model.layers.norm import rms_norm_torch
    from pagoda.model.layers.rotary import RopeSpec, RotaryEmbedding

    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=gen).to(device=device, dtype=dtype)
        residual = torch.randn(3, 64, generator=gen).to(device=device, dtype=dtype)
        weight = torch.rand(64, generator=gen).to(device=device, dtype=dtype) + 0.5
        checks = [("rms_norm", rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6))]
        want = rms_norm_torch(x + residual, weight, 1e-6)
        fused_x, fused_residual = x.clone(), residual.clone()
        fused_add_rms_norm(fused_x, fused_residual, weight, 1e-6)
        checks.append(("fused_add_rms_norm", fused_x, want))
        checks.append(("silu_and_mul", silu_and_mul(x), silu_and_mul_torch(x)))
        q, k = x.view(3, 2, 32).clone(), residual.view(3, 2, 32)[:, :1].clone()
        positions = torch.tensor([0, 5, 9], device=device)
        rope = RotaryEmbedding(RopeSpec(head_dim=32, theta=10000.0), 16)
        rope.build(device)
        want_q, want_k = rope.forward_torch(positions, q, k)
        rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
        checks += [("rotary_embedding q", q, want_q), ("rotary_embedding k", k, want_k)]
        for name, got, expected in checks:
            if not torch.allclose(got.float(), expected.float(), atol=5e-2, rtol=5e-2):
                return f"{name} disagrees with the torch code"
    except Exception as error:  # noqa: BLE001 - any failure (compile, launch, driver) means: not here
        return f"{type(error).__name__}: {error}"
    return None
