"""Benchmark results in SQLite: a `runs` table (one row per load level, with
its full configuration and summary as JSON) and a `requests` table (every
request's timings). Runs of one sweep share a sweep_id."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pagoda.bench.metrics import RequestRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    sweep_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    label TEXT NOT NULL,
    config TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    idx INTEGER NOT NULL,
    success INTEGER NOT NULL,
    error TEXT,
    start_s REAL NOT NULL,
    ttft_s REAL,
    latency_s REAL,
    itl_s TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id);
"""


@dataclass
class StoredRun:
    run_id: str
    sweep_id: str
    created_at: str
    label: str
    config: dict
    summary: dict
    records: list[RequestRecord]


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def save(self, sweep_id: str, label: str, config: dict, summary: dict, records: list[RequestRecord]) -> str:
        run_id = new_id()
        with self._db:
            self._db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                             (run_id, sweep_id, time.strftime("%Y-%m-%dT%H:%M:%S"), label,
                              json.dumps(config), json.dumps(summary)))
            self._db.executemany(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, r.index, int(r.success), r.error, r.start_s, r.ttft_s, r.latency_s, json.dumps(r.itl_s),
                  r.prompt_tokens, r.output_tokens) for r in records],
            )
        return run_id

    def load(self, run_or_sweep_id: str) -> list[StoredRun]:
        """The run with this id, or every run of the sweep with this id (in order)."""
        rows = self._db.execute(
            "SELECT run_id, sweep_id, created_at, label, config, summary FROM runs "
            "WHERE run_id = ? OR sweep_id = ? ORDER BY rowid", (run_or_sweep_id, run_or_sweep_id)).fetchall()
        if not rows:
            raise KeyError(f"no run or sweep with id {run_or_sweep_id!r} in {self.path}")
        runs = []
        for run_id, sweep_id, created_at, label, config, summary in rows:
            records = [
                RequestRecord(index=idx, success=bool(success), start_s=start_s, error=error, ttft_s=ttft_s,
                              latency_s=latency_s, itl_s=json.loads(itl), prompt_tokens=prompt_tokens,
                              output_tokens=output_tokens)
                for idx, success, error, start_s, ttft_s, latency_s, itl, prompt_tokens, output_tokens
                in self._db.execute("SELECT idx, success, error, start_s, ttft_s, latency_s, itl_s, prompt_tokens, "
                                    "output_tokens FROM requests WHERE run_id = ? ORDER BY idx", (run_id,))
            ]
            runs.append(StoredRun(run_id, sweep_id, created_at, label, json.loads(config), json.loads(summary),
                                  records))
        return runs

    def list_runs(self, limit: int = 20) -> list[tuple[str, str, str, str]]:
        return self._db.execute("SELECT run_id, sweep_id, created_at, label FROM runs ORDER BY rowid DESC LIMIT ?",
                                (limit,)).fetchall()
