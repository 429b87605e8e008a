"""The batched LoRA computation: every adapter of a step in one pass over each layer.

Each `Linear` that LoRA may target gets a `LoRALinearWeights`: ``max_loras`` slots of
stacked, zero-padded weights, kept transposed for the matmuls: ``a_t`` [in, max_loras * width]
and ``b_t`` [max_loras * width, out], width = shards * max_rank (slot s owns columns / rows
s * width .. (s + 1) * width). A fused layer (qkv_proj, gate_up_proj) stacks its shards' A
along the rank axis and places each shard's B in its own output columns (block diagonal), so
the LoRA of q_proj only touches the q rows of qkv_proj's output.

`LoRAStepContext` says which slot each token of the current step uses. The runner sets it
before the forward pass and clears it after (`LoRAManager.begin_step` / `end_step`); the
layers only read it. Invariant: the context is active only during a forward pass in which
at least one token uses an adapter; otherwise the LoRA path is skipped entirely (one
attribute check per layer), and the model may take its compiled decoder stack.

Two ways to compute the deltas of all adapters at once, never a loop over requests:
- few tokens (decode batches, up to `DENSE_MAX_TOKENS`): x @ A of every slot the step spans
  (the range from its lowest to its highest slot) in one matmul,
  each token's own slot kept by a one-hot mask (tokens without an adapter get zeros), then
  one matmul with B of every slot added into the output (`addmm_`). The work grows with
  max_loras, but it is three kernel calls per layer, which on small batches is what costs
  (measured on the CPU: 3-4x faster than per-adapter segments at 32 tokens);
- more tokens (prefill chunks): tokens grouped by slot (S-LoRA's segments), one matmul pair
  per distinct adapter of the step (at most max_loras groups).
"""

from __future__ import annotations

import numpy as np
import torch

# Up to this many tokens in a step, the masked all-slots matmuls; above, one segment per adapter.
DENSE_MAX_TOKENS = 128


class LoRAStepContext:
    """Which adapter slot each token of the step uses (see the module docstring)."""

    def __init__(self, device: torch.device, max_loras: int):
        self.device = device
        self.max_loras = max_loras
        self.clear()

    def clear(self) -> None:
        self.active = False
        self.slots: frozenset[int] = frozenset()
        self.dense = False
        self.lo = self.hi = 0
        self._mask: np.ndarray | None = None  # [tokens, max_loras, 1] one-hot (dense)
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        self.segments: list[tuple[int, torch.Tensor]] = []  # (slot, its tokens)

    def set_step(self, token_slots: np.ndarray) -> None:
        """`token_slots`: one slot per token of the step, -1 for tokens without an adapter."""
        self.clear()
        tokens = np.flatnonzero(token_slots >= 0)
        if len(tokens) == 0:
            return
        slots = token_slots[tokens]
        distinct = np.unique(slots)
        self.slots = frozenset(distinct.tolist())
        self.dense = len(token_slots) <= DENSE_MAX_TOKENS
        if self.dense:  # only the slot range the step spans is computed: slots lo .. hi
            self.lo, self.hi = int(distinct[0]), int(distinct[-1])
            mask = np.zeros((len(token_slots), self.hi - self.lo + 1, 1), dtype=np.float32)
            mask[tokens, slots - self.lo, 0] = 1.0
            self._mask = mask
        else:
            self.segments = [(int(s), torch.from_numpy(tokens[slots == s]).to(self.device)) for s in distinct]
        self.active = True

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The one-hot token -> slot mask, [tokens, hi - lo + 1, 1], in `dtype` (made once per step)."""
        mask = self._masks.get(dtype)
        if mask is None:
            mask = self._masks[dtype] = torch.from_numpy(self._mask).to(device=self.device, dtype=dtype)
        return mask


class LoRALinearWeights:
    """One `Linear`'s adapter slots (module docstring). Not an nn.Module: not part of the
    model's parameters or state dict."""

    def __init__(self, context: LoRAStepContext, max_loras: int, max_rank: int, in_features: int,
                 shard_sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.context = context
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.shard_sizes = tuple(shard_sizes)
        self.width = len(shard_sizes) * max_rank
        self.a_t = torch.zeros(in_features, max_loras * self.width, dtype=dtype, device=device)
        self.b_t = torch.zeros(max_loras * self.width, sum(shard_sizes), dtype=dtype, device=device)
        self.filled = [False] * max_loras  # slot holds a nonzero delta for this layer

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` gets shard -> (A [r, in], B scaled [out_shard, r]); missing shards are zero."""
        first = slot * self.width
        self.a_t[:, first:first + self.width].zero_()
        self.b_t[first:first + self.width].zero_()
        for shard, (a, b) in shards.items():
            rank, col = a.shape[0], first + shard * self.max_rank
            row = sum(self.shard_sizes[:shard])
            self.a_t[:, col:col + rank].copy_(a.t())
            self.b_t[col:col + rank, row:row + self.shard_sizes[shard]].copy_(b.t())
        self.filled[slot] = bool(shards)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, {})

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base layer's output for `x`) plus every token's adapter delta."""
        ctx = self.context
        if not any(self.filled[s] for s in ctx.slots):
            return out
        x = x.to(self.a_t.dtype)
        if ctx.dense:  # every slot of the step at once; the mask keeps each token's own (zeros: none)
            first, last = ctx.lo * self.width, (ctx.hi + 1) * self.width
            xa = torch.mm(x, self.a_t[:, first:last]).view(x.shape[0], ctx.hi - ctx.lo + 1, self.width)
            xa = xa.mul_(ctx.mask(x.dtype)).view(x.shape[0], -1)
            if out.dtype == self.b_t.dtype:
                return out.addmm_(xa, self.b_t[first:last])
            return out.add_(torch.mm(xa, self.b_t[first:last]).to(out.dtype))
        for slot, tokens in ctx.segments:  # one group per distinct adapter of the step
            if not self.filled[slot]:
                continue
            first = slot * self.width
            xs = x.index_select(0, tokens)
            delta = torch.mm(torch.mm(xs, self.a_t[:, first:first + self.width]), self.b_t[first:first + self.width])
            out.index_add_(0, tokens, delta.to(out.dtype))
        return out
