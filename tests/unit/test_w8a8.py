"""W8A8 linear layers (csrc/cpu/w8a8.cpp and its torch code in pagoda.model.quant.packed).

- the C++ quantization of activations and the fused op equal the torch code bit for bit
  (every float dtype, odd K, strided rows, more rows than one chunk, float32 outputs);
- the torch code is what the docstring says: codes within half a step, products exact;
- zero rows give zeros, rows holding a NaN or an infinity give NaN (never a plausible number);
- a row's result does not depend on the other rows of its call;
- an int4 form with a W8A8 copy takes it above W8A8_OVER_INT4_ROWS rows, and the built-in
  methods give that copy to a small model's W8A8_LAYERS only (the others keep a bf16 copy).
"""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels.cpu_ext import cpu_ops
from pagoda.model.quant import packed
from pagoda.model.quant.packed import Int4Weight, Int8Weight, quantize_rows_int8, w8a8_matmul

FLOATS = [torch.float32, torch.bfloat16, torch.float16]

needs_op = pytest.mark.skipif(cpu_ops() is None or not hasattr(torch.ops.pagoda, "w8a8_linear"),
                              reason="pagoda's C++ CPU ops are not built here")


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    form = Int8Weight.quantize(torch.randn(n, k, generator=gen) * 0.05, w8a8_at_large_m=True)
    return form.q, form.scale


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    x[:, 5] *= 40  # an outlier channel, as real hidden states have
    return x.to(dtype)


def _torch_code(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    xq, x_scale = quantize_rows_int8(x)
    return (torch._int_mm(xq, q.t()).float() * x_scale[:, None] * scale[None, :]).to(out_dtype)


def test_torch_quantization_is_within_half_a_step() -> None:
    x = _activations(40, 96, torch.float32, 0)
    xq, scale = quantize_rows_int8(x)
    assert xq.dtype == torch.int8 and int(xq.abs().max()) == 127
    assert ((xq.float() * scale[:, None] - x).abs() <= scale[:, None] * (0.5 + 1e-5)).all()


@needs_op
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("k", [64, 577])
def test_cpu_quantization_equals_the_torch_code(dtype: torch.dtype, k: int) -> None:
    x = _activations(70, k, dtype, k)
    q, scale = torch.ops.pagoda.quantize_rows_int8(x)
    ref_q, ref_scale = quantize_rows_int8(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@needs_op
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (33, 577, 80), (1100, 96, 64)])  # 1100: two chunks
def test_cpu_op_equals_the_torch_code(dtype: torch.dtype, m: int, k: int, n: int) -> None:
    q, scale = _weights(n, k, n)
    x = _activations(m, k, dtype, m)
    for out_dtype in (dtype, torch.float32):
        got = torch.ops.pagoda.w8a8_linear(x, q, scale, out_dtype)
        assert got.dtype == out_dtype
        assert torch.equal(got, _torch_code(x, q, scale, out_dtype))


@needs_op
def test_strided_rows_and_special_rows() -> None:
    q, scale = _weights(32, 64, 1)
    wide = _activations(6, 128, torch.bfloat16, 2)
    x = wide[:, :64]  # rows 128 apart
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 7] = float("inf")
    got = w8a8_matmul(x, q, scale, torch.bfloat16)
    assert torch.equal(got[[0, 4, 5]], _torch_code(x.contiguous(), q, scale, torch.bfloat16)[[0, 4, 5]])
    assert (got[1] == 0).all()
    assert got[2].isnan().all() and got[3].isnan().all()


def test_torch_fallback_special_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed, "_w8a8_op_available", lambda: False)
    q, scale = _weights(32, 64, 1)
    x = _activations(4, 64, torch.bfloat16, 2)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 7] = float("-inf")
    got = w8a8_matmul(x, q, scale, torch.bfloat16)
    assert (got[1] == 0).all() and got[2].isnan().all() and got[3].isnan().all()
    assert not got[0].isnan().any()


def test_a_rows_result_does_not_depend_on_the_others() -> None:
    q, scale = _weights(64, 96, 3)
    x = _activations(50, 96, torch.bfloat16, 4)
    whole = w8a8_matmul(x, q, scale, torch.bfloat16)
    for rows in (slice(0, 1), slice(7, 30), slice(49, 50)):
        assert torch.equal(w8a8_matmul(x[rows], q, scale, torch.bfloat16), whole[rows])


