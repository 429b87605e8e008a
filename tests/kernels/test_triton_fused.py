"""The Triton RMSNorm / rotary / SwiGLU kernels (model/layers/triton_fused.py, used on CUDA)
against the layers' torch code, run on CPU tensors by Triton's interpreter; and a tiny model
end to end with every norm, rotary and SwiGLU taking them (greedy tokens of the torch code).

TRITON_INTERPRET is set before triton_fused is imported (its kernels are decorated then)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pagoda.model.layers import triton_fused  # noqa: E402
from pagoda.model.layers.activation import silu_and_mul_torch  # noqa: E402
from pagoda.model.layers.fused import triton_ops_for, triton_ops_on_cpu  # noqa: E402
from pagoda.model.layers.norm import rms_norm_torch  # noqa: E402
from pagoda.model.layers.rotary import RopeSpec, RotaryEmbedding  # noqa: E402
from pagoda.model.layers.triton_fused import _round  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: to float noise. 16-bit: each element within one rounding, and almost all equal
    (the kernels round where the torch code rounds; only the norm's sum order and fp32
    contractions differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
        return
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert (got == want).float().mean().item() > 0.98


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 72, 576])
def test_rms_norm_and_the_fused_residual_add(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    residual = torch.randn(7, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    close(triton_fused.rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6))
    want_residual = x + residual
    want = rms_norm_torch(want_residual, weight, 1e-6)
    x2, r2 = x.clone(), residual.clone()
    triton_fused.fused_add_rms_norm(x2, r2, weight, 1e-6)
    assert torch.equal(r2, want_residual)  # the add rounds exactly as torch's
    close(x2, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_norm_of_a_strided_view(dtype):
    # Qwen3's q_norm: a [tokens, heads, head_dim] view into a fused qkv output.
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, generator=gen).to(dtype)
    q = qkv[:, :64].view(5, 4, 16)
    weight = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype)
    got = triton_fused.rms_norm(q, weight, 1e-6)
    assert got.shape == (5, 4, 16) and got.is_contiguous()
    close(got, rms_norm_torch(q, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 64), (8, 8, 24)])
def test_rotary_in_place_on_views_into_qkv(dtype, heads, kv_heads, head_dim):
    spec = RopeSpec(head_dim=head_dim, theta=10000.0, rope_type="llama3", factor=8.0, original_max_position=64)
    rope = RotaryEmbedding(spec, 512)
    gen = torch.Generator().manual_seed(head_dim)
    n = 9
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    positions = torch.randint(0, 512, (n,), generator=gen)
    want_q, want_k = rope.forward_torch(positions, q, k)
    triton_fused.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    # Every rounding where the torch code rounds, and no sum to reorder: equal, bit for bit
    # (compiled, fp32 may contract a product into an add: tests/gpu allows that).
    assert torch.equal(q, want_q)
    assert torch.equal(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1536, 2500])
def test_silu_and_mul(dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (3 * torch.randn(6, 2 * inter, generator=gen)).to(dtype)
    got, want = triton_fused.silu_and_mul(gate_up), silu_and_mul_torch(gate_up)
    close(got, want)
    if dtype == torch.bfloat16:  # rounded to bf16, the exp's last-bit differences vanish
        assert torch.equal(got, want)  # (torch's CPU fp16 SiLU rounds a few elements otherwise)


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, _round(tl.load(x_ptr + offs), tl.bfloat16))


def test_the_bf16_rounding_keeps_nan_inf_and_rounds_to_nearest_even():
    # NaN bit patterns a GPU produces (0x7FFFFFFF), odd payloads, infinities, overflow, ties.
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, 0x7F800000, -0x800000,
                         0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x3F808001], dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(22, generator=torch.Generator().manual_seed(0))])
    out = torch.empty(32, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, out, N=32)
    want = x.to(torch.bfloat16)  # torch: round to nearest even
    assert torch.isnan(out[:4]).all()
    assert torch.equal(out[4:], want[4:])


def test_empty_batches_and_bad_shapes():
    weight = torch.ones(8)
    assert triton_fused.rms_norm(torch.empty(0, 8), weight, 1e-6).shape == (0, 8)
    assert triton_fused.silu_and_mul(torch.empty(0, 16)).shape == (0, 8)
    with pytest.raises(ValueError, match="contiguous last dim"):
        triton_fused.rms_norm(torch.randn(8, 4).t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="disagree"):
        rope = RotaryEmbedding(RopeSpec(head_dim=8, theta=10000.0), 16)
        triton_fused.rotary_embedding(torch.zeros(3, dtype=torch.long), torch.randn(2, 2, 8), torch.randn(2, 1, 8),
                                      rope.cos_cache, rope.sin_cache)


def test_layers_take_the_kernels_on_cuda_only():
    x = torch.randn(2, 8)
    assert triton_ops_for(x) is None  # CPU tensors: the compiled CPU ops or the torch code
    with triton_ops_on_cpu():
        assert triton_ops_for(x) is triton_fused
        assert triton_ops_for(x.long()) is None


def test_a_tiny_model_gives_the_torch_code_tokens_through_the_kernels(tiny_llama, tmp_path):
    from pagoda import LLM, SamplingParams
    from pagoda.model.layers.fused import fused_ops_disabled
    from tests.conftest import make_tiny_checkpoint

    qwen3 = make_tiny_checkpoint(tmp_path, "qwen3")  # q/k norms too
    prompts = [[1, 5, 9, 200, 33], list(range(3, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for folder in (tiny_llama, qwen3):
        llm = LLM(str(folder), dtype="float32", attention_backend="torch", show_progress=False)
        with fused_ops_disabled():
            want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        calls = {"n": 0}
        original = triton_fused.rotary_embedding

        def counting(*args):
            calls["n"] += 1
            return original(*args)

        triton_fused.rotary_embedding = counting
        try:
            with triton_ops_on_cpu():
                got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            triton_fused.rotary_embedding = original
        assert calls["n"] > 0  # the kernels ran
        assert got == want


def test_kernels_that_fail_their_self_test_leave_the_torch_code(monkeypatch, caplog):
    x = torch.randn(2, 8)
    with triton_ops_on_cpu():
        assert triton_fused.self_test(x.device, torch.float32) is None
        assert triton_ops_for(x) is triton_fused

    def broken(*args):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(triton_fused, "silu_and_mul", broken)
    with triton_ops_on_cpu(), caplog.at_level("WARNING"):
        assert triton_ops_for(x) is None  # the layers run their torch code
        assert triton_ops_for(x) is None  # decided once per device and dtype
    assert [r.message for r in caplog.records if "self-test" in r.message] and "no kernel image" in caplog.text
