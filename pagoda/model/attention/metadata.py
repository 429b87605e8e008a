"""Per-step attention metadata, built by the model runner and passed down.

Token layout of a step: all decode tokens first (one per decoding request),
then each prefill chunk's tokens, request after request. A "decode" here is
any request with exactly one new token and earlier context; everything else
is a "prefill chunk" (a whole prompt, a piece of one, or a recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the step's token list
    query_len: int
    context_len: int  # tokens of this request already in the cache before the chunk
    # The request's block table; None when context_len == 0 (keys and
    # values come straight from this step's tokens).
    key_blocks: torch.Tensor | None
    # [group * query_len, context_len + query_len] bool, True where attention
    # is allowed: the causal mask tiled once per query head sharing a KV head.
    causal_mask: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


@dataclass
class DecodeGroup:
    """Decodes of similar sequence length, attended to in one batched call.

    Keys are gathered whole blocks at a time and padded to the longest
    sequence of the group; grouping by length keeps that padding small.
    """

    start: int  # index of the group's first token in the step's token list
    count: int
    # [count, num_blocks] block tables; shorter ones padded with block 0.
    block_tables: torch.Tensor
    # [count, 1, 1, num_blocks * block_size] bool, True for real keys; None if none is padding.
    key_mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    # [num_tokens] cache slot (block * block_size + offset) each token's K/V is written to.
    slot_mapping: torch.Tensor
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


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
