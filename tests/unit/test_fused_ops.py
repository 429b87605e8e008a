"""The compiled fused CPU ops (pagoda/csrc/cpu/{norm,rotary,activation}.cpp) against their torch code.

bf16/fp16 results must be bitwise those of the torch code (the ops round at
the same places); measured exceptions are allowed explicitly:
- rms_norm sums the squares in another order than torch, and torch's own
  vectorized rsqrt is not 1/sqrt (its scalar tail is): the float32 scale may
  differ in its last bits, so fp32 outputs agree to a few ulp and a 16-bit
  output may, rarely, round the other way (1 ulp in h, so up to 2 ulp after
  the multiply by the weight);
- silu's float32 tail (sizes not a multiple of the vector) uses std::exp as
  torch's scalar loop does, but torch's loop splits differently: 1 ulp, rarely.
Rotary and the residual add are bitwise in every dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels import cpu_ext
from pagoda.model.layers.activation import silu_and_mul, silu_and_mul_torch
from pagoda.model.layers.fused import fused_ops_disabled
from pagoda.model.layers.norm import RMSNorm, rms_norm_torch
from pagoda.model.layers.rotary import RopeSpec, RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


@pytest.fixture(scope="module")
def ops():
    ops = cpu_ext.cpu_ops()
    if ops is None or not hasattr(ops, "rms_norm"):
        pytest.skip("compiled CPU ops are not available on this machine")
    return ops


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = torch.int32 if a.dtype == torch.float32 else torch.int16
    diff = (a.contiguous().view(as_int).long() - b.contiguous().view(as_int).long()).abs()
    return int(diff.max()) if diff.numel() else 0


def norm_ulp_limit(dtype):
    # a 16-bit h that rounds the other way moves weight * h by up to 2 ulp
    return 8 if dtype == torch.float32 else 2


SHAPES = [(1, 576), (7, 77), (33, 1000), (256, 576), (3, 5), (2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(ops, dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype)
    out, ref = ops.rms_norm(x, w, EPS), rms_norm_torch(x, w, EPS)
    assert out.dtype == dtype and out.shape == ref.shape
    assert max_ulp(out, ref) <= norm_ulp_limit(dtype)
    if dtype != torch.float32:  # a flip of rounding is rare: < 0.1% of elements
        assert (out != ref).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_heads(ops, dtype):
    """Qwen3's q_norm: [N, heads, head_dim] views into a fused qkv output."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(9, 15 * 32, generator=g).to(dtype)
    q = qkv[:, : 8 * 32].view(9, 8, 32)
    w = (torch.randn(32, generator=g) + 1).to(dtype)
    assert not q.is_contiguous()
    out = ops.rms_norm(q, w, EPS)
    assert out.is_contiguous()
    assert max_ulp(out, rms_norm_torch(q, w, EPS)) <= norm_ulp_limit(dtype)
    rows = torch.randn(5, 200, generator=g).to(dtype)[:, 10:110]  # strided rows, 2-D
    assert max_ulp(ops.rms_norm(rows, w.new_ones(100), EPS), rms_norm_torch(rows, w.new_ones(100), EPS)) \
        <= norm_ulp_limit(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm(ops, dtype, shape):
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    r = (torch.randn(shape, generator=g) * 5).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype)
    ref_residual = r + x  # HF: residual + hidden_states
    ref = rms_norm_torch(ref_residual, w, EPS)
    x2, r2 = x.clone(), r.clone()
    ops.fused_add_rms_norm(x2, r2, w, EPS)
    assert torch.equal(r2, ref_residual)
    assert max_ulp(x2, ref) <= norm_ulp_limit(dtype)


def test_rms_norm_rejects_bad_inputs(ops):
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), EPS)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rms_norm(torch.randn(16, 4).t(), torch.ones(16), EPS)
    with pytest.raises(RuntimeError, match="differ"):
        ops.fused_add_rms_norm(x, torch.randn(3, 16), torch.ones(16), EPS)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.rms_norm(x.double(), torch.ones(16, dtype=torch.float64), EPS)


def _qkv_views(n, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return qkv, q.view(n, hq, d), k.view(n, hk, d), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 96, 16, 6])
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rotary_in_place_matches_torch(ops, dtype, head_dim, rope_type):
    spec = RopeSpec(head_dim=head_dim, theta=10000.0, rope_type=rope_type, factor=8.0,
                    original_max_position=256)
    rope = RotaryEmbedding(spec, 4096)
    n, hq, hk = 37, 9, 3
    _, q, k, v = _qkv_views(n, hq, hk, head_dim, dtype, head_dim)
    positions = torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(1))
    ref_q, ref_k = rope.forward_torch(positions, q, k)
    v_before = v.clone()
    ops.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(v, v_before)  # the v part of the qkv buffer is untouched


def test_rotary_contiguous_and_int32_positions(ops):
    rope = RotaryEmbedding(RopeSpec(head_dim=32, theta=10000.0), 512)
    q = torch.randn(5, 4, 32, dtype=torch.bfloat16)
    k = torch.randn(5, 2, 32, dtype=torch.bfloat16)
    positions = torch.tensor([0, 1, 2, 511, 7], dtype=torch.int32)
    ref_q, ref_k = rope.forward_torch(positions.long(), q, k)
    ops.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)


