"""Results round-trip through SQLite and re-render the same tables and plots."""

from __future__ import annotations

import pytest

from pagoda.bench.metrics import RequestRecord, summarize
from pagoda.bench.report import comparison_rows, detail_rows, markdown_report, save_plots
from pagoda.bench.store import ResultStore


def _records(scale: float) -> list[RequestRecord]:
    records = [RequestRecord(index=i, success=True, start_s=0.01 * i, ttft_s=scale * (0.1 + 0.01 * i),
                             latency_s=scale * (1.0 + 0.1 * i), itl_s=[scale * 0.05] * 4, prompt_tokens=20 + i,
                             output_tokens=5) for i in range(8)]
    records.append(RequestRecord(index=8, success=False, start_s=0.2, error="HTTP 503: busy"))
    return records


def test_database_round_trip(tmp_path):
    store = ResultStore(tmp_path / "bench.db")
    config = {"load": {"concurrency": 4, "request_rate": float("inf")}, "model": "m"}
    records = _records(1.0)
    summary = summarize(records, 2.5)
    run_id = store.save("sweep-1", "concurrency 4", config, summary, records)
    store.close()

    reopened = ResultStore(tmp_path / "bench.db")
    [run] = reopened.load(run_id)
    assert run.run_id == run_id and run.sweep_id == "sweep-1" and run.label == "concurrency 4"
    assert run.config["load"]["concurrency"] == 4 and run.config["load"]["request_rate"] == float("inf")
    assert run.summary == summary
    assert [r.to_dict() for r in run.records] == [r.to_dict() for r in records]
    assert summarize(run.records, 2.5) == summary  # the stored requests re-derive the summary
    with pytest.raises(KeyError, match="no run or sweep"):
        reopened.load("nope")
    reopened.close()


def test_a_sweep_loads_in_order_and_renders(tmp_path):
    store = ResultStore(tmp_path / "bench.db")
    ids = []
    for concurrency, scale in ((1, 1.0), (4, 2.0), (16, 4.0)):
        records = _records(scale)
        ids.append(store.save("sweep-2", f"concurrency {concurrency}", {"load": {"concurrency": concurrency}},
                              summarize(records, 2.0 * scale), records))
    runs = store.load("sweep-2")
    assert [r.run_id for r in runs] == ids
    assert [row[0] for row in store.list_runs()] == ids[::-1]

    header, rows = comparison_rows(runs)
    assert [row[0] for row in rows] == ["concurrency 1", "concurrency 4", "concurrency 16"]
    assert rows[0][header.index("failed")] == "1"
    ttft_p50 = [float(row[header.index("TTFT p50 ms")]) for row in rows]
    assert ttft_p50 == sorted(ttft_p50) and ttft_p50[0] == pytest.approx(135.0)
    detail_header, detail = detail_rows(runs[0])
    assert detail_header[1:4] == ["mean", "p10", "p25"] and detail_header[-1] == "max"
    assert [row[0] for row in detail] == ["TTFT", "TPOT", "ITL", "E2E latency"]
    text = markdown_report(runs)
    assert text.count("| concurrency 4 |") == 1 and "TTFT p99 ms" in text

    paths = save_plots(runs, tmp_path / "plots", prefix="s-")
    assert sorted(p.name for p in paths) == ["s-cdf.png", "s-sweep.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    store.close()
