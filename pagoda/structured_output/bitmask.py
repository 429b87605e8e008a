"""Worker side of structured outputs: a step's token bitmask applied to the sampled logits.

One batched xgrammar call (its CPU kernel for CPU logits, a CUDA/Triton kernel on a GPU)
over the rows that sample under a grammar; the other rows are untouched. No per-row Python.
Below `XGRAMMAR_MIN_VOCAB` tokens (tiny test vocabularies) the same thing is done with torch
ops: xgrammar 0.2.9's CPU kernel masks wrong rows and writes out of bounds there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import xgrammar as xgr

from pagoda.core.worker_step import GrammarBitmask


XGRAMMAR_MIN_VOCAB = 64


class _Row(Protocol):
    request_id: str


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask, rows: Sequence[_Row]) -> list[int]:
    """Sets to -inf, in place, the logits of tokens the grammar forbids. `logits`: [len(rows),
    vocab]; `rows[i]` is the request whose logits are row i. Rows of `grammar` whose request
    is not among `rows` (it failed its input check) are skipped. Returns the rows whose
    grammar allows no token at all (a dead end: the vocabulary cannot continue it)."""
    where = {row.request_id: i for i, row in enumerate(rows)}
    pairs = [(where[rid], k) for k, rid in enumerate(grammar.request_ids) if rid in where]
    if not pairs:
        return []
    targets = [i for i, _ in pairs]
    source = torch.from_numpy(grammar.bitmask)
    if len(pairs) != len(grammar.request_ids):
        source = source[[k for _, k in pairs]]
    dead = [targets[k] for k in torch.nonzero(~source.any(dim=1)).flatten().tolist()]
    # xgrammar indexes logits and bitmask with the same row numbers: lay the rows out as the logits are.
    full = torch.full((logits.shape[0], source.shape[1]), -1, dtype=torch.int32)
    full[torch.tensor(targets)] = source
    full = full.to(logits.device, non_blocking=True)
    width = min(logits.shape[-1], full.shape[1] * 32)
    if width >= XGRAMMAR_MIN_VOCAB:
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=width, indices=targets)
    else:
        index = torch.tensor(targets, device=logits.device)
        words = full[index].to(torch.int64) & 0xFFFFFFFF
        allowed = ((words.unsqueeze(-1) >> torch.arange(32, device=logits.device)) & 1).flatten(1)[:, :width]
        logits[index, :width] = logits[index, :width].masked_fill(allowed == 0, float("-inf"))
    return dead
