"""Per-request timings and the run summary, with the community's definitions
(those of `vllm bench serve` and evalscope perf):

- TTFT: request sent -> first chunk carrying generated content (a role-only
  chat chunk does not count).
- ITL: the gaps between consecutive content chunks.
- TPOT: (E2E latency - TTFT) / (output tokens - 1), per request.
- E2E latency: request sent -> last byte.
- Throughputs divide by the run's wall time: requests/s (QPS) of successful
  requests, output tokens/s, total (prompt + output) tokens/s.
- Goodput: successful requests per second that meet every given SLO.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (10, 25, 50, 66, 75, 80, 90, 95, 98, 99)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    index: int
    success: bool
    start_s: float  # since the run started
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None  # end to end
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def distribution(values: list[float]) -> dict[str, float] | None:
    """mean, max and the standard percentiles (linear interpolation), or None if empty."""
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    stats = {"mean": float(array.mean()), "max": float(array.max()), "min": float(array.min())}
    for p, value in zip(PERCENTILES, np.percentile(array, PERCENTILES)):
        stats[f"p{p}"] = float(value)
    return stats


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:3000` (milliseconds) -> {"ttft": 0.5, ...} in seconds."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput={item!r}: expected NAME:MILLISECONDS with NAME one of "
                             f"{', '.join(GOODPUT_METRICS)}")
        try:
            milliseconds = float(value)
        except ValueError:
            raise ValueError(f"goodput={item!r}: {value!r} is not a number of milliseconds") from None
        if milliseconds <= 0:
            raise ValueError(f"goodput={item!r}: the limit must be positive")
        slos[name] = milliseconds / 1000
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2el": record.latency_s}
    for name, limit in slos.items():
        value = values[name]
        if name == "tpot" and value is None and record.success:
            continue  # a one-token answer has no TPOT: nothing to violate
        if value is None or value > limit:
            return False
    return record.success


def summarize(records: list[RequestRecord], wall_s: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(Counter(r.error or "unknown error" for r in failed).most_common()),
        "duration_s": wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_throughput": output_tokens / wall_s if wall_s > 0 else 0.0,
        "total_token_throughput": (prompt_tokens + output_tokens) / wall_s if wall_s > 0 else 0.0,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
        "e2el_s": distribution([r.latency_s for r in ok if r.latency_s is not None]),
    }
    if slos:
        good = sum(1 for r in records if meets_slos(r, slos))
        summary["goodput"] = {"slos_s": slos, "good_requests": good,
                              "request_goodput": good / wall_s if wall_s > 0 else 0.0,
                              "good_fraction": good / len(records) if records else 0.0}
    return summary
