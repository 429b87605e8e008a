"""The async front end: one async stream of outputs per request, over an
engine loop that runs on a background thread or in a child process.

    AsyncLLM(engine)                          # loop on a thread of this process
    AsyncLLM.in_child_process(config)         # loop in its own process

Either way the loop (`engine_loop.run_engine_loop`) is the only code that
touches the `LLMEngine`; the front end only sends commands and routes the
updates that come back. Updates are handled on the loop thread (thread
placement) or on a reader thread (process placement), and handed to each
caller's asyncio loop with call_soon_threadsafe.

Invariants:
- a request's stream ends exactly once: with a finished output, with the
  engine's error (RequestFailedError: the engine failed this request alone;
  EngineDeadError: the loop died or was shut down), or when the caller stops
  reading (then it is aborted and its KV blocks are freed within one step);
- a request id names at most one live request: generate() refuses an id
  still in use, leaving the first caller's stream alone;
- `is_healthy` is False once the loop (thread or process) has died or
  `shutdown()` was called; generate() then raises EngineDeadError.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from pagoda.config import EngineConfig
from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.engine_loop import (
    Accepted,
    AbortRequest,
    AddRequest,
    Command,
    LoopDied,
    LoopUpdate,
    ModelInfo,
    Rejected,
    RemoveLoRA,
    RequestFailed,
    Shutdown,
    StepUpdate,
    run_engine_loop,
)
from pagoda.engine.llm_engine import LLMEngine, PromptInput
from pagoda.model.lora.request import LoRARequest
from pagoda.outputs import RequestOutput, merge_delta
from pagoda.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

LOOP_PLACEMENTS = ("thread", "process")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (it died, or was shut down); no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (an exception while serving it); the engine goes on."""

    def __init__(self, request_id: str, message: str, invalid_request: bool = False):
        super().__init__(f"request {request_id!r} failed: {message}")
        self.request_id = request_id
        self.message = message
        self.invalid_request = invalid_request  # its own fault (a client error), not the engine's


