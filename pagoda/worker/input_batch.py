"""The worker's persistent batch: every live request's token ids, block table and sampling
state, kept across steps in preallocated arrays and updated in place from `WorkerStep`s.

A request gets a row when the worker first hears of it and keeps it until it is named in
`finished_request_ids` (preempted requests keep theirs: their RNG and tokens survive). A
step's tensors (input ids, positions, block tables, slot mapping) are gathered from the
rows it schedules with a handful of vectorized numpy operations, whatever the batch size.

Invariants: for a live row r, `token_ids[r, :num_tokens[r]]` is the request's sequence and
`block_table[r, :num_blocks[r]]` its block table, with zeros after it (the padding every
attention backend reads as "no block").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagoda.core.worker_step import NewRequestData, StepRow, WorkerStep
from pagoda.model.attention.metadata import StepLayout
from pagoda.request import num_beam_candidates_kept
from pagoda.sampling_params import SamplingParams, SamplingType
from pagoda.worker.sampler import SamplingPlan


class RowState:
    """A request as the worker's sampler sees it (the fields of `Request` it reads)."""

    def __init__(self, batch: InputBatch, row: int, data: NewRequestData, generator: torch.Generator | None):
        self._batch = batch
        self.row = row
        self.request_id = data.request_id
        self.sampling_params: SamplingParams = data.sampling_params
        self.prompt_token_ids = data.token_ids[:data.num_prompt_tokens]
        self.num_prompt_tokens = data.num_prompt_tokens
        self.eos_token_ids = data.eos_token_ids
        self.generator = generator
        params = data.sampling_params
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= data.eos_token_ids
        self.stop_token_set = frozenset(ids)
        self.num_beam_candidates = max(num_beam_candidates_kept(params.beam_width or 1, len(self.stop_token_set)),
                                       params.logprobs or 0)

    @property
    def num_tokens(self) -> int:
        return int(self._batch.num_tokens[self.row])

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self._batch.token_ids[self.row, self.num_prompt_tokens:self.num_tokens].tolist()

    def token_ids(self, start: int, end: int) -> list[int]:
        return self._batch.token_ids[self.row, start:end].tolist()


@dataclass
class StepTensors:
    """A step's model inputs, tokens of decodes first (rows in `rows` order)."""

    rows: list[StepRow]  # decodes first, then prefill chunks
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    layout: StepLayout  # what the attention backend builds its metadata from
    # Multi-LoRA: each token's adapter id (0: base), gathered from the rows like positions.
    lora_ids: np.ndarray | None = None


@dataclass
class HostDecodeStep:
    """A decode-only step's model inputs as host arrays, one token a row (rows in `rows` order),
    for a CUDA graph's replay: the graph runner packs them into its static buffers with one
    host-to-device copy (worker/cuda_graphs.py), where `prepare` would make a device tensor of each."""

    rows: list[StepRow]
    input_ids: np.ndarray  # [rows] int64
    positions: np.ndarray  # [rows] int64: each row's one new token
    slot_mapping: np.ndarray  # [rows] int64
    seq_lens: np.ndarray  # [rows] int64: positions + 1
    block_tables: np.ndarray  # [rows, blocks to hold the longest row] int32 (no LoRA rows: graphs take none)


