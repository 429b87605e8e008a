"""The draft model in the worker: its own paged KV cache, mirrored on the target's blocks,
and its greedy proposals (draft-model speculative decoding, docs/spec_decode.md).

The draft's KV cache has the target's block size and block count and is addressed by the
same block ids, block tables and slot mapping (only the per-token shape differs: the
draft's layers and heads). So the scheduler's bookkeeping covers both caches, and every
block move (copy on write, swap out and in) moves the draft's blocks with the target's
(ModelRunner.apply_block_copies).

Invariant (the mirror): wherever the target's KV of a computed token is written, the
draft's KV of that token is written too, by the same engine step. Each step, after the
target's forward pass and its sampling or verification, the draft runs once over every
row's kept tokens (a prefill chunk; a decode's pending token; a verifying row's pending
token and accepted drafts, never its rejected ones) at the target's positions and slots,
then, for rows that propose, over the token the step emitted last. Prefix-cache hits,
forked prompts and recomputed requests therefore find the draft's KV in their blocks as
they find the target's.

Proposals: from the emitted token, k greedy passes of one token per proposing row (the
first is folded into the mirror pass), each writing its input's KV at the next position.
Those positions are past what is computed, in lookahead slots the scheduler allocated
for the step (ScheduledRequest.num_lookahead_tokens); they are scratch: the next step
writes the tokens that were accepted there again. Greedy drafts make the draft's
distribution q one-hot, which is what the rejection sampler assumes, so sampled rows keep
the target's distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagoda.model.attention.backend import select_attention_backend
from pagoda.worker.input_batch import InputBatch
from pagoda.worker.sampler import argmax_rows


@dataclass(frozen=True)
class DraftRow:
    """One row of the step as the draft mirrors it (plain data, from the target's row)."""

    request_id: str
    start: int  # the target row's first position
    # Positions start .. start + num_kept - 1 hold tokens the step kept (their KV counts as computed).
    num_kept: int
    # The token the step emitted last (its position: start + num_kept); None: no proposal.
    next_token: int | None
    num_proposals: int  # tokens to propose from `next_token` (lookahead slots for them exist)


class DraftRunner:
    def __init__(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 attention_backend: str = "auto"):
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        config = model.config
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.attention = select_attention_backend(attention_backend, device, num_heads, num_kv_heads)

    @torch.inference_mode()
    def run(self, rows: list[DraftRow], batch: InputBatch) -> dict[str, list[int]]:
        """Mirrors the step's kept tokens into the draft's KV cache and returns each proposing
        row's proposals (request id -> tokens; rows that propose nothing are absent)."""
        if not rows:
            return {}
        bs = batch.block_size
        index = np.array([batch.states[r.request_id].row for r in rows], dtype=np.int64)
        starts = np.array([r.start for r in rows], dtype=np.int64)
        kept = np.array([r.num_kept for r in rows], dtype=np.int64)
        # Proposals stop where the row's block table ends (the scheduler gives lookahead slots
        # for all of them; this only keeps a short table from writing into block 0).
        room = batch.num_blocks[index] * bs - (starts + kept)
        wanted = np.array([r.num_proposals if r.next_token is not None else 0 for r in rows], dtype=np.int64)
        proposals = np.minimum(wanted, np.maximum(room, 0))
        proposing = proposals > 0
        counts = kept + proposing
        # Decodes (one token after earlier context) first, as every attention backend expects.
        decode = (counts == 1) & (starts > 0)
        order = np.concatenate([np.flatnonzero(decode), np.flatnonzero(~decode)])
        index, starts, kept, counts = index[order], starts[order], kept[order], counts[order]
        proposals, proposing = proposals[order], proposing[order]
        next_tokens = np.array([rows[i].next_token or 0 for i in order], dtype=np.int64)
        token_row, positions, layout = batch.layout(index, starts, counts, int(decode.sum()), self.device)
        # Kept tokens are in the batch's token columns (accepted drafts sit past the sequence,
        # where InputBatch.apply wrote them); the emitted token is each proposing row's last input.
        columns = batch.token_ids.shape[1]
        input_ids = batch.token_ids[index[token_row], np.minimum(positions, columns - 1)]
        last = np.cumsum(counts) - 1
        input_ids[last[proposing]] = next_tokens[proposing]
        hidden = self._forward(input_ids, positions, layout)
        if not proposing.any():
            return {}
        tokens = self._greedy(hidden, last[proposing])
        ids = [rows[i].request_id for i in order[proposing]]
        drafted = {request_id: [int(t)] for request_id, t in zip(ids, tokens)}
        # Then one token per proposing row and pass, at the position after the last input.
        index, next_pos, left = index[proposing], starts[proposing] + counts[proposing], proposals[proposing] - 1
        alive = np.arange(len(ids))
        while True:
            more = left[alive] > 0
            alive, tokens = alive[more], tokens[more]
            if not len(alive):
                return drafted
            ones = np.ones(len(alive), dtype=np.int64)
            _, positions, layout = batch.layout(index[alive], next_pos[alive], ones, len(alive), self.device)
            hidden = self._forward(tokens, positions, layout)
            tokens = self._greedy(hidden, np.arange(len(alive)))
            for j, token in zip(alive, tokens):
                drafted[ids[j]].append(int(token))
            next_pos[alive] += 1
            left[alive] -= 1

    def _forward(self, input_ids: np.ndarray, positions: np.ndarray, layout) -> torch.Tensor:
        meta = self.attention.build_metadata(layout)
        return self.model(torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device),
                          torch.from_numpy(np.ascontiguousarray(positions)).to(self.device), self.kv_caches, meta)

    def _greedy(self, hidden: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        logits = self.model.compute_logits(hidden[torch.from_numpy(rows).to(self.device)])
        return argmax_rows(logits).cpu().numpy()
