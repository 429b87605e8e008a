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

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], num_decodes: int, block_tables: torch.Tensor,
              block_size: int, slot_mapping: torch.Tensor | None = None) -> StepLayout:
        """A layout from the rows' lengths and block tables; the tensors are derived from them
        (the slot mapping too, unless the caller has it already)."""
        device = block_tables.device
        lens = torch.tensor(query_lens, dtype=torch.int64)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=query_start_loc[1:])
        seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32)
        if slot_mapping is None:
            rows = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
            first = torch.repeat_interleave(seq_lens_tensor.long() - lens - query_start_loc[:-1].long(), lens)
            positions = first + torch.arange(int(lens.sum()))
            tables = block_tables.cpu().long()
            slot_mapping = (tables[rows, positions // block_size] * block_size + positions % block_size).to(device)
        return cls(num_decodes, list(query_lens), list(seq_lens), query_start_loc.to(device),
                   seq_lens_tensor.to(device), block_tables, slot_mapping, block_size)

    @property
    def num_rows(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
