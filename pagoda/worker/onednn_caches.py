"""Bounds on oneDNN's per-shape kernel caches, so a serving process's memory stays flat.

On the CPU, torch runs bfloat16 (and float16) linear layers through oneDNN, which
compiles a kernel for each input shape and keeps it in two caches: oneDNN's own
primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and the cache of torch's ideep
layer (LRU_CACHE_CAPACITY), 1024 entries each by default. An engine step's token count
changes from step to step, and each new count adds one entry per weight shape
(5 for Llama: qkv, o, gate_up, down, lm_head) to each cache: about 0.6 MB of
malloc'ed memory per shape, so a busy server grew by ~620 MiB over its first
~600 requests before the caches filled (docs/soak.md). float32 goes through
MKL/OpenBLAS and caches nothing per shape.

A step needs only its 5 shapes (the 30 layers share them), and creating a kernel
costs ~0.2 ms, so small caches cost at most ~1 ms per step with a new token count.
128 entries keep the recurring decode batch sizes (up to ~25 of them) and bound
the caches at ~80 MB.

Both variables are read when the caches are first used, so this must run before
the first bf16 matmul of the process; the engine runs none before its ModelRunner
exists. Values a user set are kept.
"""

from __future__ import annotations

import os

CACHE_CAPACITY = 128
_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = CACHE_CAPACITY) -> dict[str, str]:
    """Sets both capacities unless already set; returns the values in effect."""
    if capacity < 1:  # LRU_CACHE_CAPACITY=0 crashes torch (segfault); 1 misses on every layer
        raise ValueError(f"capacity={capacity} is invalid: must be >= 1")
    for name in _VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in _VARIABLES}
