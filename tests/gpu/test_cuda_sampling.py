"""On-device sampling on CUDA (worker/sampler.py): the exponential-race noise is drawn on the
GPU; a seed reproduces its tokens on one device, whatever else is in the batch. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch

from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.sampler import Sampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def request(rid: str, seed: int | None) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams(temperature=1.0, seed=seed), frozenset({0}))
    if seed is not None and r.generator is None:
        r.generator = torch.Generator().manual_seed(seed)
    return r


def test_seeded_rows_reproduce_on_the_device_alone_or_batched():
    logits = torch.randn(4, 1000, device="cuda")
    tokens = []
    # "a" has the same logits (row 1 of `logits`) alone and batched.
    for batch, rows in (([request("a", 5)], slice(1, 2)),
                        ([request("x", None), request("a", 5), request("y", None), request("z", 9)], slice(0, 4))):
        sampler = Sampler(1000, seed=0)
        row = 0 if len(batch) == 1 else 1
        draws = []
        for _ in range(8):
            out = sampler(logits[rows].clone(), batch)
            draws.append(out.token_ids[row])
        tokens.append(draws)
    assert tokens[0] == tokens[1]
    assert len(set(tokens[0])) > 1  # the draws are random, not one token every time


def test_the_noise_never_leaves_the_device(monkeypatch):
    moved = []  # (source device type, elements) of every Tensor.to during the call
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append((self.device.type, self.numel()))
        return original(self, *args, **kwargs)

    sampler = Sampler(100, seed=0)
    batch = [request("a", 1), request("b", None)]
    logits = torch.randn(2, 100, device="cuda")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    sampler(logits, batch)
    monkeypatch.undo()
    # Only per-row parameters travel from the host, never a [rows, vocab] noise tensor.
    assert all(numel < 2 * 100 for device, numel in moved if device == "cpu")
