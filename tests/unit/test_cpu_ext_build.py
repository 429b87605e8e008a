"""The build of pagoda's C++ CPU ops survives an interrupted build (pagoda/kernels/cpu_ext.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pagoda.kernels import cpu_ext


def test_a_stale_torch_lock_is_removed_under_our_lock(tmp_path) -> None:
    # What a killed build leaves: torch's `lock` file, which would make every later load wait forever.
    (tmp_path / "lock").write_text("")
    with cpu_ext._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        (tmp_path / "lock").write_text("")  # a build in progress (ours) keeps its lock
    assert (tmp_path / "lock").exists()


def test_our_lock_is_released_when_its_holder_dies(tmp_path) -> None:
    holder = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from pagoda.kernels import cpu_ext
        with cpu_ext._build_lock(Path({str(tmp_path)!r})):
            Path({str(tmp_path)!r}, "lock").write_text("")
            os._exit(1)  # killed in the middle of a build
    """)
    assert subprocess.run([sys.executable, "-c", holder], timeout=60).returncode == 1
    assert (tmp_path / "lock").exists()
    with cpu_ext._build_lock(tmp_path):  # does not wait: the dead holder's lock is gone
        assert not (tmp_path / "lock").exists()
