"""Turns a SchedulerOutput into flat tensors, runs the model once, samples.

The runner owns the KV tensors (and the host swap space, if any) and the
device; it reads requests but never changes their bookkeeping (the
scheduler does that from our output).

Failures: each row's input is checked before the batch is built (its token
ids in the vocabulary, its block table long enough for the positions it
writes); a row that fails the check, or whose sampling or prompt logprobs
raise, is left out and reported in `ModelRunnerOutput.failed`, and the rest
of the batch runs. Anything else that raises (block moves, the forward
pass, the batched draw) propagates: the engine undoes the step and finds
the culprit (engine/llm_engine.py).
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.core.scheduler_output import (
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    describe_error,
)
from pagoda.model.attention.metadata import AttentionMetadata, DecodeGroup, PrefillChunk
from pagoda.worker.kv_cache import move_blocks
from pagoda.worker.onednn_caches import bound_onednn_caches
from pagoda.worker.sampler import Sampler, token_logprobs


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        sampler: Sampler,
        device: torch.device,
        offload_host: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        host_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        if device.type == "cpu":
            bound_onednn_caches()  # before the first matmul: flat memory under varying batch shapes
        self.model = model
        # Host-memory tier of the prefix cache (core/kv_offload.py): the swap space's layout.
        self.offload_host = offload_host
        self.kv_caches = kv_caches
        self.host_kv_caches = host_kv_caches  # swap space: same layout, in host memory
        self.block_size = block_size
        self.sampler = sampler
        self.device = device
        config = model.config
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        # Query heads per KV head: prefill masks are tiled this many times (torch_paged.py).
        self.query_group = config.num_attention_heads // (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write: each (source, destination) block, K and V of every layer, in order."""
        if not copies:
            return
        sources = torch.tensor([s for s, _ in copies], device=self.device)
        targets = torch.tensor([d for _, d in copies], device=self.device)
        chained = len(set(targets.tolist()) & set(sources.tolist())) > 0
        for k_cache, v_cache in self.kv_caches:
            for cache in (k_cache, v_cache):
                if chained:  # a copy reads another's destination: keep the order
                    for source, target in copies:
                        cache[target].copy_(cache[source])
                else:
                    cache.index_copy_(0, targets, cache.index_select(0, sources))

    @torch.inference_mode()
    def apply_block_copies(self, scheduler_output: SchedulerOutput) -> None:
        """Every block move of a step, before its forward pass, in an order that is part of the
        scheduler's contract: every read of a device block (offloads of evicted cached blocks,
        swap-outs) comes before any write to one, because a block freed or evicted this step
        may already be another move's destination (core/swap_space.py, core/kv_offload.py).
        Then swap-ins, copy-on-write copies, and last the loads from the offload tiers: a load
        may go into a block a preempted request gave up this step, whose pending copy or
        swap-in must not land on top of it; and nothing reads a loaded block before the
        forward pass."""
        out = scheduler_output
        if out.blocks_to_offload:
            move_blocks(self.kv_caches, self.offload_host, out.blocks_to_offload)
        if out.blocks_to_swap_out or out.blocks_to_swap_in:
            if self.host_kv_caches is None:
                raise RuntimeError("the scheduler asked for swaps, but this runner has no swap space")
            move_blocks(self.kv_caches, self.host_kv_caches, out.blocks_to_swap_out)
            move_blocks(self.host_kv_caches, self.kv_caches, out.blocks_to_swap_in)
        self._copy_blocks(out.blocks_to_copy)
        if out.blocks_to_load:
            move_blocks(self.offload_host, self.kv_caches, out.blocks_to_load)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.apply_block_copies(scheduler_output)
        out = ModelRunnerOutput()
        scheduled = []
        for item in scheduler_output.scheduled:
            problem = self._check_row(item)
            if problem is None:
                scheduled.append(item)
            else:
                out.failed[item.request_id] = problem
        if not scheduled:
            return out
        # Decodes first, longest first (grouped by length for batched attention), then prefill chunks.
        decodes = sorted((s for s in scheduled if self._is_decode(s)), key=lambda s: -s.end)
        prefills = [s for s in scheduled if not self._is_decode(s)]
        items = decodes + prefills
        input_ids, positions, meta = self._prepare(decodes, prefills)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        sample_rows, sample_items = [], []
        prompt_rows: list[int] = []
        prompt_owner: list[tuple[ScheduledRequest, int]] = []  # (item, position)
        offset = 0
        for item in items:
            for position in item.prompt_logprob_positions:
                prompt_rows.append(offset + position - item.start)
                prompt_owner.append((item, position))
            if item.samples:
                sample_rows.append(offset + item.num_new_tokens - 1)
                sample_items.append(item)
            offset += item.num_new_tokens

        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            result = self.sampler(logits, [item.request for item in sample_items])
            candidates = result.beam_candidates or [None] * len(sample_items)
            for row, (item, token, logprobs, beams) in enumerate(
                    zip(sample_items, result.token_ids, result.logprobs, candidates)):
                if row in result.failed:
                    out.failed[item.request_id] = result.failed[row]
                    continue
                if beams is not None:
                    out.beam_candidates[item.request_id] = beams
                    continue
                out.sampled_token_ids[item.request_id] = token
                if logprobs is not None:
                    out.logprobs[item.request_id] = logprobs
        if prompt_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(prompt_rows, device=self.device)])
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, (item, position) in enumerate(prompt_owner):
                request = item.request
                if request.request_id in out.failed:
                    continue
                try:
                    next_token = request.prompt_token_ids[position + 1]
                    entry = token_logprobs(logprobs[row], next_token, request.sampling_params.prompt_logprobs)
                except Exception as error:  # noqa: BLE001 - this row's prompt logprobs failed: it fails alone
                    out.failed[request.request_id] = describe_error(error)
                    continue
                out.prompt_logprobs.setdefault(request.request_id, []).append(entry)
        for request_id in out.failed:  # nothing of a failed row is reported but the failure
            for results in (out.sampled_token_ids, out.logprobs, out.prompt_logprobs, out.beam_candidates):
                results.pop(request_id, None)
        return out

    def _check_row(self, item: ScheduledRequest) -> str | None:
        """Why this row cannot run (its input would break the batch), or None."""
        try:
            request = item.request
            if item.num_new_tokens < 1 or item.start < 0 or item.end > request.num_tokens:
                return (f"it asks for positions {item.start}..{item.end - 1} of a sequence "
                        f"of {request.num_tokens} tokens")
            if len(item.block_table) * self.block_size < item.end:
                return (f"its block table ({len(item.block_table)} blocks of {self.block_size}) "
                        f"does not reach position {item.end - 1}")
            tokens = request.all_token_ids[item.start:item.end]
            low, high = min(tokens), max(tokens)
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                bad = low if low < 0 else high
                return f"token id {bad} is outside the vocabulary [0, {self.vocab_size})"
        except Exception as error:  # noqa: BLE001 - a row that cannot even be checked fails alone
            return describe_error(error)
        return None

    @staticmethod
    def _is_decode(item: ScheduledRequest) -> bool:
        return item.num_new_tokens == 1 and item.start > 0

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of `positions` given a block table (same leading dims)."""
        bs = self.block_size
        return block_table.gather(-1, positions // bs) * bs + positions % bs

    def _prepare(
        self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        device = self.device
        items = decodes + prefills
        token_ids: list[int] = []
        position_list: list[int] = []
        for item in items:
            token_ids.extend(item.request.all_token_ids[item.start : item.end])
            position_list.extend(range(item.start, item.end))
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(position_list, dtype=torch.long, device=device)

        max_blocks = max(len(item.block_table) for item in items)
        tables = torch.zeros(len(items), max_blocks, dtype=torch.long)
        for row, item in enumerate(items):
            tables[row, : len(item.block_table)] = torch.tensor(item.block_table, dtype=torch.long)
        tables = tables.to(device)

        # Slot of every token of this step.
        row_of_token = torch.repeat_interleave(
            torch.arange(len(items), device=device),
            torch.tensor([item.num_new_tokens for item in items], device=device),
        )
        slot_mapping = self._slots(tables[row_of_token], positions.unsqueeze(1)).squeeze(1)
        meta = AttentionMetadata(slot_mapping=slot_mapping)

        bs = self.block_size
        start = 0
        for count in _group_by_length([item.end for item in decodes]):
            group_items = decodes[start : start + count]
            seq_lens = torch.tensor([item.end for item in group_items], device=device)
            num_blocks = len(group_items[0].block_table)  # longest first
            group_tables = tables[start : start + count, :num_blocks]
            key_mask = None
            if any(item.end != num_blocks * bs for item in group_items):
                key_positions = torch.arange(num_blocks * bs, device=device).unsqueeze(0)
                key_mask = (key_positions < seq_lens.unsqueeze(1)).view(count, 1, 1, num_blocks * bs)
            meta.decode_groups.append(DecodeGroup(start, count, group_tables, key_mask))
            start += count

        query_start = len(decodes)
        for row, item in enumerate(prefills, start=len(decodes)):
            seq = torch.arange(item.end, device=device)
            mask = seq.unsqueeze(0) <= seq[item.start :].unsqueeze(1)
            if self.query_group > 1:
                mask = mask.repeat(self.query_group, 1)
            key_blocks = tables[row, : len(item.block_table)] if item.start > 0 else None
            meta.prefills.append(PrefillChunk(query_start, item.num_new_tokens, item.start, key_blocks, mask))
            query_start += item.num_new_tokens
        return input_ids, positions, meta


# A decode group may pad its keys to at most this much more than it holds.
_MAX_PADDING_RATIO = 1.25


def _group_by_length(seq_lens: list[int]) -> list[int]:
    """Splits lengths sorted longest-first into runs whose padded size
    (count x longest) stays within _MAX_PADDING_RATIO of their real size."""
    counts: list[int] = []
    i = 0
    while i < len(seq_lens):
        longest, total, j = seq_lens[i], 0, i
        while j < len(seq_lens) and longest * (j - i + 1) <= _MAX_PADDING_RATIO * (total + seq_lens[j]):
            total += seq_lens[j]
            j += 1
        counts.append(j - i)
        i = j
    return counts
