"""Continuous batching with one token budget per step.

Each step, running requests go first (oldest first), each asking for the
tokens it lacks (`num_tokens - num_computed_tokens`: one when decoding, a
chunk of the prompt when prefilling), capped by what is left of the budget.
When the pool runs dry the youngest running request is preempted and goes
back to the front of the queue: by recompute (its blocks are freed, its KV
is computed again when it is admitted again) or, with preemption_mode
"swap" and room in the swap space for all its blocks, by swap (its blocks
are copied to host memory; it keeps `num_computed_tokens`, and is swapped
back in, into fresh device blocks, when it reaches the head of the queue).
Waiting requests are then admitted first-come-first-served while budget,
sequence slots and blocks last; preempted ones, at the front, resume ahead
of new ones. A request whose grammar is still compiling (structured outputs,
`Request.waiting_for_grammar`) is passed over until it is ready; each token
appended to a request with a grammar advances its matcher
(`update_from_output`), and a token the grammar refuses fails that request.

With the "priority" policy, `waiting` and `running` are kept sorted by
(priority, preempted first, arrival): admission takes the most urgent
request, the preemption victim is the last running one (least urgent,
youngest), and a waiting request may preempt running requests of strictly
lower priority (larger value) to get blocks or a sequence slot.

Beam search: a beam that has reported its next-token candidates has
nothing to compute until the engine's beam group appends the token it
chose; such beams are skipped (running or waiting). `fork_request` makes a
beam a copy of another, sharing its blocks. If nothing at all can run, the
youngest idle beam is preempted so the sibling it waits for gets blocks.

Swapping within one step. The worker runs the step's device reads
(offload-tier saves, swap-outs), then its device writes (swap-ins,
copy-on-write copies, offload-tier loads), then the forward pass
(`ModelRunner.apply_block_copies`; host-block reuse is covered in
core/swap_space.py: host blocks a swap-in read are freed in
`update_from_output`). Two rules keep that order safe:
- a victim already planned in this step (the priority policy takes back a
  planned request) is preempted by recompute: its new blocks and its
  copies are still pending, so its device blocks do not yet hold what a
  swap-out would copy;
- no swap-in follows a preemption in the same step, so every swap-in
  destination was free when the step began and nothing else in the step
  reads or writes it (a block a preempted request just freed may still be
  the source or target of a pending copy). Under fcfs this is the rule
  that nothing is admitted after a preemption; under priority, a swapped
  request that preempted to get blocks is swapped in one step later.

Failures (the engine's rules are in engine/llm_engine.py): a request that
raises while being planned fails alone (`SchedulerOutput.failed`), one whose
update raises is reported (`RequestUpdate.error`) for the engine to end it;
`undo_step` restores the bookkeeping when the worker raised on a whole step,
and `schedule_alone` plans one suspect by itself.

Invariants:
- a request is in exactly one of `waiting`, `running`, or neither (finished);
- a waiting request holds no device blocks; a swapped one (status SWAPPED)
  holds host blocks only, one per device block it held; a running request
  holds exactly ceil(num_computed_tokens / block_size) blocks between steps;
- progress: the oldest running request can always be scheduled, because the
  engine refuses a `max_model_len` larger than the whole cache.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler_output import (
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    describe_error,
)
from pagoda.core.swap_space import SwapSpace
from pagoda.request import Request, RequestStatus, TokenLogprobs


@dataclass
class RequestUpdate:
    """What one step did to one request, for the output processor."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    new_prompt_logprobs: list[TokenLogprobs]
    finished: bool
    # Set when the request failed in this step (its row in the worker, its update here): the
    # error as text. Nothing else of the update is to be used; the engine ends the request.
    error: str | None = None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int  # by recompute and by swap
    prefix_cache_queries_total: int = 0  # prompt tokens looked up at admission
    prefix_cache_hits_total: int = 0  # of those, tokens found cached
    # Offload tiers: blocks saved to host memory on eviction, and brought back from each tier.
    kv_offload_saved_blocks_total: int = 0
    kv_offload_host_hits_total: int = 0
    kv_offload_disk_hits_total: int = 0
    # Fragmentation, summed over steps: tokens whose KV the scheduled requests store
    # after the step, and the token slots of the blocks they hold.
    kv_tokens_stored_total: int = 0
    kv_token_slots_total: int = 0
    # Swap preemption: requests and blocks moved each way, requests now swapped out, host pool use.
    num_swapped_out_total: int = 0
    num_swapped_in_total: int = 0
    num_blocks_swapped_out_total: int = 0
    num_blocks_swapped_in_total: int = 0
    num_swapped: int = 0
    swap_space_usage: float = 0.0
    # Tokens whose KV recompute preemptions dropped (computed again unless still in the prefix cache).
    num_tokens_dropped_total: int = 0
    # Speculative decoding: drafts verified, their tokens, the accepted ones, and by draft position.
    spec_decode_num_drafts_total: int = 0
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    spec_decode_accepted_per_position: tuple[int, ...] = ()
    # Multi-LoRA: names of the adapters of running and of waiting requests; max_loras (0: LoRA off).
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0

    @property
    def kv_token_efficiency(self) -> float:
        """Tokens stored / token slots allocated, over all steps so far (1.0 = no waste)."""
        return self.kv_tokens_stored_total / self.kv_token_slots_total if self.kv_token_slots_total else 1.0


