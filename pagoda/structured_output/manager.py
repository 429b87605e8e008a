"""`StructuredOutputManager`: the engine side of structured outputs (CPU bookkeeping).

- Compiles each constraint once per engine: a cache of compile futures keyed by
  `StructuredOutputsParams.key` (kind, spec, whitespace rule), least recently used dropped
  past `max_cached`; compiles run on a worker thread (`xgrammar.GrammarCompiler`, built
  from the tokenizer with the model's logits size as vocabulary), off the step loop. A
  request whose grammar is compiling waits in the queue (`Request.waiting_for_grammar`)
  while others run.
- Gives each sequence its own `GrammarMatcher` once its compile is done (`update_pending`);
  a compile that failed fails only the requests that wait for it.
- Each step, fills the token bitmask of the scheduled rows that sample under a grammar
  (`grammar_bitmask`), one batched xgrammar call; the engine sends it to the worker with
  the step (`WorkerStep.grammar_bitmask`).

Tool calling can reuse it: a `structural_tag` (or a JSON schema built from the tools) is
just another key.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import xgrammar as xgr

from pagoda.core.worker_step import GrammarBitmask
from pagoda.structured_output import grammar
from pagoda.structured_output.params import StructuredOutputsError, StructuredOutputsParams
from pagoda.structured_output.request import StructuredOutputRequest

if TYPE_CHECKING:
    from pagoda.core.scheduler_output import ScheduledRequest
    from pagoda.request import Request

logger = logging.getLogger(__name__)

COMPILER_CACHE_BYTES = 256 * 1024**2


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], max_cached: int = 128,
                 compile_threads: int = 1):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_cached = max_cached
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use (tokenizer scan ~0.1 s)
        self._compiler_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._compile_threads = compile_threads
        self._cache: OrderedDict[tuple, concurrent.futures.Future] = OrderedDict()
        # The cache is shared by the threads that call check_compiles (the server's front end).
        self._cache_lock = threading.Lock()
        self._pending: list[Request] = []  # sequences whose matcher waits for a compile
        self._batch_matcher: xgr.BatchGrammarMatcher | None = None
        self.num_compiles = 0

    # -- requests ------------------------------------------------------------

    def check(self, params: StructuredOutputsParams) -> None:
        """Raises StructuredOutputsError if the request cannot be constrained here."""
        if self.tokenizer is None:
            raise StructuredOutputsError(f"structured_outputs.{params.kind}", getattr(params, params.kind),
                                         "structured outputs need the model's tokenizer, and this engine has none")
        grammar.check(params)

    def check_compiles(self, params: StructuredOutputsParams) -> None:
        """The edge's full check, where the tokenizer is at hand (the server's front end): the
        grammar compiles for this vocabulary (cached) and some token can start it. Blocks for
        the compile: call it off the event loop. Raises StructuredOutputsError."""
        self.check(params)
        future = self._compiled(params)
        try:
            compiled = future.result()
        except Exception as error:  # noqa: BLE001 - xgrammar's compile errors
            self._forget_failed(params.key, future)
            raise StructuredOutputsError(f"structured_outputs.{params.kind}", getattr(params, params.kind),
                                         grammar.describe_grammar_error(error)) from None
        bitmask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        if not bitmask.any():
            raise StructuredOutputsError(f"structured_outputs.{params.kind}", getattr(params, params.kind),
                                         "no token of this model's vocabulary can start it")

    def add_request(self, request: Request) -> None:
        """Starts (or reuses) the compile of the request's grammar; the request waits for it."""
        params = request.sampling_params.structured_outputs
        request.structured_output = StructuredOutputRequest(params.key, self._compiled(params))
        self._pending.append(request)

    def _compiled(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        with self._cache_lock:
            return self._compiled_locked(params)

    def _forget_failed(self, key: tuple, future: concurrent.futures.Future) -> None:
        with self._cache_lock:
            if self._cache.get(key) is future:
                del self._cache[key]

    def _compiled_locked(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        key = params.key
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._compile_threads,
                                                               thread_name_prefix="pagoda-grammar")
        future = self._pool.submit(self._compile, params)
        self.num_compiles += 1
        self._cache[key] = future
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)  # requests holding the future keep it
        return future

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return grammar.compile_grammar(self._get_compiler(), params)

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                # xgrammar's own cache (bounded) also keeps what compiled grammars share.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                     cache_limit_bytes=COMPILER_CACHE_BYTES)
            return self._compiler

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def update_pending(self) -> dict[str, str]:
        """Gives the sequences whose compile is done their matcher. Returns the ones whose
        compile failed: request id -> why (the engine fails them; the key is compiled again
        if asked again)."""
        failed: dict[str, str] = {}
        still = []
        for request in self._pending:
            state = request.structured_output
            if request.is_finished:
                continue
            if not state.compiled.done():
                still.append(request)
                continue
            error = state.compiled.exception()
            if error is None:
                try:
                    state.start_matching()
                    continue
                except Exception as exc:  # noqa: BLE001 - this request's matcher failed: it fails alone
                    error = exc
            self._forget_failed(state.key, state.compiled)
            params = request.sampling_params.structured_outputs
            failed[request.request_id] = (f"structured_outputs.{params.kind} could not be compiled: "
                                          f"{grammar.describe_grammar_error(error)}")
        self._pending = still
        return failed

    def wait_for_compiles(self, timeout: float) -> None:
        """Blocks until a pending compile finishes (or `timeout` s): the engine has nothing else to run."""
        futures = {request.structured_output.compiled for request in self._pending}
        if futures:
            concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    # -- steps ---------------------------------------------------------------

    def grammar_bitmask(self, scheduled: list[ScheduledRequest]) -> GrammarBitmask | None:
        """The next-token bitmask of every scheduled row that samples under a grammar, or None."""
        rows = [item.request for item in scheduled
                if item.request.structured_output is not None and item.samples]
        if not rows:
            return None
        bitmask = np.empty((len(rows), (self.vocab_size + 31) // 32), dtype=np.int32)
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher("auto")
        self._batch_matcher.batch_fill_next_token_bitmask([r.structured_output.matcher for r in rows], bitmask)
        return GrammarBitmask([r.request_id for r in rows], bitmask)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
