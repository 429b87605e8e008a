"""One worker, in the engine's own process: the step is a function call."""

from __future__ import annotations

from pagoda.core.scheduler_output import ModelRunnerOutput
from pagoda.core.worker_step import WorkerStep
from pagoda.executor.base import Executor
from pagoda.worker.model_runner import ModelRunner


class InProcessExecutor(Executor):
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute_model(self, step: WorkerStep) -> ModelRunnerOutput:
        return self.runner.execute(step)

    def move_blocks(self, step: WorkerStep) -> None:
        self.runner.apply_block_copies(step)
