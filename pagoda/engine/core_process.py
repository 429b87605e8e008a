"""The engine loop in a child process (`--engine-loop process`).

The child builds its own `LLMEngine` from the config, sends a `ModelInfo`
(or the load error) on `updates`, then runs `run_engine_loop`, reading
commands from `commands` and writing every `LoopUpdate` to `updates`.
Both are one-way `multiprocessing` pipes; the child is started with
"spawn" so it inherits no threads or locks from the server.
"""

from __future__ import annotations

import logging
import signal
import traceback
from multiprocessing.connection import Connection

from pagoda.config import EngineConfig
from pagoda.engine.engine_loop import Command, LoopDied, ModelInfo, run_engine_loop

logger = logging.getLogger(__name__)


def engine_process_main(config: EngineConfig, commands: Connection, updates: Connection) -> None:
    from pagoda.engine.llm_engine import LLMEngine

    # Ctrl-C reaches the whole process group; the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = LLMEngine(config, show_progress=False)
    except BaseException as error:  # sent as text: the exception may not pickle
        updates.send(LoopDied(f"the engine failed to load: {error!r}"))
        return
    updates.send(ModelInfo.from_engine(engine))

    def next_command(block: bool) -> Command | None:
        if commands.poll(1.0 if block else 0):
            return commands.recv()
        return None

    try:
        run_engine_loop(engine, next_command, updates.send)
    except (EOFError, BrokenPipeError):  # the server went away: nothing left to serve
        return
    except BaseException as error:
        traceback.print_exc()
        try:
            updates.send(LoopDied(f"the engine loop died: {error!r}"))
        except (BrokenPipeError, OSError):
            pass
