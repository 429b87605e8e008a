"""Load generation: closed loop at a fixed concurrency, or open loop at a
request rate with gamma-distributed gaps (burstiness 1.0 = Poisson), both
capped by --num-prompts or --duration."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from pagoda.bench.client import send_request
from pagoda.bench.datasets import BenchRequest
from pagoda.bench.metrics import RequestRecord


@dataclass(frozen=True)
class LoadShape:
    concurrency: int | None = None  # at most this many in flight (None: no cap)
    request_rate: float = math.inf  # requests per second; inf sends them all at once
    burstiness: float = 1.0  # gamma shape of the gaps; 1.0 is a Poisson process
    num_prompts: int | None = None  # requests to send (default: the dataset's size)
    duration_s: float | None = None  # or: keep sending (cycling the dataset) this long
    seed: int = 0

    def __post_init__(self):
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be at least 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate} must be positive (inf for no pacing)")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness={self.burstiness} must be positive")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration={self.duration_s} must be positive")

    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if math.isfinite(self.request_rate):
            parts.append(f"{self.request_rate:g} req/s (burstiness {self.burstiness:g})")
        return ", ".join(parts) or "all at once"


def arrival_gaps(shape: LoadShape) -> Iterator[float]:
    """Seconds to wait before each request, without end: gamma(k=burstiness, mean=1/rate), or zeros without a rate."""
    rng = random.Random(shape.seed)
    scale = 1.0 / (shape.request_rate * shape.burstiness) if math.isfinite(shape.request_rate) else 0.0
    while True:
        yield rng.gammavariate(shape.burstiness, scale) if scale else 0.0


async def run_load(
    url: str,
    api: str,
    model: str,
    requests: list[BenchRequest],
    shape: LoadShape,
    headers: dict | None = None,
    tokenizer=None,
    timeout_s: float = 600.0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Sends the requests as `shape` says; returns every request's record and the wall time."""
    if not requests:
        raise ValueError("no requests to send")
    total = shape.num_prompts or (None if shape.duration_s else len(requests))
    semaphore = asyncio.Semaphore(shape.concurrency) if shape.concurrency else None
    limits = httpx.Limits(max_connections=shape.concurrency or 1000, max_keepalive_connections=shape.concurrency or 1000)
    records: list[RequestRecord] = []
    gaps = arrival_gaps(shape)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(index: int, request: BenchRequest) -> None:
            try:
                record = await send_request(client, url, api, model, request, index, start, headers, tokenizer)
            finally:
                if semaphore is not None:
                    semaphore.release()
            records.append(record)
            if on_done is not None:
                on_done(record)

        tasks = []
        index = 0
        while total is None or index < total:
            if shape.duration_s is not None and time.perf_counter() - start >= shape.duration_s:
                break
            await asyncio.sleep(next(gaps))
            if semaphore is not None:
                await semaphore.acquire()
            if shape.duration_s is not None and time.perf_counter() - start >= shape.duration_s:
                if semaphore is not None:
                    semaphore.release()
                break
            tasks.append(asyncio.create_task(one(index, requests[index % len(requests)])))
            index += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    records.sort(key=lambda r: r.index)
    return records, wall