class _Stream:
    """Outputs of one request, handed from the loop's thread to an asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._held: RequestOutput | BaseException | None = None  # taken, then put back (unget)

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed: nobody is reading
            pass

    async def get(self) -> RequestOutput | BaseException:
        if self._held is not None:
            item, self._held = self._held, None
            return item
        return await self._queue.get()

    def get_nowait(self) -> RequestOutput | BaseException | None:
        """The next item if one is already queued, else None."""
        if self._held is not None:
            item, self._held = self._held, None
            return item
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def unget(self, item: RequestOutput | BaseException) -> None:
        """Puts back the item just taken: the next get returns it."""
        self._held = item


class _ThreadLoop:
    """Runs the engine loop on a daemon thread of this process."""

    placement = "thread"

    def __init__(self, engine: LLMEngine, dispatch: Callable[[LoopUpdate], None]):
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(engine, dispatch), name="pagoda-engine", daemon=True)
        self._thread.start()

    def _next(self, block: bool) -> Command | None:
        try:
            return self._commands.get(block=block, timeout=1.0 if block else None)
        except queue.Empty:
            return None

    def _run(self, engine: LLMEngine, dispatch: Callable[[LoopUpdate], None]) -> None:
        try:
            run_engine_loop(engine, self._next, dispatch)
        except BaseException as error:  # the loop must report, not vanish
            logger.exception("engine loop died")
            dispatch(LoopDied(f"the engine loop died: {error!r}"))

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        self._commands.put(Shutdown())
        self._thread.join(timeout)


class _ProcessLoop:
    """Runs the engine loop in a spawned child process, talking over two pipes."""

    placement = "process"

    def __init__(self, config: EngineConfig, dispatch: Callable[[LoopUpdate], None], load_timeout: float = 600.0):
        from pagoda.engine.core_process import engine_process_main

        context = multiprocessing.get_context("spawn")
        command_reader, self._command_writer = context.Pipe(duplex=False)
        self._update_reader, update_writer = context.Pipe(duplex=False)
        self._process = context.Process(target=engine_process_main, args=(config, command_reader, update_writer),
                                        name="pagoda-engine", daemon=True)
        self._process.start()
        command_reader.close()
        update_writer.close()
        self._send_lock = threading.Lock()
        self.model_info = self._wait_for_load(load_timeout)
        self._reader = threading.Thread(target=self._read, args=(dispatch,), name="pagoda-engine-reader", daemon=True)
        self._reader.start()

    def _wait_for_load(self, timeout: float) -> ModelInfo:
        deadline = time.monotonic() + timeout
        while not self._update_reader.poll(0.5):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode})")
            if time.monotonic() > deadline:
                self._process.terminate()
                raise RuntimeError(f"the engine process did not load the model within {timeout:.0f} s")
        first = self._update_reader.recv()
        if isinstance(first, LoopDied):
            self._process.join(5)
            raise RuntimeError(first.message)
        return first

    def _read(self, dispatch: Callable[[LoopUpdate], None]) -> None:
        while True:
            try:
                update = self._update_reader.recv()
            except (EOFError, OSError):
                self._process.join(1.0)
                dispatch(LoopDied(f"the engine process exited (exit code {self._process.exitcode})"))
                return
            dispatch(update)
            if isinstance(update, LoopDied):
                return

    def send(self, command: Command) -> None:
        with self._send_lock:
            try:
                self._command_writer.send(command)
            except (BrokenPipeError, OSError):
                pass  # the process is gone; the reader reports it

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def stop(self, timeout: float) -> None:
        self.send(Shutdown())
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None):
        """The engine loop on a thread of this process. `engine` is reachable as
        `self.engine` (tests inject failures through it); nothing else may touch it."""
        self.engine: LLMEngine | None = engine
        self._setup(ModelInfo.from_engine(engine), engine.stats(), on_finished)
        self._loop = _ThreadLoop(engine, self._dispatch)

    @classmethod
    def in_child_process(
        cls, config: EngineConfig, on_finished: Callable[[RequestOutput], None] | None = None
    ) -> AsyncLLM:
        """The engine loop in its own process; returns once the model is loaded."""
        self = cls.__new__(cls)
        self.engine = None
        self._setup(None, SchedulerStats(0, 0, 0.0, 0), on_finished)
        self._loop = _ProcessLoop(config, self._dispatch)
        self.model_info = self._loop.model_info
        return self

    def _setup(self, info: ModelInfo | None, stats: SchedulerStats,
               on_finished: Callable[[RequestOutput], None] | None) -> None:
        self.model_info = info
        # Called on the dispatching thread with each finished request's output (metrics).
        self.on_finished = on_finished
        self._lock = threading.Lock()  # guards _streams and _accepting
        self._streams: dict[str, _Stream] = {}
        self._accepting: dict[str, Future] = {}
        self._error: str | None = None  # why no request can be served any more (loop died, shut down)
        self._shut_down = False
        # Latest figures from the loop (replaced whole, so reads need no lock).
        self.stats = stats
        self.busy_seconds = 0.0
        self.num_steps = 0
        # Running totals for /metrics: requests the engine failed, and requests aborted because
        # their caller stopped reading (a client that left) while they were still running.
        self.num_failed_total = 0
        self.num_aborted_total = 0

    # -- caller side (any asyncio loop) -------------------------------------

    @property
    def placement(self) -> str:
        return self._loop.placement

    @property
    def is_healthy(self) -> bool:
        return self._loop.is_alive() and self._error is None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled: sent but unacknowledged, plus the scheduler's queue at the last step."""
        return len(self._accepting) + self.stats.num_waiting

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, cache_salt: str | None = None,
        priority: int = 0, lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs (as `params.output_kind` says) until the request finishes.

        Raises the engine's validation error (a ValueError) before the first
        output if the request is refused, or if `request_id` is still in use by
        an unfinished request. Raises RequestFailedError if the engine fails
        this request, EngineDeadError if the engine dies or shuts down before it
        finishes. Stopping iteration early aborts it.
        """
        stream = _Stream(asyncio.get_running_loop())
        accepted: Future = Future()
        with self._lock:  # checked under the lock: a shutdown or a dying loop fails what is registered
            if self._error is not None or not self._loop.is_alive():
                raise EngineDeadError(self._error or "the engine loop is not running")
            if request_id in self._streams or request_id in self._accepting:
                raise ValueError(f"request_id={request_id!r} is already in use by a request that has not "
                                 "finished; use a unique id.")
            self._streams[request_id] = stream
            self._accepting[request_id] = accepted
        self._loop.send(AddRequest(request_id, prompt, params, cache_salt, priority, lora_request))
        finished = False  # True once the engine holds nothing of this request: no abort to send
        try:
            try:
                await asyncio.wrap_future(accepted)  # re-raises validation errors
            except (ValueError, RequestFailedError, EngineDeadError):
                finished = True  # refused, failed or dead (and its stream already dropped)
                raise
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                item = self._catch_up(stream, item, params.output_kind)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    @staticmethod
    def _catch_up(stream: _Stream, item: RequestOutput, kind: RequestOutputKind) -> RequestOutput:
        """A reader behind the engine gets what is queued as one output: the newest of
        CUMULATIVE ones, DELTAs merged. An error stays queued, to be raised next."""
        while not item.finished:
            following = stream.get_nowait()
            if following is None:
                break
            if isinstance(following, BaseException):
                stream.unget(following)
                break
            item = merge_delta(item, following) if kind == RequestOutputKind.DELTA else following
        return item

    def abort(self, request_id: str) -> None:
        with self._lock:
            live = self._streams.pop(request_id, None) is not None
            self._accepting.pop(request_id, None)
            if live:
                self.num_aborted_total += 1
        self._loop.send(AbortRequest(request_id))

    def remove_lora(self, lora_int_id: int) -> None:
        """An unloaded LoRA adapter: the engine and its worker drop it (slot, host copy) once the
        requests still running with it have finished."""
        self._loop.send(RemoveLoRA(lora_int_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the engine loop (it aborts every request first). Every open generate() ends
        with EngineDeadError, and later calls raise it. Safe to call more than once."""
        message = "the engine shut down"
        with self._lock:
            first = not self._shut_down
            self._shut_down = True
            if self._error is None:
                self._error = message
            streams, self._streams = self._streams, {}
            accepting, self._accepting = self._accepting, {}
        self._fail_all(streams, accepting, message)
        if first:
            self._loop.stop(timeout)

    @staticmethod
    def _fail_all(streams: dict[str, _Stream], accepting: dict[str, Future], message: str) -> None:
        for future in accepting.values():
            if not future.done():
                future.set_exception(EngineDeadError(message))
        for stream in streams.values():
            stream.put(EngineDeadError(message))

    # -- dispatching thread -------------------------------------------------

    def _dispatch(self, update: LoopUpdate) -> None:
        if isinstance(update, StepUpdate):
            self.stats, self.busy_seconds, self.num_steps = update.stats, update.busy_seconds, update.num_steps
            for output in update.outputs:
                with self._lock:
                    stream = self._streams.get(output.request_id)
                    if stream is not None and output.finished:
                        del self._streams[output.request_id]
                if stream is not None:
                    stream.put(output)
                if output.finished and self.on_finished is not None:
                    self.on_finished(output)
        elif isinstance(update, Accepted):
            with self._lock:
                future = self._accepting.pop(update.request_id, None)
            if future is not None:
                future.set_result(None)
        elif isinstance(update, Rejected):
            with self._lock:
                future = self._accepting.pop(update.request_id, None)
                self._streams.pop(update.request_id, None)
            if future is not None:
                future.set_exception(ValueError(update.message))
        elif isinstance(update, RequestFailed):
            with self._lock:
                future = self._accepting.pop(update.request_id, None)
                stream = self._streams.pop(update.request_id, None)
                if future is not None or stream is not None:
                    self.num_failed_total += 1
            error = RequestFailedError(update.request_id, update.message, update.invalid_request)
            if future is not None and not future.done():  # failed while being added
                future.set_exception(error)
            elif stream is not None:
                stream.put(error)
        elif isinstance(update, LoopDied):
            with self._lock:
                if self._shut_down:  # the loop ending after shutdown(): streams already told
                    return
                self._error = update.message
                streams, self._streams = self._streams, {}
                accepting, self._accepting = self._accepting, {}
            logger.error("%s", update.message)
            self._fail_all(streams, accepting, update.message)


async def prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """`first`, then everything from `rest`: for callers that awaited the first output early
    (so a refused request fails before any response byte is sent)."""
    yield first
    async for output in rest:
        yield output
