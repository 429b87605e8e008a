"""The metric arithmetic on synthetic timelines."""

from __future__ import annotations

import math

import pytest

from pagoda.bench.metrics import RequestRecord, distribution, meets_slos, parse_goodput, summarize


def _record(index, ttft, latency, tokens, itl=(), prompt=10, success=True, error=None):
    return RequestRecord(index=index, success=success, start_s=0.0, error=error, ttft_s=ttft, latency_s=latency,
                         itl_s=list(itl), prompt_tokens=prompt, output_tokens=tokens)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    # First token at 0.5 s, 11 tokens by 1.5 s: 10 gaps in 1 s.
    assert _record(0, 0.5, 1.5, 11).tpot_s == pytest.approx(0.1)
    assert _record(0, 0.5, 0.5, 1).tpot_s is None  # one token: no TPOT
    assert _record(0, None, None, 0, success=False).tpot_s is None


def test_distribution_percentiles_interpolate_linearly():
    stats = distribution([float(v) for v in range(1, 101)])  # 1..100
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["max"] == 100 and stats["min"] == 1
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["p10"] == pytest.approx(10.9)
    assert set(stats) >= {"p10", "p25", "p50", "p66", "p75", "p80", "p90", "p95", "p98", "p99"}
    assert distribution([]) is None


def test_summary_counts_throughput_and_failures():
    records = [
        _record(0, 0.2, 1.2, 11, itl=[0.1] * 10, prompt=100),
        _record(1, 0.4, 2.4, 21, itl=[0.1] * 20, prompt=50),
        _record(2, None, None, 0, success=False, error="HTTP 500: boom"),
        _record(3, None, None, 0, success=False, error="HTTP 500: boom"),
        _record(4, None, None, 0, success=False, error="ConnectError: refused"),
    ]
    s = summarize(records, wall_s=4.0)
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 2, 3)
    assert s["errors"] == {"HTTP 500: boom": 2, "ConnectError: refused": 1}
    assert s["request_throughput"] == pytest.approx(2 / 4.0)
    assert s["output_throughput"] == pytest.approx(32 / 4.0)
    assert s["total_token_throughput"] == pytest.approx((32 + 150) / 4.0)
    assert s["ttft_s"]["mean"] == pytest.approx(0.3)
    assert s["tpot_s"]["mean"] == pytest.approx(0.1)
    assert s["itl_s"]["p50"] == pytest.approx(0.1) and s["itl_s"]["max"] == pytest.approx(0.1)
    assert s["e2el_s"]["max"] == pytest.approx(2.4)


def test_goodput_counts_requests_meeting_every_slo():
    slos = parse_goodput(["ttft:300", "e2el:2000"])
    assert slos == {"ttft": 0.3, "e2el": 2.0}
    fast, slow_start, slow_end = _record(0, 0.2, 1.2, 11), _record(1, 0.4, 1.0, 5), _record(2, 0.1, 3.0, 5)
    failed = _record(3, None, None, 0, success=False, error="x")
    assert meets_slos(fast, slos) and not meets_slos(slow_start, slos) and not meets_slos(slow_end, slos)
    assert not meets_slos(failed, slos)
    s = summarize([fast, slow_start, slow_end, failed], wall_s=2.0, slos=slos)
    assert s["goodput"]["good_requests"] == 1
    assert s["goodput"]["request_goodput"] == pytest.approx(0.5)
    assert s["goodput"]["good_fraction"] == pytest.approx(0.25)


@pytest.mark.parametrize("bad", ["ttft", "latency:100", "ttft:abc", "tpot:-5"])
def test_bad_goodput_names_the_problem(bad):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([bad])


def test_all_failed_summary_has_no_distributions():
    s = summarize([_record(0, None, None, 0, success=False, error="x")], wall_s=1.0)
    assert s["completed"] == 0 and s["ttft_s"] is None and s["output_throughput"] == 0
    assert not math.isnan(s["request_throughput"])
