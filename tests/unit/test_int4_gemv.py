"""pagoda's int4 kernel (csrc/cpu/int4_gemv.cpp) against a float64 reference of the same codes.

- results equal x @ W.T for W = d * q + m (fp16 d and m) up to the output's bf16 rounding,
  at every row count (1..8 in one pass, more in blocks of 8), on odd group counts;
- a row's result is bitwise the same whatever rows share its call (what lets a step that
  verifies drafts score tokens exactly as one-token steps do);
- GGUF's own scales (fp16) are taken exactly; shapes off the kernel's grid fall back to
  torch's kernel, and so does the whole form with the compiled ops switched off.
"""

from __future__ import annotations

import pytest
import torch

from pagoda.model.quant import packed
from pagoda.model.quant.gguf_blocks import Int4Codes
from pagoda.model.quant.packed import Int4Gemv, Int4Weight, Int8Weight, int4_gemv_available

BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(not int4_gemv_available(),
                                reason="pagoda's int4 kernel needs a compiled AVX-512 BF16 build")


def _codes(n: int, k: int, group: int, seed: int) -> Int4Codes:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    # fp16-exact scales and offsets, as GGUF stores them.
    scale = (torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3).half().float()
    offset = (torch.randn(n, k // group, generator=gen) * 0.05).half().float()
    return Int4Codes(q, scale, offset, group)


def _reference(x: torch.Tensor, codes: Int4Codes) -> torch.Tensor:
    return x.double() @ codes.dequantize().double().t()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (960, 576, 32), (48, 96, 32), (32, 64, 16)])
def test_matches_float_reference(m: int, n: int, k: int, group: int) -> None:
    codes = _codes(n, k, group, seed=m + n)
    gemv = Int4Gemv.from_codes(codes)
    assert gemv is not None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(BF16)
    y = gemv.matmul(x)
    assert y.shape == (m, n) and y.dtype == BF16
    expected = _reference(x, codes)
    # One bf16 rounding of the output (half an ulp: 2^-9 relative) plus fp32 summation.
    bound = expected.abs() * 2.0 ** -8 + 1e-4 * expected.abs().max()
    assert ((y.double() - expected).abs() <= bound).all()


def test_a_row_does_not_depend_on_its_neighbours() -> None:
    codes = _codes(960, 576, 32, seed=7)
    gemv = Int4Gemv.from_codes(codes)
    x = torch.randn(19, 576, generator=torch.Generator().manual_seed(8)).to(BF16)
    together = gemv.matmul(x)
    for i in range(19):
        assert torch.equal(gemv.matmul(x[i:i + 1].contiguous())[0], together[i])
    assert torch.equal(gemv.matmul(x[3:8].contiguous()), together[3:8])


def test_int4_weight_uses_it_and_falls_back() -> None:
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    form = Int4Weight.quantize(weight)
    assert form.gemv is not None and form.packed is None
    assert form.nbytes == 96 * 64 // 2 + 96 * 2 * 2 * 2  # codes + fp16 d and m per group of 32
    torch_form = Int4Weight.quantize(weight, torch_kernel=True)
    assert torch_form.gemv is None and torch_form.packed is not None
    x = torch.randn(3, 64).to(BF16)
    # Same codes through both kernels: they differ only by torch's bf16 scales.
    ours, theirs = form.matmul(x).float(), torch_form.matmul(x).float()
    assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()
    # dequantize_bf16 reads the kernel's own weights back.
    codes = packed.quantize_int4_codes(weight, 32)
    exact = Int4Codes(codes.q, codes.scale.half().float(), codes.offset.half().float(), 32).dequantize()
    assert torch.allclose(form.dequantize_bf16().float(), exact, rtol=2.0 ** -8, atol=1e-6)


def test_codes_it_cannot_hold_go_to_torch_kernel() -> None:
    assert Int4Gemv.from_codes(_codes(40, 64, 32, seed=1)) is None  # N not a multiple of 16
    # Offsets fp16 cannot hold within a tenth of a quantization step: torch's layout instead.
    codes = _codes(32, 64, 32, seed=2)
    fine = Int4Codes(codes.q, torch.full_like(codes.scale, 1e-6), torch.full_like(codes.offset, 1.0001), 32)
    assert Int4Gemv.from_codes(fine) is None
    form = Int4Weight.from_codes(fine)
    assert form.gemv is None and form.packed is not None


def test_switched_off_without_compiled_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed, "int4_gemv_available", lambda: False)
    form = Int4Weight.quantize(torch.randn(64, 64) * 0.05)
    assert form.gemv is None and form.packed is not None


def test_bad_arguments_are_refused() -> None:
    gemv = Int4Gemv.from_codes(_codes(32, 64, 32, seed=3))
    with pytest.raises(RuntimeError, match="x must be bf16"):
        torch.ops.pagoda.int4_gemv(torch.randn(1, 64), gemv.packed, gemv.scales, 32)
    with pytest.raises(RuntimeError, match="K=128"):
        torch.ops.pagoda.int4_gemv(torch.randn(1, 128).to(BF16), gemv.packed, gemv.scales, 32)


# --------------------------------------------------------------------------- 8-bit form


@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 9, 20])
@pytest.mark.parametrize("n,k", [(64, 128), (960, 576), (48, 100)])
def test_int8_matches_float_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n)
    weight = torch.randn(n, k, generator=gen) * 0.05
    form = Int8Weight.quantize(weight, q8=False)  # bf16 activations (int8 ones: test_q8_gemv.py)
    assert form.gemv is not None and form.q is None and not form.gemv.q8
    x = torch.randn(m, k, generator=gen).to(BF16)
    y = form.matmul(x)
    expected = x.double() @ form.dequantize().double().t()
    bound = expected.abs() * 2.0 ** -8 + 1e-4 * expected.abs().max()
    assert ((y.double() - expected).abs() <= bound).all()
    # Every code, -127 .. 127, survives the layout both ways.
    assert torch.equal(form.gemv.codes(), torch.round(weight / form.scale[:, None]).clamp(-127, 127).to(torch.int8))


def test_int8_rows_are_independent_and_readable_back() -> None:
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    form = Int8Weight.quantize(weight)
    x = torch.randn(11, 64).to(BF16)
    together = form.matmul(x)
    for i in range(11):
        assert torch.equal(form.matmul(x[i:i + 1].contiguous())[0], together[i])
    ids = torch.tensor([[0, 17, 95], [40, 40, 3]])
    assert torch.equal(form.rows(ids, torch.float32), form.dequantize()[ids])
    torch_form = Int8Weight.quantize(weight, torch_kernel=True)
    assert torch_form.gemv is None and torch_form.q is not None
    # W8A8 forms keep torch's layout for their large-M kernel.
    assert Int8Weight.quantize(weight, w8a8_at_large_m=True).gemv is None
