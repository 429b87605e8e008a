"""The engine loop in a background thread, with an async stream per request.

Every change to engine state (add, abort, step) happens on the loop thread,
so the synchronous `LLMEngine` needs no locks. Callers hand it commands
through a queue and get results back on their asyncio loop.

Invariants:
- a request's stream ends exactly once: with a finished output, with the
  engine's error, or when the caller stops reading (then it is aborted and
  its KV blocks are freed within one step);
- `is_healthy` is False once the loop thread has died.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from pagoda.engine.llm_engine import LLMEngine, PromptInput
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can be served."""


@dataclass
class _Add:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    stream: _Stream
    accepted: Future


@dataclass
class _Abort:
    request_id: str


class _Stream:
    """Outputs of one request, handed from the loop thread to an asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> RequestOutput | BaseException:
        return await self._queue.get()


class AsyncLLM:
    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        # Called on the loop thread with each finished request's output (metrics).
        self._on_finished = on_finished
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    # -- caller side (any asyncio loop) -------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests queued for the engine (an approximate read from another thread)."""
        return self._commands.qsize() + len(self.engine.scheduler.waiting)

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes.

        Raises the engine's validation error (a ValueError) before the first
        output if the request is refused. Stopping iteration early aborts it.
        """
        if not self.is_healthy:
            raise EngineDeadError("the engine loop is not running")
        stream = _Stream(asyncio.get_running_loop())
        accepted: Future = Future()
        self._commands.put(_Add(request_id, prompt, params, stream, accepted))
        await asyncio.wrap_future(accepted)  # re-raises validation errors
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    # -- loop thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                block = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        stream = self._streams.get(output.request_id)
                        if stream is not None:
                            stream.put(output)
                            if output.finished:
                                del self._streams[output.request_id]
                        if output.finished and self._on_finished is not None:
                            self._on_finished(output)
                self.last_step_time = time.monotonic()
        except BaseException as error:  # the loop must report, not vanish
            logger.exception("engine loop died")
            self._error = error
            dead = EngineDeadError(f"the engine loop died: {error!r}")
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()

    def _drain_commands(self, block: bool) -> bool:
        """Applies pending adds/aborts; waits for one if `block`. False means stop."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                return True
            if command is None:
                return False
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                self._streams.pop(command.request_id, None)
            else:
                try:
                    self.engine.add_request(command.prompt, command.params, command.request_id)
                except Exception as error:
                    command.accepted.set_exception(error)
                else:
                    self._streams[command.request_id] = command.stream
                    command.accepted.set_result(None)
            block = False


async def prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """`first`, then everything from `rest`: for callers that awaited the first output early
    (so a refused request fails before any response byte is sent)."""
    yield first
    async for output in rest:
        yield output
