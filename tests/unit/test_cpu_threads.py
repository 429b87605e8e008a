"""Model threads on the CPU: the binding plan and the pinning (worker/cpu_threads.py)."""

from __future__ import annotations

import os

import pytest
import torch

from pagoda.worker.cpu_threads import allowed_cpus, bind_model_threads, plan_cpu_binding


def test_auto_takes_the_first_cpus_of_the_affinity_mask():
    cpus = allowed_cpus()
    assert plan_cpu_binding(None, "auto") == cpus
    assert plan_cpu_binding(1, "auto") == cpus[:1]
    assert plan_cpu_binding(len(cpus) + 1, "auto") is None  # more threads than CPUs: no pinning


def test_none_and_explicit_lists():
    cpus = allowed_cpus()
    assert plan_cpu_binding(None, "none") is None
    assert plan_cpu_binding(None, ",".join(map(str, cpus[::-1]))) == cpus[::-1]
    with pytest.raises(ValueError, match="PAGODA_CPU_BIND"):
        plan_cpu_binding(None, "zero")
    with pytest.raises(ValueError, match="not among"):
        plan_cpu_binding(None, str(max(cpus) + 1000))


@pytest.mark.skipif(len(allowed_cpus()) < 2, reason="pinning helpers needs two CPUs")
def test_binding_pins_helpers_and_leaves_the_caller_free(monkeypatch):
    from pagoda.kernels.cpu_ext import cpu_ops

    if cpu_ops() is None:
        pytest.skip("the compiled CPU ops are not available here")
    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("PAGODA_CPU_BIND", "auto")
        assert bind_model_threads(2) == 1  # the one helper thread of a team of two
        assert os.sched_getaffinity(0) == before  # the calling thread is not pinned
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
