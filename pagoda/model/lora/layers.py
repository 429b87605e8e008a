"""The batched LoRA computation: every adapter of a step in one pass over each layer.

Each `Linear` that LoRA may target gets a `LoRALinearWeights`: ``max_loras`` slots of
stacked, zero-padded weights: ``a`` [max_loras * width, in] (PEFT's lora_A rows) and ``b``
[max_loras * width, out] (lora_B transposed, scaling folded in), width = shards * max_rank
(slot s owns rows s * width .. (s + 1) * width of both). A fused layer (qkv_proj,
gate_up_proj) stacks its shards' A along the rank axis and places each shard's B in its own
output columns (block diagonal), so the LoRA of q_proj only touches the q rows of
qkv_proj's output. ``ranks`` [max_loras, shards] says how many rank rows each slot really
uses per shard (0: that shard has no LoRA in that slot).

`LoRAStepContext` says which slot each token of the current step uses. The runner sets it
before the forward pass and clears it after (`LoRAManager.begin_step` / `end_step`); the
layers only read it. Invariant: the context is active only during a forward pass in which
at least one token uses an adapter; otherwise the LoRA path is skipped entirely (one
attribute check per layer), and the model may take its compiled decoder stack.

Three ways to compute the deltas of all adapters at once, never a loop over requests:
- the compiled op ``pagoda::lora_add_`` (pagoda/csrc/cpu/lora.cpp; CPU tensors, when the
  extension is built): Punica's BGMV, each token with its own slot's A and B in one call per
  layer, no masked work. On the default model's 120 LoRA linears (4 adapters, rank 8, one
  thread) it adds 4.5 ms to a 32-token step where the torch forms below add 10.2 ms, and
  30.6 vs 87.8 ms at 640 tokens (benchmarks/lora_layers.py); used at every step size.
- torch, few tokens (decode batches, up to `DENSE_MAX_TOKENS`): x @ A of every slot the
  step spans (lowest to highest slot) in one matmul, each token's own slot kept by a
  one-hot mask (tokens without an adapter get zeros), then one matmul with B of every slot
  added into the output (`addmm_`): three kernel calls per layer, whatever the number of
  adapters;
- torch, more tokens (prefill chunks): tokens grouped by slot (S-LoRA's segments): the
  step's adapter tokens gathered once in slot order, one matmul pair per distinct adapter
  into one buffer, gathered back to token order and added. (Gathers, not ``index_add_``,
  which on CPU bf16 measured 10 ms per call at 640 tokens.)
The three agree up to float summation order (tests/lora/test_lora_layers.py).
"""

from __future__ import annotations

import numpy as np
import torch

from pagoda.kernels import cpu_ext
from pagoda.model.layers import fused

# Torch path: up to this many tokens in a step, the masked all-slots matmuls; above, segments.
DENSE_MAX_TOKENS = 128

_kernel_switch = {"enabled": True}


def lora_kernel_disabled():
    """Within the block, LoRA deltas take the torch path (tests, side-by-side benchmarks)."""
    return fused.switched_off(_kernel_switch)


def _kernel_ops(device: torch.device):
    """``torch.ops.pagoda`` if steps on `device` may use ``lora_add_``, else None."""
    if device.type != "cpu" or not _kernel_switch["enabled"]:
        return None
    ops = cpu_ext.cpu_ops()
    return ops if ops is not None and hasattr(ops, "lora_add_") else None


class LoRAStepContext:
    """Which adapter slot each token of the step uses (see the module docstring)."""

    def __init__(self, device: torch.device, max_loras: int):
        self.device = device
        self.max_loras = max_loras
        self.clear()

    def clear(self) -> None:
        self.active = False
        self.slot_bits = 0  # bit s set: some token of the step uses slot s
        self.num_tokens = 0
        self.token_slots: torch.Tensor | None = None  # int64 [tokens], -1: no adapter (compiled op)
        self.ops = None  # torch.ops.pagoda when this step's layers call lora_add_
        self._slots_np: np.ndarray | None = None
        self._plan: _TorchPlan | None = None

    def set_step(self, token_slots: np.ndarray) -> None:
        """`token_slots`: one slot per token of the step, -1 for tokens without an adapter."""
        self.clear()
        used = token_slots[token_slots >= 0]
        if len(used) == 0:
            return
        self.slot_bits = int(np.bitwise_or.reduce(np.left_shift(1, used.astype(np.int64))))
        self.num_tokens = len(token_slots)
        self._slots_np = token_slots.astype(np.int64, copy=False)
        self.ops = _kernel_ops(self.device)
        if self.ops is not None:
            self.token_slots = torch.from_numpy(np.ascontiguousarray(self._slots_np))
        self.active = True

    def slots(self) -> frozenset[int]:
        return frozenset(s for s in range(self.max_loras) if self.slot_bits >> s & 1)

    @property
    def dense(self) -> bool:
        """Whether the torch path takes the masked all-slots form at this step."""
        return self.num_tokens <= DENSE_MAX_TOKENS

    def plan(self) -> _TorchPlan:
        """The torch path's per-step tensors (made on first use, once per step)."""
        if self._plan is None:
            self._plan = _TorchPlan(self._slots_np, self.device, self.dense)
        return self._plan


