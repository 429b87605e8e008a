"""Runs one `WorkerStep`: block moves, then the model once over the step's rows, then sampling.

The runner owns the KV tensors (and the host swap space, if any), the device and the
persistent batch (worker/input_batch.py): it never sees the engine's `Request` objects,
only the plain data of core/worker_step.py, and answers with a `ModelRunnerOutput`.

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

from pagoda.core.scheduler_output import ModelRunnerOutput, SchedulerOutput, describe_error
from pagoda.core.worker_step import GrammarBitmask, StepRow, WorkerStep
from pagoda.engine.spec_decode.rejection_sampler import RejectionSampler
from pagoda.model.attention.backend import select_attention_backend
from pagoda.model.quant.packed import has_w8a8_copies, w8a8_for_prompt_tokens
from pagoda.worker.cpu_threads import bind_model_threads
from pagoda.worker.draft_runner import DraftRow, DraftRunner
from pagoda.worker.input_batch import HostDecodeStep, InputBatch, RowState, StepTensors
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
        max_model_len: int,
        offload_host: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        host_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        num_threads: int | None = None,
        attention_backend: str = "auto",
        split_decodes: bool = True,
        lora_manager=None,
        draft: DraftRunner | None = None,
    ):
        if device.type == "cpu":
            bound_onednn_caches()  # before the first matmul: flat memory under varying batch shapes
        self.model = model
        # Layers with W8A8 copies need each prompt step's token kinds (`_generated_tokens`).
        self._marks_prompt_tokens = has_w8a8_copies(model)
        # Host-memory tier of the prefix cache (core/kv_offload.py): the swap space's layout.
        self.offload_host = offload_host
        self.kv_caches = kv_caches
        self.host_kv_caches = host_kv_caches  # swap space: same layout, in host memory
        self.block_size = block_size
        self.sampler = sampler
        # Speculative decoding's verification: draws from the sampler's shared generator.
        self.rejection_sampler = RejectionSampler(sampler.generator if sampler is not None else None)
        self.device = device
        # CPU: the model's OpenMP helpers get pinned at the first step, from the thread that
        # runs the model (worker/cpu_threads.py).
        self._threads_to_bind = device.type == "cpu"
        self.num_threads = num_threads
        # Every live request's tokens, block table and sampling state, across steps.
        self.input_batch = InputBatch(block_size, max_model_len)
        # Multi-LoRA (model/lora/manager.py): adapter slots; None when LoRA is off.
        self.lora_manager = lora_manager
        config = model.config
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        # Builds each step's attention metadata (model/attention/backend.py).
        self.attention = select_attention_backend(attention_backend, device, num_heads, num_kv_heads)
        if not split_decodes and hasattr(self.attention, "num_splits"):
            # Speculative decoding: a decode row's keys in one range, as a row verifying drafts has
            # them, so both round alike (csrc/cpu/attention.cpp) and verification equals decoding.
            self.attention.num_splits = 1
        self.cuda_graphs = None  # CUDA: decode-only steps replay captured graphs (worker/cuda_graphs.py)
        # Draft-model speculation (worker/draft_runner.py): its KV cache sits on the target's block
        # ids, so every block move moves its layers too (host_kv_caches then holds both, target first).
        self.draft = draft
        self.block_caches = kv_caches + (draft.kv_caches if draft is not None else [])

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write: each (source, destination) block, K and V of every layer, in order."""
        if not copies:
            return
        sources = torch.tensor([s for s, _ in copies], device=self.device)
        targets = torch.tensor([d for _, d in copies], device=self.device)
        chained = len(set(targets.tolist()) & set(sources.tolist())) > 0
        for k_cache, v_cache in self.block_caches:
            for cache in (k_cache, v_cache):
                if chained:  # a copy reads another's destination: keep the order
                    for source, target in copies:
                        cache[target].copy_(cache[source])
                else:
                    cache.index_copy_(0, targets, cache.index_select(0, sources))

    @torch.inference_mode()
    def apply_block_copies(self, scheduler_output: SchedulerOutput | WorkerStep) -> None:
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
            move_blocks(self.block_caches, self.host_kv_caches, out.blocks_to_swap_out)
            move_blocks(self.host_kv_caches, self.block_caches, out.blocks_to_swap_in)
        self._copy_blocks(out.blocks_to_copy)
        if out.blocks_to_load:
            move_blocks(self.offload_host, self.kv_caches, out.blocks_to_load)

    @torch.inference_mode()
    def execute(self, step: WorkerStep) -> ModelRunnerOutput:
        if self._threads_to_bind:
            self._threads_to_bind = False
            bind_model_threads(self.num_threads)
        self.apply_block_copies(step)
        self.input_batch.apply(step)
        if self.lora_manager is not None:  # new adapters, removed ones; drops what no row uses
            self.lora_manager.apply(step, self.input_batch.lora_id)
        out = ModelRunnerOutput()
        decodes, prefills = [], []
        for row in step.rows:
            problem = self._check_row(row)
            if problem is not None:
                out.failed[row.request_id] = problem
            elif row.num_new_tokens == 1 and row.start > 0:
                decodes.append(row)
            else:
                prefills.append(row)
        if not decodes and not prefills:
            return out
        # CUDA graphs: a decode-only step (no LoRA rows) replays one from host arrays.
        graphs, host_step = self.cuda_graphs, None
        if graphs is not None and graphs.covers(len(decodes) + len(prefills), len(decodes)):
            host_step = self.input_batch.prepare_host_decodes(decodes)
            if host_step is not None and host_step.block_tables.shape[1] > graphs.max_blocks:
                host_step = None  # longer than the graphs were captured for: eager
        if host_step is not None:
            batch = host_step
            hidden = graphs.replay(host_step)
        else:
            # Decodes first, then prefill chunks (StepLayout's promise; backends sort further if they want).
            batch = self.input_batch.prepare(decodes + prefills, len(decodes), self.device)
            hidden = self._forward(batch, self._generated_tokens(decodes, prefills))
        return self._finish_step(batch, hidden, step.grammar_bitmask, out)

    def _generated_tokens(self, decodes: list[StepRow], prefills: list[StepRow]) -> torch.Tensor | None:
        """Positions among the step's tokens (decodes, then prefills) of those that are not prompt
        tokens, or None when the step computes no prompt token (or no layer asks)."""
        if not prefills or not self._marks_prompt_tokens:
            return None
        positions, offset, any_prompt = list(range(len(decodes))), len(decodes), False
        for row in prefills:
            end = row.start + row.num_new_tokens
            prompt = max(0, min(end, self.input_batch.states[row.request_id].num_prompt_tokens) - row.start)
            any_prompt = any_prompt or prompt > 0
            positions.extend(range(offset + prompt, offset + row.num_new_tokens))
            offset += row.num_new_tokens
        return torch.tensor(positions, dtype=torch.int64, device=self.device) if any_prompt else None

    def _forward(self, batch: StepTensors, generated: torch.Tensor | None = None) -> torch.Tensor:
        """The eager forward pass of a step (with its LoRA rows, if any). Where the step has prompt
        tokens, ``generated`` says which are not (`pagoda.model.quant.packed.w8a8_for_prompt_tokens`)."""
        with w8a8_for_prompt_tokens(generated):
            return self._forward_model(batch)

    def _forward_model(self, batch: StepTensors) -> torch.Tensor:
        if batch.lora_ids is not None:
            if self.lora_manager is None:
                raise RuntimeError("a row uses a LoRA adapter but this worker has LoRA off")
            meta = self.attention.build_metadata(batch.layout)
            self.lora_manager.begin_step(batch.lora_ids)  # LoRA path for this forward pass only
            try:
                return self.model(batch.input_ids, batch.positions, self.kv_caches, meta)
            finally:
                self.lora_manager.end_step()
        meta = self.attention.build_metadata(batch.layout)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, meta)

    def _finish_step(self, batch: StepTensors | HostDecodeStep, hidden: torch.Tensor,
                     grammar_bitmask: GrammarBitmask | None, out: ModelRunnerOutput) -> ModelRunnerOutput:
        """Sampling, verification and prompt logprobs from the step's hidden states."""
        states = self.input_batch.states
        sample_rows, sample_states = [], []
        verify_rows: list[int] = []  # speculative decoding: rows that verify drafts
        verify_states: list[RowState] = []
        verify_drafts_of: list[list[int]] = []
        prompt_rows: list[int] = []
        prompt_owner: list[tuple[RowState, int]] = []  # (request, position)
        offset = 0
        for row in batch.rows:
            first, last = row.prompt_logprob_range
            for position in range(first, last):
                prompt_rows.append(offset + position - row.start)
                prompt_owner.append((states[row.request_id], position))
            if row.draft_token_ids:  # every position scores a draft (or the token after the last)
                verify_rows.extend(range(offset + row.num_new_tokens - len(row.draft_token_ids) - 1,
                                         offset + row.num_new_tokens))
                verify_states.append(states[row.request_id])
                verify_drafts_of.append(row.draft_token_ids)
            elif row.samples:
                sample_rows.append(offset + row.num_new_tokens - 1)
                sample_states.append(states[row.request_id])
            offset += row.num_new_tokens

        if sample_rows:
            # Every token samples (decode-only steps, as a rule): the hidden states as they are.
            every_token = len(sample_rows) == hidden.shape[0] and sample_rows[-1] == len(sample_rows) - 1
            logits = self.model.compute_logits(
                hidden if every_token else hidden[torch.tensor(sample_rows, device=self.device)])
            result = self.sampler(logits, sample_states, self.input_batch.sampling_plan(sample_states),
                                  grammar_bitmask)
            candidates = result.beam_candidates or [None] * len(sample_states)
            for i, (state, token, logprobs, beams) in enumerate(
                    zip(sample_states, result.token_ids, result.logprobs, candidates)):
                if i in result.failed:
                    out.failed[state.request_id] = result.failed[i]
                    continue
                if beams is not None:
                    out.beam_candidates[state.request_id] = beams
                    continue
                out.sampled_token_ids[state.request_id] = token
                if logprobs is not None:
                    out.logprobs[state.request_id] = logprobs
        if verify_rows:  # speculative decoding: keep the accepted drafts, then one token of the target's
            logits = self.model.compute_logits(hidden[torch.tensor(verify_rows, device=self.device)])
            drafts = torch.tensor([t for d in verify_drafts_of for t in d], dtype=torch.long)
            result = self.rejection_sampler(logits, drafts, [len(d) for d in verify_drafts_of], verify_states,
                                            plan=self.input_batch.sampling_plan(verify_states))
            for i, state in enumerate(verify_states):
                if i in result.failed:
                    out.failed[state.request_id] = result.failed[i]
                    continue
                out.spec_token_ids[state.request_id] = result.token_ids[i]
                if result.logprobs[i] is not None:
                    out.spec_logprobs[state.request_id] = result.logprobs[i]
        if prompt_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(prompt_rows, device=self.device)])
            logprobs = torch.log_softmax(logits, dim=-1)
            for i, (state, position) in enumerate(prompt_owner):
                if state.request_id in out.failed:
                    continue
                try:
                    next_token = state.prompt_token_ids[position + 1]
                    entry = token_logprobs(logprobs[i], next_token, state.sampling_params.prompt_logprobs)
                except Exception as error:  # noqa: BLE001 - this row's prompt logprobs failed: it fails alone
                    out.failed[state.request_id] = describe_error(error)
                    continue
                out.prompt_logprobs.setdefault(state.request_id, []).append(entry)
        if self.draft is not None:  # mirror the kept tokens into the draft's KV; propose for the next step
            out.draft_token_ids = self.draft.run(self._draft_rows(batch.rows, out), self.input_batch)
        for request_id in out.failed:  # nothing of a failed row is reported but the failure
            for results in (out.sampled_token_ids, out.logprobs, out.prompt_logprobs, out.beam_candidates,
                            out.spec_token_ids, out.spec_logprobs, out.draft_token_ids):
                results.pop(request_id, None)
        return out

    @staticmethod
    def _draft_rows(rows: list[StepRow], out: ModelRunnerOutput) -> list[DraftRow]:
        """The step's rows as the draft mirrors them: the tokens kept (a verifying row's rejected
        drafts are not) and, for rows with lookahead slots, the token emitted last."""
        draft_rows = []
        for row in rows:
            request_id = row.request_id
            if request_id in out.failed:
                continue
            num_kept, last = row.num_new_tokens, None
            if row.draft_token_ids:
                emitted = out.spec_token_ids[request_id]
                num_kept += len(emitted) - 1 - len(row.draft_token_ids)
                last = emitted[-1]
            elif row.samples:
                last = out.sampled_token_ids.get(request_id)  # None for a beam's candidates
            draft_rows.append(DraftRow(request_id, row.start, num_kept,
                                       last if row.num_lookahead_tokens else None, row.num_lookahead_tokens))
        return draft_rows

    def _check_row(self, row: StepRow) -> str | None:
        """Why this row cannot run (its input would break the batch), or None."""
        try:
            state = self.input_batch.states[row.request_id]
            num_tokens = state.num_tokens
            if row.num_new_tokens < 1 or row.start < 0 or row.end - len(row.draft_token_ids) > num_tokens:
                return (f"it asks for positions {row.start}..{row.end - 1} of a sequence "
                        f"of {num_tokens} tokens")
            num_blocks = int(self.input_batch.num_blocks[state.row])
            if num_blocks * self.block_size < row.end:
                return (f"its block table ({num_blocks} blocks of {self.block_size}) "
                        f"does not reach position {row.end - 1}")
            if row.end - row.start == 1:  # a decode: one token, no array reductions
                low = high = int(self.input_batch.token_ids[state.row, row.start])
            else:
                tokens = self.input_batch.token_ids[state.row, row.start:row.end]
                low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                bad = low if low < 0 else high
                return f"token id {bad} is outside the vocabulary [0, {self.vocab_size})"
        except Exception as error:  # noqa: BLE001 - a row that cannot even be checked fails alone
            return describe_error(error)
        return None
