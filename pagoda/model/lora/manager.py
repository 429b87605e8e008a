"""The worker's adapters: `max_loras` device slots and an LRU of adapters in host memory.

The engine never sends weights: a request's `LoRARequest` (name, id, path) arrives with its
`NewRequestData`; the manager reads the folder (adapter.py) the first time a step needs
that adapter, keeps up to `max_cpu_loras` read adapters in host memory (least recently used
dropped first), and copies an adapter into a free slot (or the least recently used slot no
row of the step needs) when a step uses it. The engine's scheduler keeps the distinct
adapters of the running batch within `max_loras`, so a step always finds its slots.

Bookkeeping (`apply`, once per step, before the forward pass). Invariant: `requests` holds
exactly the ids some row of the worker's batch uses, plus the ids held in a slot or in
host memory (so it is bounded by the batch and by max_loras + max_cpu_loras). An id the
engine removed (an adapter unloaded from the server) loses its slot, its host copy and its
entry as soon as no row uses it; rows still running with it finish with it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pagoda.model.lora.adapter import TARGET_MODULES, AdapterError, LoRAAdapter, ModelShape, load_adapter
from pagoda.model.lora.layers import LoRALinearWeights, LoRAStepContext
from pagoda.model.lora.request import LoRARequest

if TYPE_CHECKING:
    from pagoda.core.worker_step import WorkerStep


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or 0, max_loras)
        self.dtype = dtype
        self.shape = ModelShape.from_hf_config(model.config)
        self.context = LoRAStepContext(device, max_loras)
        model.lora_context = self.context  # LlamaForCausalLM.forward reads it (compiled stack or not)
        # Per decoder layer: Linear path ("self_attn.qkv_proj") -> its slot weights.
        self.layers: list[dict[str, LoRALinearWeights]] = []
        paths = sorted({path for path, _ in TARGET_MODULES.values()})
        for layer in model.model.layers:
            weights = {}
            for path in paths:
                linear = layer.get_submodule(path)
                linear.lora = weights[path] = LoRALinearWeights(
                    self.context, max_loras, max_lora_rank, linear.in_features, linear.shard_sizes, dtype, device)
            self.layers.append(weights)
        self.slot_ids: list[int | None] = [None] * max_loras  # adapter id in each slot
        self._slot_used = [0] * max_loras  # last step that used each slot (LRU)
        self._steps = itertools.count(1)
        self.requests: dict[int, LoRARequest] = {}  # adapter ids the worker may need (module docstring)
        self.digests: dict[int, str] = {}  # id -> digest of the contents the engine checked
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # read adapters, LRU order
        self._removed: set[int] = set()  # ids the engine removed that some row still uses
        self._used: set[int] = set()  # ids the rows of the worker's batch use (as of the last apply)

    def apply(self, step: WorkerStep, row_lora_ids: np.ndarray) -> None:
        """A step's adapter news: adapters of its new requests, ids the engine removed; then
        drops what no row needs any more. `row_lora_ids`: the adapter id of every row of the
        worker's batch after the step's updates (0: none, or a free row)."""
        for data in step.new_requests:
            if data.lora_request is not None:
                self.register(data.lora_request, data.lora_digest)
        self._removed.update(step.removed_lora_ids)
        if step.finished_request_ids or step.removed_lora_ids or step.new_requests:  # rows changed
            self._used = set(np.unique(row_lora_ids).tolist())
            self._sweep()

    def register(self, lora_request: LoRARequest, digest: str | None = None) -> None:
        """An adapter named by a request the worker was sent (its path, for when a step needs it)."""
        lora_id = lora_request.lora_int_id
        old = self.requests.get(lora_id)
        if (old is not None and old != lora_request) or (digest and self.digests.get(lora_id, digest) != digest):
            self._forget(lora_id)  # the id now names another adapter (or other contents): drop stale copies
        self.requests[lora_id] = lora_request
        if digest:
            self.digests[lora_id] = digest

    def _sweep(self) -> None:
        """Drops removed ids no row uses, and the paths of ids neither used nor held."""
        used = self._used
        for lora_id in [i for i in self._removed if i not in used]:
            self._forget(lora_id)
            self._removed.discard(lora_id)
        held = set(self.host) | {i for i in self.slot_ids if i is not None}
        for lora_id in [i for i in self.requests if i not in used and i not in held]:
            del self.requests[lora_id]
            self.digests.pop(lora_id, None)

    def _forget(self, lora_id: int) -> None:
        """Drops every trace of an adapter id: its slot, its host copy, its path."""
        self.host.pop(lora_id, None)
        self._evict_id(lora_id)
        self.requests.pop(lora_id, None)
        self.digests.pop(lora_id, None)

    def _evict_id(self, lora_id: int) -> None:
        for slot, held in enumerate(self.slot_ids):
            if held == lora_id:
                self.slot_ids[slot] = None
                for weights in self.layers:
                    for layer_weights in weights.values():
                        layer_weights.clear_slot(slot)

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.host.get(lora_id)
        if adapter is not None:
            self.host.move_to_end(lora_id)
            return adapter
        request = self.requests.get(lora_id)
        if request is None:
            raise RuntimeError(f"LoRA adapter id {lora_id} was never sent to the worker")
        adapter = load_adapter(request.lora_path, self.shape, self.max_lora_rank, request.lora_name, self.dtype)
        expected = self.digests.get(lora_id)
        if expected and adapter.digest != expected:  # its KV blocks are keyed by the contents the engine read
            raise AdapterError(f"LoRA adapter {request.lora_name!r}: the files in {request.lora_path!r} changed "
                               "after the engine read them; unload it and load it again.")
        self.host[lora_id] = adapter
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)
        return adapter

    def slots_for(self, lora_ids: list[int]) -> dict[int, int]:
        """A slot for each adapter id (loading those not in one); raises if they exceed max_loras."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"a step uses {len(lora_ids)} LoRA adapters, more than max_loras={self.max_loras}")
        step = next(self._steps)
        slot_of = {lora_id: self.slot_ids.index(lora_id) for lora_id in lora_ids if lora_id in self.slot_ids}
        loaded = False
        for lora_id in lora_ids:
            if lora_id in slot_of:
                continue
            loaded = True
            adapter = self._adapter(lora_id)
            taken = set(slot_of.values())
            free = [s for s in range(self.max_loras) if s not in taken]
            slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self._slot_used[s]))
            self._fill(slot, adapter)
            self.slot_ids[slot] = lora_id
            slot_of[lora_id] = slot
        for slot in slot_of.values():
            self._slot_used[slot] = step
        if loaded:  # a load may have pushed another adapter out of its slot or out of host memory
            self._sweep()
        return slot_of

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for index, weights in enumerate(self.layers):
            shards: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
            for module, (path, shard) in TARGET_MODULES.items():
                pair = adapter.weights.get((index, module))
                if pair is not None:
                    shards.setdefault(path, {})[shard] = pair
            for path, layer_weights in weights.items():
                layer_weights.set_slot(slot, shards.get(path, {}))

    def begin_step(self, token_lora_ids: np.ndarray) -> None:
        """Sets the step's context from each token's adapter id (0: none)."""
        if not token_lora_ids.any():
            self.context.clear()
            return
        distinct, inverse = np.unique(token_lora_ids, return_inverse=True)
        slot_of = self.slots_for([int(i) for i in distinct if i > 0])
        mapped = np.array([slot_of.get(int(i), -1) for i in distinct], dtype=np.int64)
        self.context.set_step(mapped[inverse])

    def end_step(self) -> None:
        self.context.clear()