class InputBatch:
    def __init__(self, block_size: int, max_model_len: int, initial_rows: int = 16):
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self._cols = min(max_model_len, 1024)  # token columns grow on demand up to max_model_len
        self.token_ids = np.zeros((initial_rows, self._cols), dtype=np.int64)
        self.num_tokens = np.zeros(initial_rows, dtype=np.int64)
        self.block_table = np.zeros((initial_rows, self.max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(initial_rows, dtype=np.int64)
        # Per-row sampling parameters and flags, set when a request gets its row (SamplingPlan).
        self.temperature = np.zeros(initial_rows, dtype=np.float32)
        self.top_k = np.zeros(initial_rows, dtype=np.int64)
        self.top_p = np.ones(initial_rows, dtype=np.float32)
        self.min_p = np.zeros(initial_rows, dtype=np.float32)
        self.is_random = np.zeros(initial_rows, dtype=bool)
        self.is_beam = np.zeros(initial_rows, dtype=bool)
        self.wants_logprobs = np.zeros(initial_rows, dtype=bool)
        self.always_processed = np.zeros(initial_rows, dtype=bool)  # logit bias or penalties
        self.num_prompt = np.zeros(initial_rows, dtype=np.int64)
        self.min_tokens = np.zeros(initial_rows, dtype=np.int64)  # 0 unless min_tokens bans a stop token
        # Multi-LoRA: each row's adapter id (0: base model). Ids, not slots: an adapter may move
        # to another slot while its request is not scheduled; the LoRAManager maps ids to the
        # step's slots (one lookup per distinct adapter, not per row).
        self.lora_id = np.zeros(initial_rows, dtype=np.int64)
        self.states: dict[str, RowState] = {}
        self._free_rows = list(range(initial_rows - 1, -1, -1))
        # Seeded requests' generators outlive a resync of their row (`add`), not their end.
        self._generators: dict[str, torch.Generator] = {}

    def __len__(self) -> int:
        return len(self.states)

    # -- updates -------------------------------------------------------------

    def apply(self, step: WorkerStep) -> None:
        """Drops ended requests, (re)builds new ones, appends every row's new tokens and blocks."""
        for request_id in step.finished_request_ids:
            self.remove(request_id)
        for data in step.new_requests:
            self.add(data)
        for row in step.rows:
            state = self.states[row.request_id]
            if row.new_token_ids:
                self._append_tokens(state.row, row.new_token_ids)
            if row.block_ids is not None:
                self._set_blocks(state.row, row.block_ids)
            elif row.new_block_ids:
                self._append_blocks(state.row, row.new_block_ids)
            if row.draft_token_ids:  # past the sequence: read as inputs, not counted as tokens
                end = int(self.num_tokens[state.row])
                self._append_tokens(state.row, row.draft_token_ids)
                self.num_tokens[state.row] = end

    def add(self, data: NewRequestData) -> RowState:
        old = self.states.get(data.request_id)
        if old is not None:  # sent whole again (after a failed step, a fork): rebuild its row
            self._release(old.row)
            del self.states[data.request_id]
        generator = self._generators.get(data.request_id)
        if generator is None and data.sampling_params.seed is not None:
            generator = torch.Generator().manual_seed(data.sampling_params.seed)
            self._generators[data.request_id] = generator
        row = self._take_row()
        state = RowState(self, row, data, generator)
        self.states[data.request_id] = state
        self.num_tokens[row] = 0
        self._append_tokens(row, data.token_ids)
        self._set_blocks(row, data.block_ids)
        self._set_sampling(row, state)
        self.lora_id[row] = data.lora_request.lora_int_id if data.lora_request is not None else 0
        return state

    def _set_sampling(self, row: int, state: RowState) -> None:
        p = state.sampling_params
        beam = p.use_beam_search
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k if p.top_k > 0 else 0
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.is_random[row] = p.sampling_type == SamplingType.RANDOM and not beam
        self.is_beam[row] = beam
        self.wants_logprobs[row] = (p.logprobs is not None or p.num_samples > p.n) and not beam
        self.always_processed[row] = bool(p.logit_bias) or p.needs_penalties
        self.num_prompt[row] = state.num_prompt_tokens
        # min_tokens matters only while it bans something (sampler._processed_row).
        self.min_tokens[row] = p.min_tokens if state.stop_token_set else 0

    def sampling_plan(self, states: list[RowState]) -> SamplingPlan:
        """The SamplingPlan of these rows (in this order), from the per-row arrays."""
        index = np.fromiter((state.row for state in states), dtype=np.int64, count=len(states))

        def where(flags: np.ndarray) -> list[int]:
            return np.flatnonzero(flags).tolist()

        num_output = self.num_tokens[index] - self.num_prompt[index]
        processing = self.always_processed[index] | (num_output < self.min_tokens[index])
        return SamplingPlan(
            temperature=torch.from_numpy(self.temperature[index]), top_k=torch.from_numpy(self.top_k[index]),
            top_p=torch.from_numpy(self.top_p[index]), min_p=torch.from_numpy(self.min_p[index]),
            random_rows=where(self.is_random[index]), beam_rows=where(self.is_beam[index]),
            logprob_rows=where(self.wants_logprobs[index]), processing_rows=where(processing),
        )

    def remove(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        state = self.states.pop(request_id, None)
        if state is not None:
            self._release(state.row)

    def _take_row(self) -> int:
        if not self._free_rows:
            old = len(self.num_tokens)
            self._grow_rows(old * 2)
            self._free_rows = list(range(old * 2 - 1, old - 1, -1))
        return self._free_rows.pop()

    def _release(self, row: int) -> None:
        self.block_table[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
        self.num_tokens[row] = 0
        self.lora_id[row] = 0
        self._free_rows.append(row)

    def _grow_rows(self, rows: int) -> None:
        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
            bigger[:len(array)] = array
            return bigger
        for name in ("token_ids", "num_tokens", "block_table", "num_blocks", "temperature", "top_k", "top_p",
                     "min_p", "is_random", "is_beam", "wants_logprobs", "always_processed", "num_prompt",
                     "min_tokens", "lora_id"):
            setattr(self, name, grown(getattr(self, name)))

    def _append_tokens(self, row: int, token_ids: list[int]) -> None:
        start = int(self.num_tokens[row])
        end = start + len(token_ids)
        if end > self._cols:
            cols = min(max(end, self._cols * 2), max(self.max_model_len, end))
            bigger = np.zeros((len(self.token_ids), cols), dtype=np.int64)
            bigger[:, :self._cols] = self.token_ids
            self.token_ids, self._cols = bigger, cols
        self.token_ids[row, start:end] = token_ids
        self.num_tokens[row] = end

    def _set_blocks(self, row: int, block_ids: list[int]) -> None:
        self.block_table[row, :self.num_blocks[row]] = 0
        self.block_table[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    # -- a step's tensors ----------------------------------------------------

    def prepare(self, rows: list[StepRow], num_decodes: int, device: torch.device) -> StepTensors:
        """Model inputs for `rows` (decodes first): gathered from the persistent arrays."""
        index = np.fromiter((self.states[r.request_id].row for r in rows), dtype=np.int64, count=len(rows))
        starts = np.fromiter((r.start for r in rows), dtype=np.int64, count=len(rows))
        counts = np.fromiter((r.num_new_tokens for r in rows), dtype=np.int64, count=len(rows))
        token_row, positions, layout = self.layout(index, starts, counts, num_decodes, device)
        input_ids = self.token_ids[index[token_row], positions]
        row_lora = self.lora_id[index]
        lora_ids = row_lora[token_row] if row_lora.any() else None
        return StepTensors(rows, torch.from_numpy(input_ids).to(device), torch.from_numpy(positions).to(device),
                           layout, lora_ids)

    def prepare_host_decodes(self, rows: list[StepRow]) -> HostDecodeStep | None:
        """Host arrays for `rows`, decodes only (one new token each, earlier context); None where
        a row uses a LoRA adapter (graphs take none)."""
        index = np.fromiter((self.states[r.request_id].row for r in rows), dtype=np.int64, count=len(rows))
        if self.lora_id[index].any():
            return None
        positions = np.fromiter((r.start for r in rows), dtype=np.int64, count=len(rows))
        seq_lens = positions + 1
        bs = self.block_size
        tables = self.block_table[index, :int(-(-seq_lens.max() // bs))]
        slots = tables[np.arange(len(rows)), positions // bs].astype(np.int64) * bs + positions % bs
        return HostDecodeStep(rows, self.token_ids[index, positions], positions, slots, seq_lens, tables)

    def layout(self, index: np.ndarray, starts: np.ndarray, counts: np.ndarray, num_decodes: int,
               device: torch.device) -> tuple[np.ndarray, np.ndarray, StepLayout]:
        """Rows `index` (batch rows) writing counts[i] positions from starts[i]: each token's row
        (0..len(index)-1), each token's position, and the attention layout over the rows'
        block tables. The draft model (worker/draft_runner.py) lays out its passes with it."""
        seq_lens = starts + counts
        total = int(counts.sum())
        token_row = np.repeat(np.arange(len(index)), counts)
        first_token = np.cumsum(counts) - counts
        positions = np.repeat(starts - first_token, counts) + np.arange(total)
        max_blocks = int(-(-seq_lens.max() // self.block_size))
        tables = self.block_table[index, :max_blocks]
        bs = self.block_size
        slots = tables[token_row, positions // bs].astype(np.int64) * bs + positions % bs
        layout = StepLayout.build(
            counts.tolist(), seq_lens.tolist(), num_decodes,
            torch.from_numpy(np.ascontiguousarray(tables)).to(device), bs,
            slot_mapping=torch.from_numpy(slots).to(device))
        return token_row, positions, layout
