"""pagoda's int8-activation GEMV (csrc/cpu/q8_gemv.cpp) against a float64 model of its arithmetic.

The kernel quantizes each row of x per group (round(x * 127 / max|x|) in fp32), sums the
integer products exactly and scales in fp32. The reference does the same quantization in
torch and the rest in float64, so the two agree up to the output's bf16 rounding; the
quantization itself is what benchmarks/quant_quality.py measures against the float model.

- both forms (4-bit codes with d, m per group; 8-bit rows with one scale per row), every
  row count in one pass and in blocks of 8;
- a row's result is bitwise the same whatever rows share its call, also where a call of
  several passes walks weights too large for the cache in tiles (the lm_head);
- the int8 lm_head takes it by default where it runs and returns float32 logits; shapes off
  its grid keep bf16 activations.
"""

from __future__ import annotations

import pytest
import torch

from pagoda.model.quant.gguf_blocks import Int4Codes
from pagoda.model.quant.packed import Int4Gemv, Int8Weight, q8_gemv_available

BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(not q8_gemv_available(),
                                reason="pagoda's int8-activation kernel needs a compiled AVX-512 BF16 + VNNI build")


def _quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation codes and scales: per row and group, fp32 arithmetic."""
    xf = x.float().view(x.shape[0], -1, group)
    amax = xf.abs().amax(-1, keepdim=True)
    # 127 / amax as a true fp32 division (torch computes `127.0 / t` as 127 * (1 / t), another rounding).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round((xf * inv).clamp(-127, 127))
    return xq.double(), (amax / 127.0).double()


def _int4_codes(n: int, k: int, group: int, seed: int) -> Int4Codes:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3).half().float()
    offset = (torch.randn(n, k // group, generator=gen) * 0.05).half().float()
    return Int4Codes(q, scale, offset, group)


def _close_to(y: torch.Tensor, expected: torch.Tensor) -> bool:
    # One bf16 rounding of the output (half an ulp: 2^-9 relative; none for fp32 out) plus fp32 scaling and sums.
    rel = 2.0 ** -8 if y.dtype == BF16 else 2.0 ** -16
    bound = expected.abs() * rel + 1e-4 * expected.abs().max()
    return bool(((y.double() - expected).abs() <= bound).all())


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 20])
@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (960, 576, 32), (32, 128, 64)])
def test_int4_matches_its_arithmetic(m: int, n: int, k: int, group: int) -> None:
    codes = _int4_codes(n, k, group, seed=m + n)
    gemv = Int4Gemv.from_codes(codes, q8=True)
    assert gemv is not None and gemv.q8
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(BF16)
    y = gemv.matmul(x)
    assert y.shape == (m, n) and y.dtype == BF16
    xq, sx = _quantize_rows(x, group)  # [m, G, group], [m, G, 1]
    q = codes.q.double().view(n, k // group, group)
    dots = torch.einsum("agk,ngk->ang", xq, q)  # exact integer sums [m, n, G]
    group_sums = x.double().view(m, -1, group).sum(-1)  # the m term uses x itself
    expected = (dots * codes.scale.double()[None] * sx.view(m, 1, -1)).sum(-1) \
        + group_sums @ codes.offset.double().t()
    assert _close_to(y, expected)


@pytest.mark.parametrize("m", [1, 4, 8, 13])
@pytest.mark.parametrize("n,k", [(64, 128), (992, 576)])
def test_int8_matches_its_arithmetic(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n)
    weight = torch.randn(n, k, generator=gen) * 0.05
    weight[0, :5] = torch.tensor([1.0, -1.0, 0.5, -0.25, 0.0])  # codes at both ends: -127 and 127
    form = Int8Weight.quantize(weight, q8=True)
    assert form.gemv is not None and form.gemv.q8
    x = torch.randn(m, k, generator=gen).to(BF16)
    x[0, :32] = 0.0  # a group of zeros: scale 0, codes 0
    y = form.gemv.matmul(x)
    assert y.dtype == torch.float32  # logits stay unrounded (bf16 would make ties)
    xq, sx = _quantize_rows(x, 32)
    w = form.codes().double().view(n, k // 32, 32)
    expected = (torch.einsum("agk,ngk->ang", xq, w) * sx.view(m, 1, -1)).sum(-1) * form.scale.double()
    assert _close_to(y, expected)
    # And close to the bf16-activation kernel: int8 activations are about as coarse as bf16.
    plain = x.double() @ form.dequantize().double().t()
    assert (y.double() - plain).abs().max() <= 2e-2 * plain.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_its_neighbours(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    if bits == 4:
        gemv = Int4Gemv.from_codes(_int4_codes(960, 576, 32, seed=7), q8=True)
    else:
        gemv = Int8Weight.quantize(torch.randn(960, 576, generator=gen) * 0.05, q8=True).gemv
    x = torch.randn(19, 576, generator=gen).to(BF16)
    together = gemv.matmul(x)
    for i in range(19):
        assert torch.equal(gemv.matmul(x[i:i + 1].contiguous())[0], together[i])
    assert torch.equal(gemv.matmul(x[3:12].contiguous()), together[3:12])


def test_tiled_passes_over_large_weights_give_the_same_bits() -> None:
    # 16384 x 576 int8 (9.4 MB with scales) is above the kernel's 8 MB streaming bound: calls of
    # more than 8 rows run every pass over an L2-sized tile of columns before the next tile.
    # One row at a time takes the plain order (one pass); the rows must agree bit for bit,
    # including a last pass of 3 rows and a last tile of fewer columns (N / 16 = 1024 blocks).
    gen = torch.Generator().manual_seed(5)
    gemv = Int8Weight.quantize(torch.randn(16384, 576, generator=gen) * 0.05, q8=True).gemv
    x = torch.randn(19, 576, generator=gen).to(BF16)
    together = gemv.matmul(x)
    for i in range(19):
        assert torch.equal(gemv.matmul(x[i:i + 1].contiguous())[0], together[i])


def test_defaults_and_shapes_off_its_grid() -> None:
    weight = torch.randn(64, 112, generator=torch.Generator().manual_seed(3)) * 0.05
    assert Int8Weight.quantize(torch.randn(64, 128) * 0.05).gemv.q8  # the lm_head's default
    head = Int8Weight.quantize(torch.randn(64, 128) * 0.05)
    head.float_out = True  # as apply_linear_method marks the lm_head
    assert head.matmul(torch.randn(3, 128).to(BF16)).dtype == torch.float32
    head.float_out = False  # any other int8 layer keeps the activations' dtype
    assert head.matmul(torch.randn(3, 128).to(BF16)).dtype == BF16
    assert not Int8Weight.quantize(weight).gemv.q8  # K = 112 is not whole groups of 32
    assert not Int4Gemv.from_codes(_int4_codes(32, 64, 32, seed=1)).q8  # 4-bit default: bf16 activations
    assert not Int4Gemv.from_codes(_int4_codes(32, 48, 4, seed=1), q8=True).q8  # group of 4: not a multiple of 8


def test_bad_arguments_are_refused() -> None:
    gemv = Int4Gemv.from_codes(_int4_codes(32, 64, 32, seed=3), q8=True)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        torch.ops.pagoda.int4_gemv_q8(torch.randn(1, 64), gemv.packed, gemv.scales, 32)
    with pytest.raises(RuntimeError, match="K=128"):
        torch.ops.pagoda.int4_gemv_q8(torch.randn(1, 128).to(BF16), gemv.packed, gemv.scales, 32)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.pagoda.int4_gemv_q8(torch.randn(1, 64).to(BF16), gemv.packed, gemv.scales, 4)