@dataclass
class SpecDecodeStats:
    """Speculative decoding so far: drafts verified, draft tokens, accepted ones (in all and by
    position: accepted_per_position[j] counts drafts whose token j was accepted)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position.extend([0] * (num_drafts - len(self.accepted_per_position)))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verifying step emits on average: accepted drafts + the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_model_len: int,
                 swap_space: SwapSpace | None = None, max_loras: int = 0):
        """`swap_space`: host blocks for preemption_mode "swap" (its KV cache manager must be
        `kv_cache`); without it, or with no blocks, every preemption is by recompute.
        `max_loras`: the most distinct LoRA adapters the running batch may hold (the worker's
        slots): a waiting request whose adapter would be one too many keeps waiting."""
        self.config = config
        self.max_loras = max_loras
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.swap_space = swap_space
        if swap_space is not None and swap_space.kv_cache is not kv_cache:
            raise ValueError("swap_space belongs to another KV cache manager")
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self.num_preemptions_total = 0
        self.num_swapped_out_total = 0
        self.num_swapped_in_total = 0
        self.num_blocks_swapped_out_total = 0
        self.num_blocks_swapped_in_total = 0
        self.num_tokens_dropped_total = 0
        self.kv_tokens_stored_total = 0
        self.kv_token_slots_total = 0
        self.spec_stats = SpecDecodeStats()

    # -- lifecycle ---------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use.")
        self._requests[request.request_id] = request
        self._enqueue(request, front=False)

    @property
    def _by_priority(self) -> bool:
        return self.config.policy == "priority"

    @staticmethod
    def _urgency(request: Request) -> tuple:
        """Sort key under the priority policy: smaller is served first."""
        preempted = request.status in (RequestStatus.PREEMPTED, RequestStatus.SWAPPED)
        return (request.priority, not preempted, request.arrival_time)

    def _enqueue(self, request: Request, front: bool) -> None:
        """Into `waiting`: sorted by urgency (priority policy), else at the back, or the front if `front`."""
        if self._by_priority:
            keys = [self._urgency(r) for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, self._urgency(request)), request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def _start_running(self, request: Request) -> None:
        if self._by_priority:
            keys = [(r.priority, r.arrival_time) for r in self.running]
            self.running.insert(bisect.bisect_right(keys, (request.priority, request.arrival_time)), request)
        else:
            self.running.append(request)

    @property
    def _swap_enabled(self) -> bool:
        return self.config.preemption_mode == "swap" and self.swap_space is not None and \
            self.swap_space.num_blocks > 0

    def abort_requests(self, request_ids: list[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[Request]:
        """Removes requests wherever they are and frees their blocks (host blocks too).
        `status`: the finished status they get (FINISHED_ERROR when the engine failed them)."""
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            request.status = status
            self._remove(request)
            aborted.append(request)
        return aborted

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Ends a request from outside (a stop string matched in its text)."""
        request = self._requests.get(request_id)
        if request is not None:
            request.status = status
            self._remove(request)

    def _remove(self, request: Request) -> None:
        self._detach(request)
        self._requests.pop(request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries_total=self.kv_cache.prefix_stats.queries,
            prefix_cache_hits_total=self.kv_cache.prefix_stats.hits,
            **self._offload_stats(),
            kv_tokens_stored_total=self.kv_tokens_stored_total,
            kv_token_slots_total=self.kv_token_slots_total,
            num_swapped_out_total=self.num_swapped_out_total,
            num_swapped_in_total=self.num_swapped_in_total,
            num_blocks_swapped_out_total=self.num_blocks_swapped_out_total,
            num_blocks_swapped_in_total=self.num_blocks_swapped_in_total,
            num_swapped=self.swap_space.num_requests if self.swap_space is not None else 0,
            swap_space_usage=self.swap_space.usage if self.swap_space is not None else 0.0,
            num_tokens_dropped_total=self.num_tokens_dropped_total,
            spec_decode_num_drafts_total=self.spec_stats.num_drafts,
            spec_decode_num_draft_tokens_total=self.spec_stats.num_draft_tokens,
            spec_decode_num_accepted_tokens_total=self.spec_stats.num_accepted_tokens,
            spec_decode_accepted_per_position=tuple(self.spec_stats.accepted_per_position),
            running_lora_adapters=_adapter_names(self.running),
            waiting_lora_adapters=_adapter_names(self.waiting),
            max_lora=self.max_loras,
        )

    def _running_loras(self) -> set[int]:
        return {r.lora_int_id for r in self.running if r.lora_int_id}

    def _lora_fits(self, request: Request, active: set[int] | None = None) -> bool:
        """Running `request` keeps the running batch within `max_loras` distinct adapters
        (`active`: the running batch's adapter ids, if the caller has them)."""
        lora_id = request.lora_int_id
        if not lora_id:
            return True
        active = self._running_loras() if active is None else active
        return lora_id in active or len(active) < self.max_loras

    def lora_in_use(self, lora_int_id: int) -> bool:
        """Some unfinished request (running or waiting) uses this adapter id."""
        return any(r.lora_int_id == lora_int_id for r in self._requests.values() if not r.is_finished)

    def _offload_stats(self) -> dict[str, int]:
        offload = self.kv_cache.offload
        if offload is None:
            return {}
        return dict(kv_offload_saved_blocks_total=offload.stats.offloaded_blocks,
                    kv_offload_host_hits_total=offload.stats.host_hits,
                    kv_offload_disk_hits_total=offload.stats.disk_hits)

    # -- scheduling --------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """This step's plan.

        A request that raises while being planned is failed alone (status FINISHED_ERROR, out
        of the scheduler, its blocks freed) and listed in `failed`; the plan goes on.
        """
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new == 0:  # a beam waiting for its group to choose its next token
                i += 1
                continue
            drafts = self._drafts_to_verify(request, num_new, budget)
            lookahead = self._lookahead(request, num_new, len(drafts))
            try:
                if (drafts or lookahead) and not self.kv_cache.allocate_slots(
                        request.request_id, request.num_computed_tokens + num_new + len(drafts) + lookahead,
                        first_write=request.num_computed_tokens):
                    drafts, lookahead = [], 0  # drafts are a bet: they never preempt anyone
                if not self._make_room(request, num_new, out):
                    break  # `request` itself was preempted; everything after it too.
                item = self._scheduled(request, num_new, drafts, lookahead)
                num_new += len(drafts)
            except Exception as error:  # noqa: BLE001 - one request's planning failed: it fails alone
                self._fail(request, error, out)  # out of `running`: `i` is the next one already
                continue
            out.scheduled.append(item)
            budget -= num_new
            i += 1

        # Admit waiting requests only if nobody had to be preempted to run the
        # running ones: otherwise we would evict one request to admit another
        # (the priority policy evicts only for a more urgent request).
        running_preempted = out.num_preempted > 0
        while self.waiting and budget > 0 and not running_preempted:
            # Skip beams that have nothing to compute until their group picks their next token,
            # and requests whose grammar is still compiling (structured outputs).
            # And requests whose LoRA adapter would need a slot none is free for (vLLM's rule).
            active = self._running_loras()
            request = next((r for r in self.waiting if r.beam_candidates is None and not r.waiting_for_grammar
                            and self._lora_fits(r, active)), None)
            if request is None:
                break
            try:
                if len(self.running) >= self.config.max_num_seqs:
                    refund = self._preempt_less_urgent(request, out)
                    if refund is None:
                        break
                    budget += refund
                    continue
                if request.status == RequestStatus.SWAPPED:
                    if out.num_preempted:
                        break  # no swap-in after a preemption in the same step (module docstring)
                    # Its KV comes back from host memory into fresh blocks, with room for its next tokens.
                    num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                    swap_in = self.swap_space.swap_in(request.request_id, request.num_computed_tokens + num_new)
                    if swap_in is None:
                        refund = self._preempt_less_urgent(request, out)
                        if refund is None:
                            break
                        budget += refund
                        continue
                    out.blocks_to_swap_in.extend(swap_in)
                    self.num_swapped_in_total += 1
                    self.num_blocks_swapped_in_total += len(swap_in)
                else:
                    # A request being admitted holds no blocks (new, or preempted by recompute): it
                    # starts after the blocks it can share (a sibling's prompt, or cached prefix).
                    start = self._shared_start(request)
                    if start is None:
                        break  # a sibling is still computing the prompt this request will share
                    shared, num_cached, forked = start
                    num_new = min(request.num_tokens - num_cached, budget)
                    if not self.kv_cache.allocate_slots(request.request_id, num_cached + num_new, shared, num_cached):
                        refund = self._preempt_less_urgent(request, out)
                        if refund is None:
                            break
                        budget += refund
                        continue
                    if not forked:
                        self.kv_cache.count_prefix_query(request.num_tokens, num_cached)
                    request.num_computed_tokens = request.num_cached_tokens = num_cached
                self._admit(request)
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
            except Exception as error:  # noqa: BLE001 - one request's admission failed: it fails alone
                self._fail(request, error, out)
        if not out.scheduled and self.waiting and out.num_preempted == 0:
            # Nothing could run: every running request is an idle beam (it waits for a sibling)
            # and the waiting ones lack blocks. Free the youngest idle beam's blocks (it keeps its
            # candidates) and try again, so the siblings it waits for can be admitted.
            idle = [r for r in self.running if r.num_computed_tokens == r.num_tokens]
            if idle:
                self.running.remove(idle[-1])
                # By recompute: this step's plan (where a swap-out would be listed) is redone.
                self._preempt(idle[-1], out, planned=True)
                again = self.schedule()
                again.failed = {**out.failed, **again.failed}
                return again
        return self._complete_plan(out)

    def _admit(self, request: Request) -> None:
        """A waiting request joins the running batch (its blocks are already allocated)."""
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self._start_running(request)

    def _complete_plan(self, out: SchedulerOutput) -> SchedulerOutput:
        """Adds the step's block moves and counts what the scheduled requests store."""
        out.blocks_to_copy = self.kv_cache.take_pending_copies()
        if self.kv_cache.offload is not None:
            out.blocks_to_offload, out.blocks_to_load = self.kv_cache.offload.take_step_copies()
        for item in out.scheduled:
            self.kv_tokens_stored_total += item.end
            self.kv_token_slots_total += len(self.kv_cache.block_table(item.request_id)) * self.kv_cache.block_size
        return out

    def schedule_alone(self, request: Request) -> SchedulerOutput:
        """A plan with `request` only: the engine isolates a request suspected of failing a
        batched step (engine/llm_engine.py); everyone else waits a step. Running requests keep
        their blocks unless `request` needs them: then the youngest are preempted as usual.
        A swapped `request` is recomputed instead of swapped in (a swap-in must not follow a
        preemption in the same step), and a sibling of an n > 1 request takes its prompt from
        the prefix cache instead of forking it (the sibling may be waiting). An empty plan if
        `request` has nothing to compute."""
        out = SchedulerOutput()
        if self._requests.get(request.request_id) is not request or request.is_finished:
            return self._complete_plan(out)
        budget = self.config.max_num_batched_tokens
        try:
            if request.status == RequestStatus.SWAPPED:
                self.swap_space.free(request.request_id)
                request.status = RequestStatus.PREEMPTED
                request.num_computed_tokens = 0
            if request.status == RequestStatus.RUNNING:
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                first_write, shared, num_cached = request.num_computed_tokens, (), None
            elif request.beam_candidates is None:
                shared = self.kv_cache.find_cached_prefix(request)
                num_cached = first_write = len(shared) * self.kv_cache.block_size
                num_new = min(request.num_tokens - num_cached, budget)
            else:
                num_new = 0  # an idle beam: nothing to compute until its group chooses
            if num_new == 0 or (num_cached is not None and not self._lora_fits(request)):
                return self._complete_plan(out)
            while num_cached is not None and len(self.running) >= self.config.max_num_seqs:
                if not self._preempt_youngest_but(request, out):
                    return self._complete_plan(out)
            while not self.kv_cache.allocate_slots(request.request_id, first_write + num_new, shared, first_write):
                if not self._preempt_youngest_but(request, out):
                    return self._complete_plan(out)
            if num_cached is not None:  # admitted
                self.kv_cache.count_prefix_query(request.num_tokens, num_cached)
                request.num_computed_tokens = request.num_cached_tokens = num_cached
                self._admit(request)
            out.scheduled.append(self._scheduled(request, num_new))
        except Exception as error:  # noqa: BLE001 - the isolated request's planning failed: it fails alone
            self._fail(request, error, out)
        return self._complete_plan(out)

    def _preempt_youngest_but(self, request: Request, out: SchedulerOutput) -> bool:
        """Preempts the youngest (least urgent) running request other than `request`; False if none."""
        victims = [r for r in self.running if r is not request]
        if not victims:
            return False
        self.running.remove(victims[-1])
        self._preempt(victims[-1], out)
        return True

    def _fail(self, request: Request, error: Exception, out: SchedulerOutput) -> None:
        """`request` raised while being planned: out of the scheduler, blocks freed, reported."""
        request.status = RequestStatus.FINISHED_ERROR
        self._remove(request)
        out.scheduled = [item for item in out.scheduled if item.request is not request]
        self.kv_cache.drop_copies_into_free_blocks()
        out.failed[request.request_id] = describe_error(error)

    def _make_room(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Allocates blocks for `request`, preempting the youngest as needed.

        Returns False when `request` itself had to be preempted.
        """
        while not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens + num_new,
                                               first_write=request.num_computed_tokens):
            victim = self.running.pop()
            self._preempt(victim, out)  # not planned yet: the loop plans running requests in order
            if victim is request:
                return False
        return True

    def _shared_start(self, request: Request) -> tuple[list[int], int, bool] | None:
        """Blocks a request being admitted starts with, how many tokens they hold, and whether
        they are a sibling's (a fork); None to wait.

        A sibling of an n > 1 request forks the first sibling's prompt blocks
        once they are written (all but the last prompt token, which it computes
        itself to sample its own first token; the block holding it is copied on
        write). Otherwise: the longest cached prefix.
        """
        first = request.fork_of
        prompt_len = request.num_prompt_tokens
        if (first is not None and self.kv_cache.enable_fork_sharing and request.num_preemptions == 0
                and prompt_len > 1 and request.sampling_params.prompt_logprobs is None and not first.is_finished):
            if first.status == RequestStatus.RUNNING and first.num_computed_tokens >= prompt_len - 1:
                blocks = self.kv_cache.block_table(first.request_id)
                return blocks[:-(-(prompt_len - 1) // self.kv_cache.block_size)], prompt_len - 1, True
            return None
        cached = self.kv_cache.find_cached_prefix(request)
        return cached, len(cached) * self.kv_cache.block_size, False

    def get_request(self, request_id: str) -> Request | None:
        """The live request with this id (waiting, running, preempted or swapped), if any."""
        return self._requests.get(request_id)

    def fork_request(self, source: Request, target: Request) -> None:
        """Beam search: `target` becomes a copy of `source`'s sequence, sharing its KV blocks
        (ref counts; the partly filled last block is copied when one of them first writes
        into it). Whatever `target` held before is released.

        A running source's copy runs next to it; if the source holds no KV (preempted), or
        `max_num_seqs` requests already run, the copy waits and is recomputed when admitted
        (from the prefix cache, where the source's full blocks are registered).
        """
        if target.request_id in self._requests:
            self._detach(target)
        self._requests[target.request_id] = target
        target.all_token_ids = list(source.all_token_ids)
        target.output_token_ids = list(source.output_token_ids)
        target.output_logprobs = list(source.output_logprobs)
        target.beam_candidates = None
        if (source.status == RequestStatus.RUNNING and len(self.running) < self.config.max_num_seqs
                and self.kv_cache.fork(source.request_id, target.request_id)):
            target.num_computed_tokens = source.num_computed_tokens
            target.status = RequestStatus.RUNNING
            if target.first_scheduled_time is None:
                target.first_scheduled_time = time.monotonic()
            self._start_running(target)
        else:
            target.num_computed_tokens = 0
            target.status = RequestStatus.PREEMPTED
            self._enqueue(target, front=True)

    def _detach(self, request: Request) -> None:
        """Out of `running`/`waiting`, blocks freed; still known to the scheduler."""
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv_cache.free(request.request_id)
        if self.swap_space is not None:
            self.swap_space.free(request.request_id)

    def _preempt_less_urgent(self, request: Request, out: SchedulerOutput) -> int | None:
        """Priority policy: preempts the least urgent running request if it has a strictly
        larger priority value than `request`. Returns the budget its step plan gave back
        (0 if it was not planned this step), or None if nobody may be preempted."""
        if not self._by_priority or not self.running or self.running[-1].priority <= request.priority:
            return None
        victim = self.running.pop()
        refund = 0
        planned = False
        for index, item in enumerate(out.scheduled):
            if item.request is victim:
                refund = item.num_new_tokens
                planned = True
                del out.scheduled[index]
                break
        self._preempt(victim, out, planned)
        return refund

    def _preempt(self, request: Request, out: SchedulerOutput, planned: bool = False) -> None:
        """Preempts a request just taken out of `running` and puts it at the front of `waiting`.

        By swap when the mode is "swap", the request was not `planned` in this
        step (module docstring) and the swap space has room for all its
        blocks; otherwise by recompute.
        """
        request_id = request.request_id
        # A block a pending copy still has to fill (an unshared fork) holds nothing to swap yet.
        if (self._swap_enabled and not planned and not self.kv_cache.has_pending_copy_into(request_id)
                and self.swap_space.can_swap_out(request_id)):
            swap_out = self.swap_space.swap_out(request_id)
            out.blocks_to_swap_out.extend(swap_out)
            request.status = RequestStatus.SWAPPED  # keeps num_computed_tokens
            self.num_swapped_out_total += 1
            self.num_blocks_swapped_out_total += len(swap_out)
        else:
            self.kv_cache.free(request_id)
            request.status = RequestStatus.PREEMPTED
            self.num_tokens_dropped_total += request.num_computed_tokens
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        out.num_preempted += 1
        self._enqueue(request, front=True)

    def _drafts_to_verify(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The request's draft tokens that fit this step: only after its one pending token
        (a decode), within the token budget and the model's length."""
        drafts = request.spec_token_ids
        if not drafts or request.num_tokens - request.num_computed_tokens != 1 or num_new != 1:
            return []
        room = min(budget - num_new, self.max_model_len - request.num_tokens)
        return list(drafts[:max(room, 0)])

    def _lookahead(self, request: Request, num_new: int, num_drafts: int) -> int:
        """Draft-model speculation: slots past this step's `num_new` tokens for the tokens the
        draft model proposes after it (`Request.spec_lookahead`, set by the speculator). The
        token the step emits last lands at position `end` at most (every draft accepted); the
        draft writes its KV and that of its first k - 1 proposals: k slots past `end`. Only for
        a chunk that samples, and never past max_model_len. They hold nothing but the draft's
        scratch KV within the step: `_update_one`/`_update_verified` free them after it."""
        if not request.spec_lookahead or request.num_computed_tokens + num_new < request.num_tokens:
            return 0
        end = request.num_computed_tokens + num_new + num_drafts
        return max(0, min(request.spec_lookahead, self.max_model_len - end))

    def _scheduled(self, request: Request, num_new: int, drafts: list[int] | None = None,
                   lookahead: int = 0) -> ScheduledRequest:
        drafts = drafts or []
        return ScheduledRequest(
            request=request,
            start=request.num_computed_tokens,
            num_new_tokens=num_new + len(drafts),
            # A copy: the plan of this step must not change when the table grows.
            block_table=list(self.kv_cache.block_table(request.request_id)),
            spec_token_ids=drafts,
            num_lookahead_tokens=lookahead,
        )

    # -- results -----------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        updates = []
        now = time.monotonic()
        if scheduler_output.blocks_to_swap_in:
            # The worker has run this step's swap-ins: the host blocks they read are free now
            # (not before: a swap-out of the same step runs first and would overwrite them).
            self.swap_space.release([host for host, _ in scheduler_output.blocks_to_swap_in])
        for item in scheduler_output.scheduled:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            error = runner_output.failed.get(request.request_id)
            if error is None:
                try:
                    update = self._update_one(item, runner_output, now)
                except Exception as exc:  # noqa: BLE001 - its update (text, stop check) failed: it fails alone
                    error = describe_error(exc)
                else:
                    if update is not None:
                        updates.append(update)
                    continue
            # Failed: reported for the engine to end it (it is still in the scheduler until then).
            updates.append(RequestUpdate(request, [], [], [], False, error=error))
        return updates

    def undo_step(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """The worker raised while running `scheduler_output`: it may have stopped anywhere, so
        none of the step's block moves and KV writes can be trusted to have happened. Puts the
        bookkeeping back into a state that holds whatever the worker did:

        - blocks loaded from the offload tiers were registered in the prefix cache under their
          hash before the copy ran: they forget it (a later request must not hit them);
        - host slots that offloads were to fill forget their hash (never written to disk);
        - host blocks that swap-ins read are released; requests swapped out in this step keep
          no half-written host copy: they are preempted by recompute instead (host blocks freed);
        - a request holding a destination of the step's swap-ins, copy-on-write copies or tier
          loads may lack KV it counts as computed: it is reset to recompute (blocks freed, the
          ones registered in earlier steps stay cached; num_computed_tokens 0; at the front of
          the queue in plan order; a sibling of an n > 1 request no longer forks its prompt);
        - every other scheduled request keeps num_computed_tokens and the blocks holding those
          tokens (the ones allocated for the step are freed): the step's writes were all at
          positions from there on, into its own unregistered blocks, and the next step that
          runs it writes them again. Nothing of the step was registered in the prefix cache
          (that happens in `update_from_output`).

        Nothing here counts as a preemption. Returns the scheduled requests in plan order: the
        suspects of the failure.
        """
        out = scheduler_output
        kv = self.kv_cache
        for _, block_id in out.blocks_to_load:
            kv.pool.uncache(block_id)
        if kv.offload is not None:
            kv.offload.discard([slot for _, slot in out.blocks_to_offload])
        if out.blocks_to_swap_in:
            self.swap_space.release([host for host, _ in out.blocks_to_swap_in])
        written = {host for _, host in out.blocks_to_swap_out}
        if written:
            for request in self.waiting:
                host = set(self.swap_space.host_table(request.request_id))
                if request.status == RequestStatus.SWAPPED and written & host:
                    self.swap_space.free(request.request_id)
                    request.status = RequestStatus.PREEMPTED
                    request.num_computed_tokens = 0
        moved_into = {target for _, target in out.blocks_to_swap_in + out.blocks_to_copy + out.blocks_to_load}
        reset = [r for r in self.running if moved_into & set(kv.block_table(r.request_id))]
        for request in reversed(reset):
            self._detach(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            request.beam_candidates = None
            request.fork_of = None
            self._enqueue(request, front=True)
        suspects = [item.request for item in out.scheduled if self._requests.get(item.request_id) is item.request]
        for request in suspects:
            if request.status == RequestStatus.RUNNING:
                kv.truncate(request.request_id, request.num_computed_tokens)
        return suspects

    def _update_one(self, item: ScheduledRequest, runner_output: ModelRunnerOutput,
                    now: float) -> RequestUpdate | None:
        request = item.request
        if item.spec_token_ids:
            return self._update_verified(item, runner_output, now)
        request.num_computed_tokens = item.end
        if item.num_lookahead_tokens:  # the draft's lookahead slots: keep room for the next token only
            self.kv_cache.truncate(request.request_id, item.end + 1)
        self.kv_cache.cache_full_blocks(request)
        new_prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id, [])
        request.prompt_logprobs.extend(new_prompt_logprobs)
        candidates = runner_output.beam_candidates.get(request.request_id)
        if candidates is not None:  # the beam group (engine) appends the chosen token
            request.beam_candidates = candidates
            return RequestUpdate(request, [], [], new_prompt_logprobs, False)
        token = runner_output.sampled_token_ids.get(request.request_id)
        if token is None:
            return RequestUpdate(request, [], [], new_prompt_logprobs, False) if new_prompt_logprobs else None
        request.append_output_token(token)
        if request.structured_output is not None:  # raises if the grammar refuses it: the request fails
            request.structured_output.accept_token(token)
        new_logprobs = []
        if request.request_id in runner_output.logprobs:
            new_logprobs = [runner_output.logprobs[request.request_id]]
            request.output_logprobs.extend(new_logprobs)
        if request.first_token_time is None:
            request.first_token_time = now
        finished = request.check_stop(self.max_model_len)  # also appends the token's text
        if finished:
            self._remove(request)
        return RequestUpdate(request, [token], new_logprobs, new_prompt_logprobs, finished)

    def _update_verified(self, item: ScheduledRequest, runner_output: ModelRunnerOutput,
                         now: float) -> RequestUpdate:
        """A decode that verified draft tokens: the worker emitted the accepted drafts and then
        the target's own token. Only the pending token's and the accepted drafts' KV count as
        computed; blocks that hold nothing but rejected drafts are freed, so rejected tokens
        never reach the prefix cache. Tokens after one that ends the request are dropped."""
        request = item.request
        emitted = runner_output.spec_token_ids[request.request_id]
        logprobs = runner_output.spec_logprobs.get(request.request_id)
        num_drafts = len(item.spec_token_ids)
        num_accepted = len(emitted) - 1
        if not 0 <= num_accepted <= num_drafts or emitted[:num_accepted] != item.spec_token_ids[:num_accepted]:
            raise RuntimeError(f"the worker emitted {emitted} for drafts {item.spec_token_ids}")
        request.spec_num_drafts += 1
        request.spec_num_proposed += num_drafts
        request.spec_num_accepted += num_accepted
        request.spec_num_rejections += num_accepted < num_drafts
        self.spec_stats.record(num_drafts, num_accepted)
        request.spec_token_ids = []
        tokens, new_logprobs, finished = [], [], False
        for k, token in enumerate(emitted):
            request.append_output_token(token)
            tokens.append(token)
            if logprobs is not None:
                new_logprobs.append(logprobs[k])
                request.output_logprobs.append(logprobs[k])
            if request.first_token_time is None:
                request.first_token_time = now
            finished = request.check_stop(self.max_model_len)
            if finished:
                break
        # KV is written for the pending token and the accepted drafts (those that were kept).
        request.num_computed_tokens = min(item.end - num_drafts + num_accepted, request.num_tokens)
        self.kv_cache.truncate(request.request_id, request.num_computed_tokens + 1)
        self.kv_cache.cache_full_blocks(request)
        if finished:
            self._remove(request)
        return RequestUpdate(request, tokens, new_logprobs, [], finished)


def _adapter_names(requests) -> tuple[str, ...]:
    """The distinct LoRA adapter names of `requests`, sorted."""
    return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))
