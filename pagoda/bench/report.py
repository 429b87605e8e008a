"""Rendering results: terminal tables (rich), markdown tables, PNG plots.

Works from stored runs only (`store.StoredRun`), so `pagoda bench report`
re-renders a past run exactly as the run itself did.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pagoda.bench.metrics import PERCENTILES
from pagoda.bench.store import StoredRun

_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2el_s", "E2E latency"))
_STAT_COLUMNS = ("mean",) + tuple(f"p{p}" for p in PERCENTILES) + ("max",)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.1f}"


def _x_value(run: StoredRun) -> float | None:
    """What a sweep varies: the concurrency, else the request rate."""
    load = run.config.get("load", {})
    if load.get("concurrency") is not None:
        return float(load["concurrency"])
    rate = load.get("request_rate")
    return float(rate) if rate is not None and math.isfinite(float(rate)) else None


def _x_name(runs: list[StoredRun]) -> str:
    return "concurrency" if runs and runs[0].config.get("load", {}).get("concurrency") is not None else "request rate (req/s)"


def comparison_rows(runs: list[StoredRun]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "ok", "failed", "req/s", "out tok/s", "total tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "TPOT p50 ms", "TPOT p99 ms", "ITL p50 ms", "E2E p50 ms", "E2E p99 ms"]
    has_goodput = any("goodput" in r.summary for r in runs)
    if has_goodput:
        header.append("goodput req/s")
    rows = []
    for run in runs:
        s = run.summary

        def stat(metric: str, key: str) -> str:
            return _ms((s.get(metric) or {}).get(key))

        row = [run.label, str(s["completed"]), str(s["failed"]), f"{s['request_throughput']:.2f}",
               f"{s['output_throughput']:.1f}", f"{s['total_token_throughput']:.1f}",
               stat("ttft_s", "p50"), stat("ttft_s", "p99"), stat("tpot_s", "p50"), stat("tpot_s", "p99"),
               stat("itl_s", "p50"), stat("e2el_s", "p50"), stat("e2el_s", "p99")]
        if has_goodput:
            row.append(f"{s['goodput']['request_goodput']:.2f}" if "goodput" in s else "-")
        rows.append(row)
    return header, rows


def detail_rows(run: StoredRun) -> tuple[list[str], list[list[str]]]:
    header = ["metric (ms)", *_STAT_COLUMNS]
    rows = []
    for key, name in _METRICS:
        stats = run.summary.get(key)
        rows.append([name, *(_ms(stats.get(c)) if stats else "-" for c in _STAT_COLUMNS)])
    return header, rows


def print_report(runs: list[StoredRun], console: Console | None = None) -> None:
    console = console or Console()
    for run in runs if len(runs) == 1 else []:
        header, rows = detail_rows(run)
        table = Table(title=f"{run.label} — {run.run_id}", title_justify="left")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    header, rows = comparison_rows(runs)
    table = Table(title="summary", title_justify="left")  # one column per run, so it fits a terminal
    table.add_column("metric", justify="left")
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, name in enumerate(header[1:], 1):
        table.add_row(name, *(row[i] for row in rows))
    console.print(table)
    for run in runs:
        s = run.summary
        console.print(f"[bold]{run.label}[/]: {s['completed']}/{s['num_requests']} ok in {s['duration_s']:.1f} s, "
                      f"{s['prompt_tokens']} prompt + {s['output_tokens']} output tokens")
        for message, count in s.get("errors", {}).items():
            console.print(f"  [red]{count} failed[/]: {message}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(runs: list[StoredRun]) -> str:
    parts = [markdown_table(*comparison_rows(runs))]
    for run in runs:
        parts.append(f"\n{run.label} (ms):\n\n" + markdown_table(*detail_rows(run)))
    return "\n".join(parts) + "\n"


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_plots(runs: list[StoredRun], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """TTFT and latency CDFs; for several levels, throughput and TTFT p50/p99 against the level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, field, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "latency_s", "end-to-end latency")):
        for run in runs:
            values = sorted(getattr(r, field) for r in run.records if r.success and getattr(r, field) is not None)
            if values:
                axis.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=run.label)
        axis.set_xlabel("seconds")
        axis.set_ylabel("fraction of requests")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    paths.append(_save(figure, out_dir / f"{prefix}cdf.png"))

    levels = [(x, run) for run in runs if (x := _x_value(run)) is not None]
    if len(levels) > 1:
        levels.sort(key=lambda item: item[0])
        xs = [x for x, _ in levels]
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].plot(xs, [r.summary["output_throughput"] for _, r in levels], "o-", label="output tokens/s")
        axes[0].set_ylabel("output tokens/s")
        twin = axes[0].twinx()
        twin.plot(xs, [r.summary["request_throughput"] for _, r in levels], "s--", color="tab:orange",
                  label="requests/s")
        twin.set_ylabel("requests/s")
        axes[0].set_title("throughput")
        lines = axes[0].get_lines() + twin.get_lines()
        axes[0].legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
        for key, style in (("p50", "o-"), ("p99", "s--")):
            axes[1].plot(xs, [((r.summary.get("ttft_s") or {}).get(key) or float("nan")) for _, r in levels], style,
                         label=f"TTFT {key}")
        axes[1].set_ylabel("seconds")
        axes[1].set_title("time to first token")
        axes[1].legend(fontsize=8)
        for axis in axes:
            axis.set_xlabel(_x_name(runs))
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [f"{x:g}" for x in xs])
            axis.grid(alpha=0.3)
        paths.append(_save(figure, out_dir / f"{prefix}sweep.png"))
    return paths
