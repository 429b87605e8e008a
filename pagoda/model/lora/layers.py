"""The batched LoRA computation: every adapter of a step in one pass over each layer.

Each `Linear` that LoRA may target gets a `LoRALinearWeights`: ``max_loras`` slots of
stacked, zero-padded weights, ``a`` [max_loras, shards * max_rank, in] and ``b``
[max_loras, out, shards * max_rank]. A fused layer (qkv_proj, gate_up_proj) stacks its
shards' A along the rank axis and places each shard's B in its own rows and rank columns
(block diagonal), so the LoRA of q_proj only touches the q rows of qkv_proj's output.

`LoRAStepContext` says which slot each token of the current step uses. The runner sets it
before the forward pass and clears it after (`LoRAManager.begin_step` / `end_step`); the
layers only read it. Invariant: the context is active only during a forward pass in which
at least one token uses an adapter; otherwise the LoRA path is skipped entirely (one
attribute check per layer), and the model may take its compiled decoder stack.

The low-rank products are computed per distinct slot of the step (tokens grouped by slot,
S-LoRA's segments; at most ``max_loras`` groups, never a loop over requests), or, for a
handful of tokens, in one gathered batched matmul over the tokens' own A and B (Punica's
BGMV).
"""

from __future__ import annotations

import numpy as np
import torch

# At or below this many adapter tokens, gather each token's A and B and run one bmm (BGMV);
# above it, one matmul pair per distinct adapter of the step (the gathered copies would cost more).
GATHER_MAX_TOKENS = 4


class LoRAStepContext:
    """Which adapter slot each token of the step uses (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.active = False
        self.slots: frozenset[int] = frozenset()
        self.token_index: torch.Tensor | None = None  # tokens with an adapter
        self.token_slots: torch.Tensor | None = None  # their slots
        self.segments: list[tuple[int, torch.Tensor]] = []  # (slot, its tokens)
        self.gather = False

    def set_step(self, token_slots: np.ndarray) -> None:
        """`token_slots`: one slot per token of the step, -1 for tokens without an adapter."""
        tokens = np.flatnonzero(token_slots >= 0)
        if len(tokens) == 0:
            self.clear()
            return
        slots = token_slots[tokens]
        distinct = np.unique(slots)
        self.slots = frozenset(distinct.tolist())
        self.gather = len(tokens) <= GATHER_MAX_TOKENS
        if self.gather:
            self.token_index = torch.from_numpy(tokens).to(self.device)
            self.token_slots = torch.from_numpy(slots.astype(np.int64)).to(self.device)
            self.segments = []
        else:
            self.segments = [(int(s), torch.from_numpy(tokens[slots == s]).to(self.device)) for s in distinct]
        self.active = True


class LoRALinearWeights:
    """One `Linear`'s adapter slots (module docstring). Not an nn.Module: not part of the
    model's parameters or state dict."""

    def __init__(self, context: LoRAStepContext, max_loras: int, max_rank: int, in_features: int,
                 shard_sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.context = context
        self.max_rank = max_rank
        self.shard_sizes = tuple(shard_sizes)
        width = len(shard_sizes) * max_rank
        self.a = torch.zeros(max_loras, width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, sum(shard_sizes), width, dtype=dtype, device=device)
        self.filled = [False] * max_loras  # slot holds a nonzero delta for this layer

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` gets shard -> (A [r, in], B scaled [out_shard, r]); missing shards are zero."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for shard, (a, b) in shards.items():
            rank, col = a.shape[0], shard * self.max_rank
            row = sum(self.shard_sizes[:shard])
            self.a[slot, col:col + rank].copy_(a)
            self.b[slot, row:row + self.shard_sizes[shard], col:col + rank].copy_(b)
        self.filled[slot] = bool(shards)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, {})

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base layer's output for `x`) plus every token's adapter delta."""
        ctx = self.context
        if not any(self.filled[s] for s in ctx.slots):
            return out
        x = x.to(self.a.dtype)
        if ctx.gather:  # BGMV: each token with its own slot's A and B, one bmm each
            xs = x.index_select(0, ctx.token_index).unsqueeze(2)  # [T, in, 1]
            xa = torch.bmm(self.a.index_select(0, ctx.token_slots), xs)  # [T, width, 1]
            delta = torch.bmm(self.b.index_select(0, ctx.token_slots), xa).squeeze(2)
            out.index_add_(0, ctx.token_index, delta.to(out.dtype))
            return out
        for slot, tokens in ctx.segments:  # one group per distinct adapter of the step
            if not self.filled[slot]:
                continue
            xs = x.index_select(0, tokens)
            delta = (xs @ self.a[slot].t()) @ self.b[slot].t()
            out.index_add_(0, tokens, delta.to(out.dtype))
        return out