def test_rotary_rejects_bad_inputs(ops):
    rope = RotaryEmbedding(RopeSpec(head_dim=16, theta=10000.0), 64)
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.rotary_embedding(torch.tensor([0, 64]), q, k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(RuntimeError, match=r"must be \[2, heads, 16\]"):
        ops.rotary_embedding(torch.tensor([0, 1]), q, torch.randn(2, 1, 8), rope.cos_cache, rope.sin_cache)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rotary_embedding(torch.tensor([0, 1]), torch.randn(2, 16, 2).transpose(1, 2), k,
                             rope.cos_cache, rope.sin_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (16, 2 * 1536), (5, 2 * 77), (3, 2 * 1000), (2, 2)])
def test_silu_and_mul(ops, dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    out, ref = ops.silu_and_mul(x), silu_and_mul_torch(x)
    assert out.shape == ref.shape and out.is_contiguous()
    if dtype == torch.float32:
        assert max_ulp(out, ref) <= 1
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_strided_rows_and_1d(ops, dtype):
    x = torch.randn(6, 400).to(dtype)[:, 50:306]  # rows of 256, stride 400
    assert max_ulp(ops.silu_and_mul(x), silu_and_mul_torch(x)) <= (1 if dtype == torch.float32 else 0)
    y = torch.randn(64).to(dtype)
    assert max_ulp(ops.silu_and_mul(y), silu_and_mul_torch(y)) <= (1 if dtype == torch.float32 else 0)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_and_mul(torch.randn(2, 7))


# The layers: compiled op on CPU, torch code when disabled; same results.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_fused_vs_fallback(ops, dtype):
    norm = RMSNorm(576, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.3 + 1)
    x, r = torch.randn(1, 576).to(dtype), torch.randn(1, 576).to(dtype)
    with fused_ops_disabled():
        ref_n = norm(x)
        ref_n2, ref_r = norm(x.clone(), r.clone())
        ref_s = silu_and_mul(torch.ones(1, 8, dtype=dtype))
    # The norms sum in another order than torch (module docstring): a few ulp apart at most.
    assert max_ulp(norm(x), ref_n) <= norm_ulp_limit(dtype)
    n2, r2 = norm(x.clone(), r.clone())
    assert max_ulp(n2, ref_n2) <= norm_ulp_limit(dtype) and torch.equal(r2, ref_r)
    assert torch.equal(silu_and_mul(torch.ones(1, 8, dtype=dtype)), ref_s)
    rope = RotaryEmbedding(RopeSpec(head_dim=64, theta=10000.0), 128)
    _, q, k, _ = _qkv_views(3, 9, 3, 64, dtype, 3)
    positions = torch.tensor([5, 6, 7])
    with fused_ops_disabled():
        ref_q, ref_k = rope(positions, q, k)
    out_q, out_k = rope(positions, q, k)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def test_layers_fall_back_without_the_extension(monkeypatch):
    """PAGODA_DISABLE_CPU_KERNELS=1: no extension, the layers run their torch code."""
    monkeypatch.setenv(cpu_ext.DISABLE_ENV, "1")
    cpu_ext.reset_for_tests()
    try:
        assert cpu_ext.cpu_ops() is None
        norm = RMSNorm(40, EPS).to(torch.bfloat16)
        x, r = torch.randn(3, 40, dtype=torch.bfloat16), torch.randn(3, 40, dtype=torch.bfloat16)
        assert torch.equal(norm(x), rms_norm_torch(x, norm.weight, EPS))
        out, res = norm(x, r)
        assert torch.equal(res, x + r) and not torch.equal(r, res)  # inputs left alone
        assert torch.equal(out, rms_norm_torch(x + r, norm.weight, EPS))
        g = torch.randn(2, 10)
        assert torch.equal(silu_and_mul(g), F.silu(g[:, :5]) * g[:, 5:])
        rope = RotaryEmbedding(RopeSpec(head_dim=8, theta=10000.0), 16)
        q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
        q0 = q.clone()
        out_q, _ = rope(torch.tensor([1, 2]), q, k)
        assert torch.equal(q, q0) and not torch.equal(out_q, q0)
    finally:
        monkeypatch.delenv(cpu_ext.DISABLE_ENV)
        cpu_ext.reset_for_tests()


def test_tiny_model_bf16_fused_equals_fallback(ops, tmp_path):
    """A whole model in bf16: the same greedy tokens and logprobs with and without the fused ops."""
    from pagoda import LLM, SamplingParams
    from tests.conftest import TINY_VOCAB, make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path, "qwen3")  # q/k norms, rotary, SwiGLU, residual stream
    llm = LLM(str(folder), dtype="bfloat16", show_progress=False, kv_cache_memory=16 * 1024**2)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, params)
    with fused_ops_disabled():
        plain = llm.generate(prompts, params)
    for a, b in zip(fused, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
