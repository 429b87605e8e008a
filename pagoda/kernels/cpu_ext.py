"""Builds and loads pagoda's C++ CPU ops, once per machine, on first use.

Every ``*.cpp`` file in ``pagoda/csrc/cpu`` is compiled into one extension
(``pagoda_cpu_ops``) with torch's C++ extension machinery (g++ + ninja),
``-O3 -march=native -fopenmp``. Each file registers its ops in the ``pagoda``
namespace (``TORCH_LIBRARY_FRAGMENT(pagoda, m)``), so once loaded they are
``torch.ops.pagoda.<name>``.

The build is cached under ``~/.cache/pagoda/torch_extensions`` (or
``$PAGODA_CACHE_DIR/torch_extensions``) in a folder keyed by the torch
version, the compiler, this CPU's instruction set (machines differ, and a
``-march=native`` build from one CPU may not run on another) and the source
folder (two checkouts never share a build). ninja rebuilds only what changed.

Where the build cannot happen (no compiler, no ninja, a compile error) or
``PAGODA_DISABLE_CPU_KERNELS=1`` is set, ``cpu_ops()`` returns None after one
log line and callers use their torch code. Invariant: every caller of
``cpu_ops()`` has a torch fallback that gives the same results.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

EXTENSION_NAME = "pagoda_cpu_ops"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cpu"
DISABLE_ENV = "PAGODA_DISABLE_CPU_KERNELS"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "result": the loaded module or None, once tried


def _cpu_signature() -> str:
    """Model name and ISA flags of this CPU: a build is only valid where these match."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.strip() == "":  # first processor's block is enough
                    break
    except OSError:
        text = platform.processor() or platform.machine()
    return text


def build_dir() -> Path:
    root = Path(os.environ.get("PAGODA_CACHE_DIR", Path.home() / ".cache" / "pagoda"))
    key = hashlib.sha256(
        "\n".join([torch.__version__, shutil.which("c++") or "", _cpu_signature(), str(SOURCE_DIR)]).encode()
    ).hexdigest()[:16]
    return root / "torch_extensions" / f"{EXTENSION_NAME}-{key}"


def _build() -> ModuleType | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.info("%s is set: using the torch fallbacks for CPU kernels", DISABLE_ENV)
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        logger.warning("compiled CPU kernels target x86-64; this is %s: using torch fallbacks",
                       platform.machine())
        return None
    sources = sorted(str(p) for p in SOURCE_DIR.glob("*.cpp"))
    if not sources:
        return None
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        logger.warning("no C++ compiler or ninja found: compiled CPU kernels are off, "
                       "using the torch fallbacks (slower)")
        return None
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _build_lock(directory):
            _load(cpp_extension, sources, directory)
    except Exception as error:  # noqa: BLE001 - any build failure means: fall back
        logger.warning("building the compiled CPU kernels failed (%s: %s); using the torch "
                       "fallbacks (slower)", type(error).__name__, str(error).strip()[-400:])
        return None
    logger.info("compiled CPU kernels loaded from %s", directory)
    return torch.ops.pagoda


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Holds an exclusive lock on the build folder for as long as this process builds or loads.

    torch's own lock (a ``lock`` file that exists while a build runs) outlives a build that
    was killed (Ctrl-C, a timeout), and every later process then waits for it forever. This
    lock is an fcntl lock, which the system releases when its holder dies; whoever holds it
    is the only pagoda process in the folder, so a ``lock`` file found then is stale and goes."""
    import fcntl

    with open(directory / "pagoda.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                logger.warning("removing a stale build lock left by an interrupted build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(cpp_extension, sources: list[str], directory: Path) -> None:
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(SOURCE_DIR)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def cpu_ops():
    """``torch.ops.pagoda`` with the compiled ops loaded, or None where they cannot be built.

    The first call builds (about a minute the first time on a machine) and
    later calls are free. Thread-safe.
    """
    if "result" not in _state:
        with _lock:
            if "result" not in _state:
                _state["result"] = _build()
    return _state["result"]


def reset_for_tests() -> None:
    """Forget the outcome of the last load attempt (tests that force the fallback)."""
    with _lock:
        _state.pop("result", None)
