"""The engine's only door to the device side.

The engine hands an executor plain data (`WorkerStep`, block moves) and gets plain data
back (`ModelRunnerOutput`); it never touches a model, a KV tensor or a worker's batch. One
in-process worker is the only executor today (in_process.py); a multi-process or
multi-rank executor (tensor parallelism) implements the same three methods, broadcasting
the step to its workers and returning rank 0's output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.core.worker_step import WorkerStep


class Executor(ABC):
    @abstractmethod
    def execute_model(self, step: WorkerStep) -> ModelRunnerOutput:
        """Runs one step on every worker. Raises if the batched part failed (the engine
        then undoes the step); per-row failures come back in `ModelRunnerOutput.failed`."""

    @abstractmethod
    def move_blocks(self, step: WorkerStep) -> None:
        """Only the block moves of `step` (offloads at close, for instance), no forward pass."""

    def shutdown(self) -> None:
        """Releases the workers. Safe to call more than once."""
