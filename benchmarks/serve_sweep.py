"""`pagoda bench serve` against `pagoda serve` (default model): concurrency sweep 1/4/16/64.

Starts `pagoda serve` on a free loopback port, runs the sweep with 64
streaming completion requests per level (random prompts of 32-256 tokens,
64-128 output tokens, ignore_eos), and keeps everything in
benchmarks/results/bench_serve/: the SQLite database, the JSON and markdown
summaries, and the plots, copied to stable names (sweep.png, cdf.png) for the
README. Extra arguments go to `pagoda serve`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import _start_server  # noqa: E402

OUT = Path(__file__).parent / "results" / "bench_serve"


def main() -> int:
    process, url = _start_server(*sys.argv[1:])
    try:
        status = subprocess.call([
            sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", url, "--concurrency", "1", "4", "16", "64",
            "--num-prompts", "64", "--input-len", "32:256", "--output-len", "64:128", "--label", "pagoda serve",
            "--db", str(OUT / "bench.db"), "--out-dir", str(OUT)])
    finally:
        process.terminate()
        process.wait(60)
    newest = max(OUT.glob("*-sweep.png"), key=lambda p: p.stat().st_mtime)
    sweep_id = newest.name.removesuffix("-sweep.png")
    for kind in ("sweep", "cdf"):
        shutil.copy(OUT / f"{sweep_id}-{kind}.png", OUT / f"{kind}.png")
    shutil.copy(OUT / f"{sweep_id}.md", OUT / "latest.md")
    print(f"sweep {sweep_id}: plots copied to {OUT}/sweep.png and cdf.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