class _TorchPlan:
    """Per-step index tensors of the torch path (module docstring)."""

    def __init__(self, token_slots: np.ndarray, device: torch.device, dense: bool):
        tokens = np.flatnonzero(token_slots >= 0)
        slots = token_slots[tokens]
        distinct = np.unique(slots)
        self.lo, self.hi = int(distinct[0]), int(distinct[-1])
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        if dense:  # only the slot range the step spans is computed: slots lo .. hi
            mask = np.zeros((len(token_slots), self.hi - self.lo + 1, 1), dtype=np.float32)
            mask[tokens, slots - self.lo, 0] = 1.0
            self._mask_np = mask
            self.device = device
            return
        # Segments: the adapter tokens in slot order (stable), each slot's [first, last) in that order.
        order = np.argsort(slots, kind="stable")
        self.gather = torch.from_numpy(tokens[order]).to(device)
        sorted_slots = slots[order]
        bounds = np.searchsorted(sorted_slots, np.append(distinct, distinct[-1] + 1))
        self.segments = [(int(s), int(bounds[j]), int(bounds[j + 1])) for j, s in enumerate(distinct)]
        # Back to token order: token t takes row back[t] of the sorted deltas, tokens without an
        # adapter take the zero row appended at the end.
        back = np.full(len(token_slots), len(tokens), dtype=np.int64)
        back[tokens[order]] = np.arange(len(tokens))
        self.scatter_back = torch.from_numpy(back).to(device)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The one-hot token -> slot mask, [tokens, hi - lo + 1, 1], in `dtype` (made once per step)."""
        mask = self._masks.get(dtype)
        if mask is None:
            mask = self._masks[dtype] = torch.from_numpy(self._mask_np).to(device=self.device, dtype=dtype)
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
        self.a = torch.zeros(max_loras * self.width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras * self.width, sum(shard_sizes), dtype=dtype, device=device)
        # Host tensor (the compiled op reads it); rows past a shard's rank are zero in a and b.
        self.ranks = torch.zeros(max_loras, len(shard_sizes), dtype=torch.int32)
        self.filled_bits = 0  # bit s set: slot s holds a nonzero delta for this layer

    def set_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` gets shard -> (A [r, in], B scaled [out_shard, r]); missing shards are zero."""
        first = slot * self.width
        self.a[first:first + self.width].zero_()
        self.b[first:first + self.width].zero_()
        self.ranks[slot].zero_()
        for shard, (a, b) in shards.items():
            rank, row = a.shape[0], first + shard * self.max_rank
            col = sum(self.shard_sizes[:shard])
            self.a[row:row + rank].copy_(a)
            self.b[row:row + rank, col:col + self.shard_sizes[shard]].copy_(b.t())
            self.ranks[slot, shard] = rank
        if shards:
            self.filled_bits |= 1 << slot
        else:
            self.filled_bits &= ~(1 << slot)

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, {})

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base layer's output for `x`) plus every token's adapter delta."""
        ctx = self.context
        if not self.filled_bits & ctx.slot_bits:
            return out
        if ctx.ops is not None and x.dtype == out.dtype == self.a.dtype and x.dim() == 2:
            ctx.ops.lora_add_(out, x, self.a, self.b, ctx.token_slots, self.ranks, self.max_rank, self.shard_sizes)
            return out
        return self._apply_torch(x.to(self.a.dtype), out, ctx.plan())

    def _apply_torch(self, x: torch.Tensor, out: torch.Tensor, plan: _TorchPlan) -> torch.Tensor:
        if self.context.dense:  # every slot of the step at once; the mask keeps each token's own (zeros: none)
            first, last = plan.lo * self.width, (plan.hi + 1) * self.width
            xa = torch.mm(x, self.a[first:last].t()).view(x.shape[0], plan.hi - plan.lo + 1, self.width)
            xa = xa.mul_(plan.mask(x.dtype)).view(x.shape[0], -1)
            if out.dtype == self.b.dtype:
                return out.addmm_(xa, self.b[first:last])
            return out.add_(torch.mm(xa, self.b[first:last]).to(out.dtype))
        xs = x.index_select(0, plan.gather)
        delta = torch.zeros(xs.shape[0] + 1, out.shape[1], dtype=x.dtype, device=x.device)
        for slot, begin, end in plan.segments:  # one group per distinct adapter of the step
            if not self.filled_bits >> slot & 1:
                continue
            rows = slice(slot * self.width, (slot + 1) * self.width)
            delta[begin:end] = torch.mm(torch.mm(xs[begin:end], self.a[rows].t()), self.b[rows])
        return out.add_(delta.index_select(0, plan.scatter_back).to(out.dtype))
