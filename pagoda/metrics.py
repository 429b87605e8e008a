"""Prometheus metrics, named after vLLM's (`vllm:x` -> `pagoda:x`) so dashboards map one to one.

Each server owns its own CollectorRegistry (no process-global state).
Gauges are read from the engine's latest figures at scrape time; histograms and counters
are fed when a request finishes. The standard process_* metrics (resident memory, CPU
time) come from prometheus_client's ProcessCollector.
"""

from __future__ import annotations

import time
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pagoda.core.scheduler import SchedulerStats
from pagoda.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class EngineFigures(Protocol):
    """What the metrics read at scrape time (AsyncLLM has these)."""

    stats: SchedulerStats  # the scheduler's counts after the latest step
    busy_seconds: float  # time spent inside engine steps, running total
    num_steps: int
    num_failed_total: int  # requests the engine failed (each alone; the engine went on)
    num_aborted_total: int  # requests aborted because their client left


class _EngineCollector(Collector):
    def __init__(self, engine: EngineFigures):
        self._engine = engine

    def collect(self):
        stats = self._engine.stats
        yield GaugeMetricFamily("pagoda:num_requests_running", "Requests in the running batch.", stats.num_running)
        yield GaugeMetricFamily("pagoda:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield GaugeMetricFamily("pagoda:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                stats.kv_cache_usage)
        yield CounterMetricFamily("pagoda:num_preemptions", "Preemptions, by recompute or by swap.",
                                  stats.num_preemptions_total)
        yield CounterMetricFamily("pagoda:num_swapped_out", "Preemptions by swap: requests whose KV blocks "
                                  "were copied to the host swap space.", stats.num_swapped_out_total)
        yield CounterMetricFamily("pagoda:num_swapped_in", "Swapped requests copied back to the KV cache.",
                                  stats.num_swapped_in_total)
        yield GaugeMetricFamily("pagoda:num_requests_swapped", "Requests swapped out to host memory.",
                                stats.num_swapped)
        yield GaugeMetricFamily("pagoda:cpu_cache_usage_perc", "Fraction of host swap-space blocks in use (0-1).",
                                stats.swap_space_usage)
        yield GaugeMetricFamily("pagoda:kv_cache_token_efficiency",
                                "Tokens stored / token slots allocated in KV blocks, over all steps (1 = no waste).",
                                stats.kv_token_efficiency)
        yield CounterMetricFamily("pagoda:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  stats.prefix_cache_queries_total)
        yield CounterMetricFamily("pagoda:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  stats.prefix_cache_hits_total)
        yield CounterMetricFamily("pagoda:kv_offload_saved_blocks",
                                  "Evicted prefix-cache blocks kept in host memory.",
                                  stats.kv_offload_saved_blocks_total)
        yield CounterMetricFamily("pagoda:kv_offload_host_hits", "Prefix blocks brought back from host memory.",
                                  stats.kv_offload_host_hits_total)
        yield CounterMetricFamily("pagoda:kv_offload_disk_hits", "Prefix blocks brought back from disk.",
                                  stats.kv_offload_disk_hits_total)
        if stats.max_lora:  # vLLM's info gauge: the labels carry the figures, the value is the time
            info = GaugeMetricFamily("pagoda:lora_requests_info", "Running and waiting LoRA adapters.",
                                     labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            info.add_metric([",".join(stats.running_lora_adapters), ",".join(stats.waiting_lora_adapters),
                             str(stats.max_lora)], time.time())
            yield info
        # Speculative decoding (vLLM's names under pagoda:).
        yield CounterMetricFamily("pagoda:spec_decode_num_drafts", "Drafts verified (one per request and step).",
                                  stats.spec_decode_num_drafts_total)
        yield CounterMetricFamily("pagoda:spec_decode_num_draft_tokens", "Draft tokens verified.",
                                  stats.spec_decode_num_draft_tokens_total)
        yield CounterMetricFamily("pagoda:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                  stats.spec_decode_num_accepted_tokens_total)
        per_position = CounterMetricFamily("pagoda:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by position in the draft.", labels=["position"])
        for position, count in enumerate(stats.spec_decode_accepted_per_position):
            per_position.add_metric([str(position)], count)
        yield per_position
        # pagoda's own: with the wall clock, the share of time the step loop kept the model busy.
        yield CounterMetricFamily("pagoda:engine_busy_seconds", "Seconds spent inside engine steps.",
                                  self._engine.busy_seconds)
        yield CounterMetricFamily("pagoda:engine_steps", "Engine steps run.", self._engine.num_steps)
        yield CounterMetricFamily("pagoda:request_failure", "Requests the engine failed (each alone, the "
                                  "engine went on).", self._engine.num_failed_total)
        yield CounterMetricFamily("pagoda:request_aborted", "Requests aborted because their client left.",
                                  self._engine.num_aborted_total)


class EngineMetrics:
    def __init__(self, engine: EngineFigures):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        # process_resident_memory_bytes, process_cpu_seconds_total, ... of the serving process, as
        # vLLM's /metrics has them (with --engine-loop process the engine's own process is not included).
        ProcessCollector(registry=self.registry)
        self.prompt_tokens = Counter("pagoda:prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("pagoda:generation_tokens", "Generated tokens of finished requests.",
                                         registry=self.registry)
        self.request_success = Counter("pagoda:request_success", "Finished requests, by the finish reason of "
                                       "their first sequence (stop, length).", ["finished_reason"],
                                       registry=self.registry)
        self.ttft = Histogram("pagoda:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("pagoda:time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pagoda:e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("pagoda:request_queue_time_seconds", "Arrival to first scheduling.",
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_finished(self, output: RequestOutput) -> None:
        if output.outputs and output.outputs[0].finish_reason is not None:
            self.request_success.labels(output.outputs[0].finish_reason).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        m = output.metrics
        # DELTA outputs (streams) hold only their last tokens: the metrics count them all.
        generated = m.num_output_tokens if m is not None else sum(len(c.token_ids) for c in output.outputs)
        self.generation_tokens.inc(generated)
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        per_sequence = generated / max(1, len(output.outputs))
        if per_sequence > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (per_sequence - 1))
