"""The ``cpu`` attention backend: a compiled kernel that reads K/V blocks in place.

The kernel (``pagoda/csrc/cpu/attention.cpp``, ``torch.ops.pagoda.paged_attention``)
takes the step's layout as it is: one call for every row, decodes and prefill
chunks alike (causal within a chunk, over its cached prefix), in any row order.
It never copies blocks: each work item reads a block of one KV head once and
runs all query heads that share it against it, with an online softmax in fp32.
Threads split the work over rows, KV heads, query tiles and, when there are
few sequences, over ranges of one sequence's blocks (merged afterwards).

Built by `pagoda/kernels/cpu_ext.py` on first use; where it cannot be built,
`load_cpu_attention_op()` returns None and `select_attention_backend` falls
back to the torch backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagoda.kernels import cpu_ext
from pagoda.model.attention.backend import AttentionBackend
from pagoda.model.attention.metadata import AttentionMetadata, StepLayout
from pagoda.model.attention.torch_paged import write_kv


def load_cpu_attention_op() -> Callable | None:
    """torch.ops.pagoda.paged_attention, or None where the compiled ops are unavailable."""
    ops = cpu_ext.cpu_ops()
    if ops is None:
        return None
    try:
        return ops.paged_attention
    except (AttributeError, RuntimeError):  # an extension built without attention.cpp
        return None


@dataclass
class CpuAttentionMetadata(AttentionMetadata):
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # The kernel's inputs, all int32 and contiguous (it checks).
    block_tables: torch.Tensor  # [rows, max_blocks]
    query_start_loc: torch.Tensor  # [rows + 1]
    seq_lens: torch.Tensor  # [rows]
    # Ranges each decode row's blocks are split into: 0 lets the kernel decide from the
    # thread count (tests force a number to exercise the merge).
    num_splits: int = 0


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, op: Callable, num_splits: int = 0):
        self._op = op
        # The step's K/V rows into the cache in one call (attention.cpp); None: index_copy_.
        self._write_kv = getattr(torch.ops.pagoda, "write_kv", None)
        self.num_splits = num_splits

    def build_metadata(self, layout: StepLayout) -> CpuAttentionMetadata:
        return CpuAttentionMetadata(
            backend=self,
            slot_mapping=layout.slot_mapping,
            block_tables=layout.block_tables.to(torch.int32).contiguous(),
            query_start_loc=layout.query_start_loc.to(torch.int32).contiguous(),
            seq_lens=layout.seq_lens_tensor.to(torch.int32).contiguous(),
            num_splits=self.num_splits,
        )

    def forward(self, q, k, v, k_cache, v_cache, meta: CpuAttentionMetadata, scale):
        head_dim = k.shape[-1]
        if (self._write_kv is not None and k.stride(-1) == 1 and k.stride(-2) == head_dim
                and v.stride(-1) == 1 and v.stride(-2) == head_dim):
            self._write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        if q.stride(2) != 1:
            q = q.contiguous()
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
        self._op(out, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                 float(scale), meta.num_splits)
        return out
