"""Worker side of structured outputs: a step's token bitmask applied to the sampled logits.

One batched xgrammar call (its CPU kernel for CPU logits, a CUDA/Triton kernel on a GPU)
over the rows that sample under a grammar; the other rows are untouched. No per-row Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import xgrammar as xgr

from pagoda.core.worker_step import GrammarBitmask


class _Row(Protocol):
    request_id: str


def apply_grammar_bitmask(logits: torch.Tensor, grammar: GrammarBitmask, rows: Sequence[_Row]) -> None:
    """Sets to -inf, in place, the logits of tokens the grammar forbids. `logits`: [len(rows),
    vocab]; `rows[i]` is the request whose logits are row i. Rows of `grammar` whose request
    is not among `rows` (it failed its input check) are skipped."""
    where = {row.request_id: i for i, row in enumerate(rows)}
    pairs = [(where[rid], k) for k, rid in enumerate(grammar.request_ids) if rid in where]
    if not pairs:
        return
    targets = [i for i, _ in pairs]
    source = torch.from_numpy(grammar.bitmask)
    if len(pairs) != len(grammar.request_ids):
        source = source[[k for _, k in pairs]]
    # xgrammar indexes logits and bitmask with the same row numbers: lay the rows out as the logits are.
    full = torch.full((logits.shape[0], source.shape[1]), -1, dtype=torch.int32)
    full[torch.tensor(targets)] = source
    full = full.to(logits.device, non_blocking=True)
    width = min(logits.shape[-1], full.shape[1] * 32)
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=width, indices=targets)
