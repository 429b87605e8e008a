"""How the engine reaches its worker(s): `Executor` (base.py); one in-process worker for now."""

from pagoda.executor.base import Executor
from pagoda.executor.in_process import InProcessExecutor

__all__ = ["Executor", "InProcessExecutor"]
