"""What the model runner tells attention about a step, and the base of each backend's metadata.

The runner builds a `StepLayout` (plain per-row tensors and ints); the step's
attention backend turns it into its own `AttentionMetadata` subclass once per
step (`pagoda/model/attention/backend.py`), which every layer then reuses.
A "decode" is any request with exactly one new token and earlier context;
everything else is a "prefill chunk" (a whole prompt, a piece of one, or a
recompute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagoda.model.attention.backend import AttentionBackend


class AttentionMetadata:
    """Base of every backend's per-step metadata (the model passes it down untouched).

    A step's metadata is built by one backend (`AttentionBackend.build_metadata`) and
    names that backend, so a layer runs `meta.backend.forward(q, k, v, k_cache, v_cache,
    meta, scale)` without knowing which backend it is. Subclasses are dataclasses that
    declare `backend` as their first field.
    """

    backend: AttentionBackend


@dataclass
class StepLayout:
    """What every attention backend is told about a step: plain tensors and ints, built by
    the model runner from its persistent batch. Backends build their own metadata from it
    (`AttentionBackend.build_metadata`).

    Rows are requests; row r's query tokens are tokens
    query_start_loc[r] .. query_start_loc[r+1]-1 of the step, at positions
    seq_lens[r] - query_lens[r] .. seq_lens[r] - 1 of its sequence. Rows
    [0, num_decodes) are decodes (one query token, earlier context); the rest
    are prefill chunks. No other order is promised: backends that want rows
    sorted (by length, say) sort them themselves.
    """

    num_decodes: int
    query_lens: list[int]
    seq_lens: list[int]  # tokens in the cache for the row once this step's are written
    query_start_loc: torch.Tensor  # [rows + 1] int32
    seq_lens_tensor: torch.Tensor  # [rows] int32
    # [rows, max_blocks] int32 block ids; entries past a row's last block are 0 (padding).
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset of each token
    block_size: int

    @property
    def num_rows(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