def test_close_to_the_float_product() -> None:
    q, scale = _weights(64, 96, 5)
    x = _activations(20, 96, torch.float32, 6)
    w = q.float() * scale[:, None]
    got = w8a8_matmul(x, q, scale, torch.float32)
    # Activation rounding: at most half a step per element, times |w|.
    step = x.abs().amax(dim=1, keepdim=True) / 127
    bound = (step / 2) * w.abs().sum(dim=1)[None, :] + 1e-4
    assert ((got - x @ w.t()).abs() <= bound).all()


def test_int4_form_takes_w8a8_above_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    form = Int4Weight.quantize(torch.randn(64, 64) * 0.05, with_w8a8=True)
    calls = []
    monkeypatch.setattr(form, "matmul_int4", lambda x: calls.append("int4") or torch.zeros(x.shape[0], 64))
    monkeypatch.setattr(form.w8a8, "matmul_w8a8",
                        lambda x, dtype: calls.append("w8a8") or torch.zeros(x.shape[0], 64, dtype=dtype))
    form.matmul(torch.randn(packed.W8A8_OVER_INT4_ROWS, 64, dtype=torch.bfloat16))
    form.matmul(torch.randn(packed.W8A8_OVER_INT4_ROWS + 1, 64, dtype=torch.bfloat16))
    assert calls == ["int4", "w8a8"]


def test_built_in_methods_give_w8a8_copies_to_its_layers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagoda.model.layers.linear import Linear
    from pagoda.model.quant import methods

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                layer = Linear(64, 64, bias=False)
                torch.nn.init.normal_(layer.weight, std=0.05)
                setattr(self, name, layer)

    for fast in (True, False):
        monkeypatch.setattr(methods, "w8a8_fast", lambda fast=fast: fast)
        block = Block()
        methods.apply_linear_method(block, methods.Int4Method())
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            form = getattr(block, name).packed
            with_copy = fast and name in packed.W8A8_LAYERS
            assert (form.w8a8 is not None) == with_copy, name
            assert (form.dense is None) == with_copy, name
            x = torch.randn(packed.W8A8_OVER_INT4_ROWS + 4, 64, dtype=torch.bfloat16)
            expected = x.float() @ form.dequantize_bf16().float().t()
            err = (form.matmul(x).float() - expected).abs().max()
            assert err <= 0.03 * expected.abs().max(), (name, err)


def test_prompt_tokens_take_w8a8_and_the_others_what_a_decode_step_takes() -> None:
    form = Int4Weight.quantize(torch.randn(64, 64) * 0.05, with_w8a8=True)
    x = torch.randn(12, 64).to(torch.bfloat16)
    generated = torch.tensor([0, 1, 2, 9])  # decodes, and a recomputed generated token at 9
    decode_only = form.matmul(x[generated])  # 4 rows: the int4 GEMV
    with packed.w8a8_for_prompt_tokens(generated):
        mixed = form.matmul(x)
        assert packed.step_has_prompt_tokens()
    assert torch.equal(mixed[generated], decode_only)
    prompt = torch.tensor([3, 4, 5, 6, 7, 8, 10, 11])
    assert torch.equal(mixed[prompt], form.w8a8.matmul_w8a8(x[prompt], torch.bfloat16))
    with packed.w8a8_for_prompt_tokens(torch.tensor([], dtype=torch.int64)):
        assert torch.equal(form.matmul(x[3:5]), form.w8a8.matmul_w8a8(x[3:5], torch.bfloat16))
    assert not packed.step_has_prompt_tokens()  # reset on leaving


def test_a_prefix_cache_hit_repeats_the_first_answer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second identical request computes only its prompt's uncached tail; with W8A8 copies
    that tail still takes them, so its logprobs equal the first request's bit for bit."""
    from pagoda import LLM, SamplingParams
    from pagoda.model.quant import methods
    from tests.conftest import TINY_VOCAB, make_tiny_checkpoint

    monkeypatch.setattr(methods, "w8a8_fast", lambda: True)
    llm = LLM(str(make_tiny_checkpoint(tmp_path, "llama")), dtype="bfloat16", quantization="int4",
              show_progress=False, kv_cache_memory=16 * 1024**2, enable_prefix_caching=True)
    prompt = torch.randint(3, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    first, second = (llm.generate([prompt], params)[0] for _ in range(2))
    assert second.num_cached_tokens >= 32
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert first.outputs[0].logprobs == second.outputs[0].logprobs


def test_no_w8a8_copies_without_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch fallback's separate scaling pass costs more than the int8 product saves.
    monkeypatch.setattr(packed, "_w8a8_op_available", lambda: False)
    assert not packed.w8a8_fast()
