"""The sampler's argmax (pagoda/worker/sampler.py `argmax_rows`, csrc/cpu/argmax.cpp) equals
torch.argmax(x, dim=-1) exactly: the first index of a row's maximum, the first NaN if the row
has one, on any width (vectors of 16 and a tail), with ties, infinities and strided rows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.kernels import cpu_ext
from pagoda.worker.sampler import argmax_rows

needs_op = pytest.mark.skipif(cpu_ext.cpu_ops() is None or not hasattr(cpu_ext.cpu_ops(), "argmax_rows"),
                              reason="compiled CPU ops are not available")

SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 3.0]


@needs_op
@pytest.mark.parametrize("shape", [(64, 49152), (1, 1), (3, 15), (3, 16), (2, 17), (5, 100)])
def test_random_rows(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(torch.ops.pagoda.argmax_rows(x), x.argmax(dim=-1))


@needs_op
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=40).map(tuple), min_size=1, max_size=6))
def test_ties_infinities_and_nans(rows):
    width = max(len(r) for r in rows)
    x = torch.tensor([list(r) + [float("-inf")] * (width - len(r)) for r in rows], dtype=torch.float32)
    assert torch.equal(torch.ops.pagoda.argmax_rows(x), x.argmax(dim=-1))


@needs_op
def test_strided_rows_and_the_fallbacks():
    x = torch.randn(6, 40)
    assert torch.equal(argmax_rows(x[::2]), x[::2].argmax(dim=-1))  # row stride 80: the op
    for other in (x.t(), x.double(), x.bfloat16(), x[:, :0]):  # columns strided, other dtypes, empty: torch
        if other.shape[-1]:
            assert torch.equal(argmax_rows(other), other.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.pagoda.argmax_rows(x.double())
