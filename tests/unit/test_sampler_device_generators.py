"""The sampler's device generators (used off the CPU; worker/sampler.py): which generator a
row draws from. The draws themselves on CUDA are checked in tests/gpu/test_cuda_sampling.py;
here the bookkeeping runs with CPU "device" generators."""

from __future__ import annotations

import gc

import torch

from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.sampler import Sampler

CPU = torch.device("cpu")


def seeded(rid: str, seed: int) -> Request:
    request = Request(rid, [1, 2, 3], SamplingParams(temperature=1.0, seed=seed), frozenset({0}))
    if request.generator is None:  # the worker's RowState makes it; stand in for it
        request.generator = torch.Generator().manual_seed(seed)
    return request


def test_a_seeded_request_keeps_one_device_generator_seeded_with_its_seed():
    sampler = Sampler(10, seed=3)
    a = seeded("a", 7)
    gen = sampler._request_device_generator(a, CPU)
    assert sampler._request_device_generator(a, CPU) is gen  # kept across steps
    first = torch.empty(4).exponential_(generator=gen)
    # Another request with the same seed starts the same stream (reproducible per seed).
    b = seeded("b", 7)
    other = sampler._request_device_generator(b, CPU)
    assert other is not gen
    assert torch.equal(torch.empty(4).exponential_(generator=other), first)
    # Gone with the request's CPU generator (the worker drops it when the request ends).
    del a, gen
    gc.collect()
    assert len(sampler._request_device_generators) == 1


def test_the_shared_device_generator_is_seeded_like_the_cpu_one():
    sampler = Sampler(10, seed=11)
    shared = sampler._shared_device_generator(CPU)
    assert sampler._shared_device_generator(CPU) is shared
    expected = torch.empty(5).exponential_(generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.empty(5).exponential_(generator=shared), expected)


def test_the_stream_continues_across_steps_whatever_the_device_is_called():
    # The runner's device may be device("cuda") while a generator reports device("cuda", 0):
    # the request must keep its generator (a new one would restart the seed's stream).
    sampler = Sampler(10)
    a = seeded("a", 5)
    first = sampler._request_device_generator(a, torch.device("cpu"))
    assert sampler._request_device_generator(a, torch.device("cpu", 0)) is first
    draws = [torch.empty(3).exponential_(generator=sampler._request_device_generator(a, CPU)) for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])


def test_the_table_drops_ended_requests_and_keeps_live_ones_across_sweeps():
    # No weak references (torch.Generator refuses them before torch 2.13): the table sweeps
    # entries whose CPU generator only it still holds.
    sampler = Sampler(10)
    live = seeded("live", 1)
    kept = sampler._request_device_generator(live, CPU)
    for i in range(500):  # requests that start and end; sweeps run as the table doubles
        sampler._request_device_generator(seeded(f"r{i}", i), CPU)
        assert len(sampler._request_device_generators._entries) <= 128
    assert sampler._request_device_generator(live, CPU) is kept
    assert len(sampler._request_device_generators) == 1
