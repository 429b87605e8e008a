"""The narrow boundary between the engine and the worker: what the worker is told each step.

The scheduler plans a step over live `Request` objects (`SchedulerOutput`); the worker
never sees them. `WorkerStepBuilder` (engine side) turns each plan into a `WorkerStep` of
plain data: a request the worker has not seen (or must see afresh) comes whole, once, as
a `NewRequestData`; every other scheduled request comes as a `StepRow` carrying only what
changed since the worker last heard of it: the tokens appended to its sequence (usually the
one it sampled last step), the blocks appended to its block table (or the whole table when
it changed otherwise: preemption, swap-in, copy on write, an undone step). Requests that
finished or were aborted are named once in `finished_request_ids`, so the worker drops
their state. Everything in a WorkerStep is picklable and small, so a worker in another
process (or on several ranks) can be sent the same thing.

Invariant (the builder keeps it): for every request id the worker holds, the worker's token
ids and block table equal the engine's as of the last step that named it, once it has
applied the step's rows. After a failed step (or a beam fork) the engine calls `forget`
for those requests: the next step that schedules them sends them whole again. Every request
the worker was ever sent is named in `finished_request_ids` exactly once, when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.model.lora.request import LoRARequest
from pagoda.request import Request
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np


@dataclass
class NewRequestData:
    """A request the worker has to (re)build its state for: everything about it."""

    request_id: str
    token_ids: list[int]  # the whole sequence so far: prompt, then output
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    # Multi-LoRA: the adapter (name, id, path) the worker loads into a slot for this row; None: base.
    # lora_digest: the digest of the contents the engine checked (the worker refuses other contents).
    lora_request: LoRARequest | None = None
    lora_digest: str | None = None


@dataclass
class StepRow:
    """One scheduled request's share of the step.

    Compute K/V for positions start .. start + num_new_tokens - 1 (attending to every
    earlier position through the block table) and, if `samples`, sample the next token.
    """

    request_id: str
    start: int
    num_new_tokens: int
    samples: bool
    # Tokens appended to the sequence since the worker last heard of it.
    new_token_ids: list[int] = field(default_factory=list)
    # Blocks appended to the block table; or, when `block_ids` is set, the whole new table.
    new_block_ids: list[int] = field(default_factory=list)
    block_ids: list[int] | None = None
    # Positions whose logits give prompt logprobs this step: range(first, last).
    prompt_logprob_range: tuple[int, int] = (0, 0)
    # Speculative decoding: draft tokens to verify after the pending token. They are the last
    # len(draft_token_ids) of the num_new_tokens and not part of the sequence (the worker
    # writes them past its tokens, where the next step's accepted tokens overwrite them).
    draft_token_ids: list[int] = field(default_factory=list)
    # Draft-model speculation: tokens the draft model proposes after this step (0: none); the
    # block table reaches num_lookahead_tokens positions past `end` (ScheduledRequest).
    num_lookahead_tokens: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class GrammarBitmask:
    """Structured outputs: the tokens each row sampling under a grammar may take next.

    Row k of `bitmask` (int32 [len(request_ids), ceil(vocab / 32)]; bit j of word w set =
    token 32 * w + j allowed) belongs to the request `request_ids[k]`. Filled by the engine
    (structured_output/manager.py) from each request's grammar matcher; the worker sets the
    logits of the other tokens to -inf before sampling (structured_output/bitmask.py).
    """

    request_ids: list[str]
    bitmask: np.ndarray


@dataclass
class WorkerStep:
    new_requests: list[NewRequestData] = field(default_factory=list)
    rows: list[StepRow] = field(default_factory=list)  # in the scheduler's plan order
    finished_request_ids: list[str] = field(default_factory=list)
    # Block moves, in ModelRunner.apply_block_copies's order (core/scheduler_output.py).
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_offload: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_load: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Structured outputs: which tokens the constrained rows that sample may take (None: no such row).
    grammar_bitmask: GrammarBitmask | None = None
    # Multi-LoRA: adapter ids the engine will never send again (unloaded): the worker drops their
    # slot, host copy and path once no row of its batch uses them. Each id is named once.
    removed_lora_ids: list[int] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(row.num_new_tokens for row in self.rows)


@dataclass
class _Known:
    """What the worker holds of one request (the builder's mirror of it)."""

    request: Request
    num_tokens: int
    block_ids: list[int]
    stale: bool = False  # the worker's copy may be wrong: send the request whole next time


class WorkerStepBuilder:
    """Engine side of the boundary: remembers what the worker knows, sends only changes."""

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}
        self._removed_lora_ids: list[int] = []

    @property
    def num_known(self) -> int:
        return len(self._known)

    def build(self, out: SchedulerOutput) -> WorkerStep:
        step = WorkerStep(
            blocks_to_copy=out.blocks_to_copy, blocks_to_offload=out.blocks_to_offload,
            blocks_to_load=out.blocks_to_load, blocks_to_swap_out=out.blocks_to_swap_out,
            blocks_to_swap_in=out.blocks_to_swap_in,
        )
        step.finished_request_ids = self._sweep_finished()
        step.removed_lora_ids, self._removed_lora_ids = self._removed_lora_ids, []
        for item in out.scheduled:
            request = item.request
            request_id = request.request_id
            positions = item.prompt_logprob_positions
            row = StepRow(request_id, item.start, item.num_new_tokens, item.samples,
                          prompt_logprob_range=(positions.start, positions.stop),
                          draft_token_ids=list(item.spec_token_ids),
                          num_lookahead_tokens=item.num_lookahead_tokens)
            known = self._known.get(request_id)
            if known is None or known.stale:
                step.new_requests.append(NewRequestData(
                    request_id, list(request.all_token_ids), request.num_prompt_tokens,
                    request.sampling_params, request.eos_token_ids, list(item.block_table),
                    request.lora_request, request.lora_digest))
                self._known[request_id] = _Known(request, request.num_tokens, list(item.block_table))
            else:
                if request.num_tokens > known.num_tokens:
                    row.new_token_ids = request.all_token_ids[known.num_tokens:]
                    known.num_tokens = request.num_tokens
                table, sent = item.block_table, known.block_ids
                if len(table) >= len(sent) and table[:len(sent)] == sent:
                    if len(table) > len(sent):
                        row.new_block_ids = table[len(sent):]
                        sent.extend(row.new_block_ids)
                else:
                    row.block_ids = list(table)
                    known.block_ids = list(table)
            step.rows.append(row)
        return step

    def remove_lora(self, lora_int_id: int) -> None:
        """The next step tells the worker that this adapter id is gone (see WorkerStep)."""
        self._removed_lora_ids.append(lora_int_id)

    @property
    def has_removals(self) -> bool:
        return bool(self._removed_lora_ids)

    def forget(self, request_ids) -> None:
        """The worker's copy of these requests may be stale (a failed step, a beam fork):
        the next step that schedules them sends them whole."""
        for request_id in request_ids:
            known = self._known.get(request_id)
            if known is not None:  # still tracked, so its end is still announced
                known.stale = True

    def _sweep_finished(self) -> list[str]:
        """Requests that ended (finished, aborted, failed) since the last step."""
        done = [request_id for request_id, known in self._known.items() if known.request.is_finished]
        for request_id in done:
            del self._known[request_id]
        return done
