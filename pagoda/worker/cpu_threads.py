"""CPU threads for the model: how many, and pinned one per core.

`--threads N` (EngineConfig.num_threads) sets torch's intra-op threads; by default it is
every CPU this process may run on. Unpinned OpenMP threads migrate between cores and lose
their caches mid-step, one source of run-to-run swing; so, as vLLM's CPU backend does, the
worker pins the helper threads of its OpenMP team to CPUs 2..N of the first N CPUs of the
process's affinity mask, from the thread that runs the model (teams belong to the thread
that starts them). The model-running thread itself is left unpinned (in-process it is the
user's thread, and whatever it starts would inherit a pin); the OS keeps it on the one CPU
of the N left free.

PAGODA_CPU_BIND: "auto" (default: pin as above), "none" (leave placement to the OS), or a
comma-separated list of CPU ids to pin to, in order (its length sets the thread count).
Pinning needs the compiled CPU ops (pagoda/kernels/cpu_ext.py); without them it is skipped.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

BIND_ENV = "PAGODA_CPU_BIND"


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def plan_cpu_binding(num_threads: int | None, setting: str | None = None) -> list[int] | None:
    """The CPUs to pin the model's threads to (one each), or None for no pinning."""
    setting = (setting if setting is not None else os.environ.get(BIND_ENV, "auto")).strip().lower()
    if setting in ("none", "off", "0", "false"):
        return None
    cpus = allowed_cpus()
    if setting not in ("", "auto"):
        try:
            listed = [int(part) for part in setting.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{BIND_ENV}={setting!r} is invalid: must be auto, none or a list of CPU ids "
                             "like 0,1") from None
        unknown = [cpu for cpu in listed if cpu not in cpus]
        if not listed or unknown:
            raise ValueError(f"{BIND_ENV}={setting!r} is invalid: CPUs {unknown or listed} are not among "
                             f"this process's CPUs {cpus}")
        return listed
    count = num_threads or len(cpus)
    return cpus[:count] if count <= len(cpus) else None  # oversubscribed: pinning would stack threads


def bind_model_threads(num_threads: int | None) -> int:
    """Pins the helper threads of the calling thread's OpenMP team; returns how many were pinned."""
    cpus = plan_cpu_binding(num_threads)
    if cpus is None:
        return 0
    from pagoda.kernels.cpu_ext import cpu_ops

    ops = cpu_ops()
    if ops is None:
        return 0
    pinned = int(ops.bind_omp_threads(cpus))
    logger.info("model threads: %d on CPUs %s (%d helper threads pinned)", torch.get_num_threads(), cpus, pinned)
    return pinned
