"""Continuous batching with one token budget per step.

Each step, running requests go first (oldest first), each asking for the
tokens it lacks (`num_tokens - num_computed_tokens`: one when decoding, a
chunk of the prompt when prefilling), capped by what is left of the budget.
When the pool runs dry the youngest running request is preempted by
recompute: its blocks are freed and it goes back to the front of the queue.
Waiting requests are then admitted first-come-first-served while budget,
sequence slots and blocks last.

Invariants:
- a request is in exactly one of `waiting`, `running`, or neither (finished);
- a waiting request holds no blocks; a running request holds exactly
  ceil(num_computed_tokens / block_size) blocks between steps;
- progress: the oldest running request can always be scheduled, because the
  engine refuses a `max_model_len` larger than the whole cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from pagoda.config import SchedulerConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler_output import (
    ModelRunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from pagoda.request import Request, RequestStatus, TokenLogprobs


@dataclass
class RequestUpdate:
    """What one step did to one request, for the output processor."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    new_prompt_logprobs: list[TokenLogprobs]
    finished: bool


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        self.num_preemptions_total = 0

    # -- lifecycle ---------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use.")
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Removes requests wherever they are and frees their blocks."""
        aborted = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            request.status = RequestStatus.FINISHED_ABORTED
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
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv_cache.free(request.request_id)
        self._requests.pop(request.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions_total=self.num_preemptions_total,
        )

    # -- scheduling --------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        scheduled_ids: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_new, out):
                break  # `request` itself was preempted; everything after it too.
            out.scheduled.append(self._scheduled(request, num_new))
            scheduled_ids.add(request.request_id)
            budget -= num_new
            i += 1

        # Admit waiting requests only if nobody had to be preempted this step:
        # otherwise we would evict one request to admit another.
        while (
            self.waiting
            and budget > 0
            and out.num_preempted == 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        return out

    def _make_room(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Allocates blocks for `request`, preempting the youngest as needed.

        Returns False when `request` itself had to be preempted.
        """
        while not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            out.num_preempted += 1
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(
            request=request,
            start=request.num_computed_tokens,
            num_new_tokens=num_new,
            # A copy: the plan of this step must not change when the table grows.
            block_table=list(self.kv_cache.block_table(request.request_id)),
        )

    # -- results -----------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        updates = []
        now = time.monotonic()
        for item in scheduler_output.scheduled:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens = item.end
            new_prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id, [])
            request.prompt_logprobs.extend(new_prompt_logprobs)
            token = runner_output.sampled_token_ids.get(request.request_id)
            if token is None:
                if new_prompt_logprobs:
                    updates.append(RequestUpdate(request, [], [], new_prompt_logprobs, False))
                continue
            request.append_output_token(token)
            new_logprobs = []
            if request.request_id in runner_output.logprobs:
                new_logprobs = [runner_output.logprobs[request.request_id]]
                request.output_logprobs.extend(new_logprobs)
            if request.first_token_time is None:
                request.first_token_time = now
            finished = request.check_stop(self.max_model_len)
            if finished:
                self._remove(request)
            updates.append(RequestUpdate(request, [token], new_logprobs, new_prompt_logprobs, finished))
        return updates
