"""The engine's step loop and the messages it exchanges with its front end.

The loop owns an `LLMEngine` and is the only code that touches it: it applies
commands (add, abort, remove a LoRA adapter), steps while there is work, and emits one `LoopUpdate`
per step. It runs either on a thread of the serving process or in a child
process (`engine/core_process.py`); every message here is picklable so both
placements share this code.

One request never ends the loop: a request the engine failed (an output with
`error`, or an unexpected exception while adding it) is reported alone as
`RequestFailed`. The loop ends on Shutdown (aborting every request first, so
their blocks are freed) or when the engine raises, e.g. `EngineStepError`
when steps keep failing whatever they run (a broken device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagoda.core.scheduler import SchedulerStats
from pagoda.engine.llm_engine import LLMEngine, PromptInput
from pagoda.model.lora.request import LoRARequest
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# -- commands: front end -> loop -----------------------------------------------


@dataclass
class AddRequest:
    request_id: str
    prompt: PromptInput
    params: SamplingParams
    cache_salt: str | None = None
    priority: int = 0
    lora_request: LoRARequest | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class RemoveLoRA:
    """An adapter unloaded from the server: the engine and its worker forget this id."""

    lora_int_id: int


@dataclass
class Shutdown:
    pass


Command = AddRequest | AbortRequest | RemoveLoRA | Shutdown

# -- updates: loop -> front end --------------------------------------------------


@dataclass
class Accepted:
    request_id: str


@dataclass
class Rejected:
    request_id: str
    message: str  # the engine's validation error, as text (it is re-raised as a ValueError)


@dataclass
class StepUpdate:
    outputs: list[RequestOutput]
    stats: SchedulerStats
    # Seconds spent inside LLMEngine.step() so far (a running total): with the
    # wall clock it gives the share of time the loop kept the model busy.
    busy_seconds: float
    num_steps: int


@dataclass
class RequestFailed:
    """The engine failed this request (alone: the loop goes on). Sent after the StepUpdate of
    its step, or instead of Accepted if adding it raised something other than a ValueError."""

    request_id: str
    message: str
    invalid_request: bool = False  # the request's own fault (RequestOutput.invalid_request)


@dataclass
class LoopDied:
    message: str


LoopUpdate = Accepted | Rejected | StepUpdate | RequestFailed | LoopDied


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs to know about the served model (no engine access)."""

    model: str
    tokenizer: Any  # a transformers tokenizer, or None
    max_model_len: int
    vocab_size: int
    hf_config: Any
    source_kind: str
    source_path: str
    dtype: str
    num_parameters: int
    eos_token_ids: frozenset[int] = frozenset()  # what ends a sequence (structured outputs' stop tokens)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> ModelInfo:
        return cls(
            model=engine.config.model,
            tokenizer=engine.tokenizer,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            hf_config=engine.hf_config,
            source_kind=engine.source.kind,
            source_path=str(engine.source.path),
            dtype=str(engine.dtype).replace("torch.", ""),
            num_parameters=sum(p.numel() for p in engine.model.parameters()),
            eos_token_ids=engine.eos_token_ids,
        )


def run_engine_loop(
    engine: LLMEngine,
    next_command: Callable[[bool], Command | None],
    emit: Callable[[LoopUpdate], None],
) -> None:
    """Runs until a Shutdown command. `next_command(block)` returns the next
    command, or None when none is pending (after waiting a while if `block`).

    Raises whatever the engine raises; the caller reports it as LoopDied.
    """
    busy = 0.0
    while True:
        block = not engine.has_unfinished_requests()
        command = next_command(block)
        changed = False
        while command is not None:
            if isinstance(command, Shutdown):
                engine.abort_all_requests()  # nothing is left holding blocks
                engine.close()  # e.g. the offload disk tier saves the device's cached blocks
                return
            changed = True
            if isinstance(command, AbortRequest):
                try:
                    engine.abort_request(command.request_id)
                except Exception:  # best effort: the front end has already let the request go
                    logger.exception("aborting request %r failed", command.request_id)
            elif isinstance(command, RemoveLoRA):
                try:
                    engine.remove_lora(command.lora_int_id)
                except Exception:  # best effort: the adapter is already gone from the front end
                    logger.exception("removing LoRA adapter id %d failed", command.lora_int_id)
            else:
                try:
                    engine.add_request(command.prompt, command.params, command.request_id, command.cache_salt,
                                       command.priority, command.lora_request)
                except ValueError as error:
                    emit(Rejected(command.request_id, str(error)))
                except Exception as error:  # the engine's fault, not the request's: not a 400
                    logger.exception("adding request %r failed", command.request_id)
                    emit(RequestFailed(command.request_id, f"the engine failed to add it: {error!r}"))
                else:
                    emit(Accepted(command.request_id))
            command = next_command(False)
        if engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            busy += time.perf_counter() - start
            failures = [output for output in outputs if output.error is not None]
            if failures:
                outputs = [output for output in outputs if output.error is None]
            emit(StepUpdate(outputs, engine.stats(), busy, engine.num_steps))
            for output in failures:
                emit(RequestFailed(output.request_id, output.error, output.invalid_request))
        elif changed:  # e.g. an abort emptied the batch: let the front end see the new counts
            emit(StepUpdate([], engine.stats(), busy, engine.num_steps))
