"""The synchronous engine: add requests, step, collect outputs.

One `step()` = schedule -> run the model once -> update requests (append
each sampled token and its text, decide stops: `Request.check_stop`) ->
build outputs. The engine owns request lifecycle: a request with n > 1 (or
best_of > 1) becomes that many sequences
(children) that are scheduled independently and reported together; with
best_of > n only the n with the highest cumulative logprob are reported,
once all are finished. A beam search request is `beam_width` slots steered
by a `BeamSearch` (engine/beam_search.py), reported once finished.

Failures: an exception caused by one request fails that request only.
- Per-request phases are guarded one request at a time, so the culprit is
  known: planning it (scheduler, `SchedulerOutput.failed`), checking its
  input row, sampling its row and its prompt logprobs (worker,
  `ModelRunnerOutput.failed`), appending its token, text and stop check
  (`RequestUpdate.error`), advancing its beams and building its output
  (here). The request is ended (status FINISHED_ERROR, blocks freed, gone
  from every table) and reported as a finished `RequestOutput` with `error`
  set and finish_reason "error"; the step goes on for the others.
- An exception from the batched part of `runner.execute` (block moves,
  forward pass, the batched draw) names no request. The scheduler undoes the
  step (`Scheduler.undo_step`): blocks loaded into the prefix cache and host
  slots being offloaded forget their hash (their copy may not have run),
  swap-ins' host blocks are released, requests swapped out in the step and
  requests holding a destination of its block moves are reset to recompute;
  the other scheduled requests simply redo their chunk. No block leaks and
  no unwritten block stays findable. If the step ran one request (or the
  sequences of one request), that request fails. Otherwise every scheduled
  sequence becomes a suspect, and the next steps run the suspects one at a
  time, alone (`Scheduler.schedule_alone`), each until it has run past the
  point where the batch failed: one that fails alone is the culprit and
  fails; the others go on as if nothing happened (a transient failure fails
  no request). Isolation costs one single-request step per suspect (a few
  more for a long recompute), only after a failure; bisection would need
  fewer steps for large batches but blame no more precisely.
- Structured outputs (structured_output/manager.py): a grammar that fails to
  compile fails the requests waiting for it, and a grammar the vocabulary
  cannot continue fails its request when it gets stuck; both are the
  request's own fault (`RequestOutput.invalid_request`: a 400, not a 500).
- A broken device fails every step: after `max_consecutive_failed_steps`
  failed steps with no successful one between, `step()` raises
  `EngineStepError` (the serving loop then ends, and /health says so). The
  requests failed on the way have their error; the rest are the caller's to
  abort. KeyboardInterrupt and other BaseExceptions are not request failures:
  the step is undone and they propagate.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pagoda.config import (
    DEFAULT_CPU_KV_CACHE_BYTES,
    ConfigError,
    EngineConfig,
    resolve_device,
    resolve_dtype,
)
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.kv_offload import KVOffloadManager, model_fingerprint
from pagoda.core.scheduler import RequestUpdate, Scheduler, SchedulerStats
from pagoda.core.scheduler_output import SchedulerOutput, describe_error
from pagoda.core.swap_space import SwapSpace
from pagoda.core.worker_step import WorkerStep, WorkerStepBuilder
from pagoda.engine.beam_search import BeamSearch, BeamStep
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.memory_profile import kv_budget_bytes, peak_step_bytes
from pagoda.engine.spec_decode.draft_model import load_draft_model
from pagoda.engine.spec_decode.speculator import Speculator
from pagoda.executor import Executor, InProcessExecutor
from pagoda.model.lora.adapter import AdapterError, ModelShape, load_adapter
from pagoda.model.lora.manager import LoRAManager
from pagoda.model.lora.request import LoRARequest
from pagoda.model.loader.loader import build_model, load_hf_config, load_tokenizer
from pagoda.model.loader.resolve import resolve_model
from pagoda.model.quant.methods import resolve_quantization
from pagoda.outputs import CompletionOutput, RequestMetrics, RequestOutput, logprob_dict
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.structured_output.manager import StructuredOutputManager
from pagoda.worker.kv_cache import (
    allocate_host_kv_caches,
    allocate_kv_caches,
    kv_bytes_per_token,
    num_blocks_for_budget,
)
from pagoda.worker.cuda_graphs import capture_decode_graphs
from pagoda.worker.draft_runner import DraftRunner
from pagoda.worker.model_runner import ModelRunner
from pagoda.worker.sampler import Sampler

logger = logging.getLogger(__name__)

PromptInput = str | list[int] | dict

# Checked LoRA adapters no live request uses that the engine keeps (skipping a re-read when named again).
_MAX_IDLE_LORAS = 64


class PromptError(ValueError):
    """A prompt the engine cannot take (empty, too long, unknown token ids)."""


class EngineStepError(RuntimeError):
    """Engine steps keep failing whatever they run: the device or the model is broken."""


@dataclass
class _Sequence:
    """One of a request's n samples: the scheduler's Request plus its text."""

    request: Request
    detokenizer: IncrementalDetokenizer
    # DELTA outputs: how much of the visible text and of the tokens (and their logprobs)
    # earlier outputs carried.
    sent_text: int = 0
    sent_tokens: int = 0


@dataclass
class _ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence] = field(default_factory=list)
    finished_time: float | None = None
    beam: BeamSearch | None = None  # beam search: the sequences are its slots
    sent_prompt_logprobs: bool = False  # DELTA outputs: the first output carried them
    invalid_request: bool = False  # it failed by its own fault (RequestOutput.invalid_request)

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(seq.request.is_finished for seq in self.sequences)

    @property
    def reports_when_finished(self) -> bool:
        """best_of > n and beam search pick their outputs at the end, so nothing streams before;
        FINAL_ONLY asks for one output at the end."""
        return (self.beam is not None or self.params.num_samples > self.params.n
                or self.params.output_kind == RequestOutputKind.FINAL_ONLY)

    @property
    def delta(self) -> bool:
        return self.params.output_kind == RequestOutputKind.DELTA


class LLMEngine:
    # Failed steps in a row (nothing succeeding between) after which step() gives up (module docstring).
    max_consecutive_failed_steps = 5

    def __init__(self, config: EngineConfig, show_progress: bool = True):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.source = resolve_model(config.model)
        self.linear_method = resolve_quantization(config.quantization, source_kind=self.source.kind,
                                                  load_format=config.load_format, device=self.device,
                                                  dtype=self.dtype)
        # A bar over the loading stages; it appears only if loading takes over a second.
        with tqdm(total=3, delay=1.0, leave=False, disable=not show_progress,
                  bar_format="Loading {desc} ({n}/{total} stages done) [{elapsed}]") as bar:
            bar.set_description_str(f"{config.model}: config")
            self.hf_config = load_hf_config(self.source)
            bar.update(1)
            bar.set_description_str(f"{config.model}: tokenizer")
            self.tokenizer = load_tokenizer(self.source, config.tokenizer)
            bar.update(1)
            bar.set_description_str(f"{config.model}: weights")
            self.max_model_len = self._derive_max_model_len()
            self.model = build_model(
                self.hf_config,
                self.source,
                load_format=config.load_format,
                dtype=self.dtype,
                device=self.device,
                max_position=max(self.max_model_len, getattr(self.hf_config, "max_position_embeddings", 0) or 0),
                seed=config.seed,
                show_progress=show_progress,
                linear_method=self.linear_method,
            )
            bar.update(1)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = self._eos_token_ids()
        # Draft-model speculation: the draft is loaded next to the target, before the KV budget
        # is split into blocks (its KV cache takes a share of it).
        self.draft_model = None
        spec = config.speculative_config
        if spec is not None and spec.method == "draft_model":
            self.draft_model = load_draft_model(
                spec, target_name=config.model, target_vocab_size=self.vocab_size,
                target_quantization=self.linear_method.name, load_format=config.load_format,
                dtype=self.dtype, device=self.device, max_model_len=self.max_model_len, seed=config.seed,
                show_progress=show_progress)

        block_size = config.cache.block_size
        # CUDA: the largest step's peak activations, reserved before the KV cache takes the rest.
        self.profiled_step_bytes: int | None = None
        num_blocks = self._num_kv_blocks()
        capacity = num_blocks * block_size
        if self.max_model_len > capacity:
            raise ConfigError(
                "max_model_len",
                self.max_model_len,
                f"the KV cache holds only {capacity} tokens ({num_blocks} blocks of {block_size}); "
                "lower max_model_len or give the cache more memory (kv_cache_memory)",
            )
        self.kv_caches = allocate_kv_caches(self.hf_config, num_blocks, block_size, self.dtype, self.device)
        draft_runner = None
        if self.draft_model is not None:  # the draft's own KV cache, on the same block ids
            draft_kv_caches = allocate_kv_caches(self.draft_model.hf_config, num_blocks, block_size, self.dtype,
                                                 self.device)
            draft_runner = DraftRunner(self.draft_model.model, draft_kv_caches, self.device, config.attention_backend)
        self.offload = self._make_offload_tiers()
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching,
                                               config.cache.enable_fork_sharing, self.offload)
        # Preemption by swap: a host pool of `swap_space` GiB (none in recompute mode).
        num_swap_blocks = self._num_swap_blocks()
        self.host_kv_caches = None
        self.swap_space = None
        if num_swap_blocks:
            self.host_kv_caches = allocate_host_kv_caches(self.hf_config, num_swap_blocks, block_size,
                                                          self.dtype, self.device)
            if self.draft_model is not None:  # swapped with the target's: the runner's block_caches order
                self.host_kv_caches += allocate_host_kv_caches(self.draft_model.hf_config, num_swap_blocks,
                                                               block_size, self.dtype, self.device)
            self.swap_space = SwapSpace(self.kv_cache_manager, num_swap_blocks)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len, self.swap_space,
                                   max_loras=config.lora.max_loras if config.lora is not None else 0)
        # Multi-LoRA (model/lora/): the worker's adapter slots; the engine checks each adapter once.
        lora_manager = None
        # Adapters the engine checked: id -> (request, content digest). Bounded: ids no live request
        # uses are dropped beyond _MAX_IDLE_LORAS (they are read again if named again), and at unload.
        self._lora_requests: dict[int, tuple[LoRARequest, str]] = {}
        self._lora_removals: set[int] = set()  # removed ids some unfinished request still uses
        if config.lora is not None:
            lora_manager = LoRAManager(self.model, config.lora.max_loras, config.lora.max_lora_rank,
                                       config.lora.max_cpu_loras, self.dtype, self.device)
        self.runner = ModelRunner(
            self.model, self.kv_caches, block_size, Sampler(self.vocab_size, config.seed), self.device,
            self.max_model_len,
            offload_host=self.offload.host if self.offload is not None else None,
            host_kv_caches=self.host_kv_caches, num_threads=config.num_threads,
            attention_backend=config.attention_backend,
            # Verifying drafts must reproduce decoding: no decode row's keys split across threads.
            split_decodes=config.speculative_config is None,
            lora_manager=lora_manager,
            draft=draft_runner,
        )
        # CUDA: decode-only steps replay graphs captured now (None on CPU, or with enforce_eager).
        self.runner.cuda_graphs = capture_decode_graphs(self.runner, config.scheduler.max_num_seqs,
                                                        self.max_model_len, config.enforce_eager)
        # The engine's only door to the device side; it sends plain data (core/worker_step.py).
        self.executor: Executor = InProcessExecutor(self.runner)
        self._worker_steps = WorkerStepBuilder()
        # Structured outputs: grammar compiles, per-sequence matchers, each step's token bitmask.
        # Speculative decoding: drafts for the running requests before each schedule (None: off).
        self.speculator = Speculator(config.speculative_config) if config.speculative_config is not None else None
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._parents: dict[str, _ParentRequest] = {}
        self._seq_to_parent: dict[str, str] = {}
        # Sequences suspected of failing a batched step: sequence id -> the position it must
        # recompute past, alone, to be cleared (module docstring). In order of suspicion.
        self._suspects: dict[str, int] = {}
        self._consecutive_failed_steps = 0
        self._ids = itertools.count()
        self.num_steps = 0

    # -- set-up ------------------------------------------------------------

    def _derive_max_model_len(self) -> int:
        trained = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        # No sliding-window attention yet: stay within the window, where it is full attention.
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True):
            trained = min(trained, window)
        requested = self.config.max_model_len
        if requested is None:
            return trained
        rope = getattr(self.hf_config, "rope_scaling", None) or getattr(self.hf_config, "rope_parameters", None)
        scaled = bool(rope) and (rope.get("rope_type") or rope.get("type") or "default") != "default"
        if requested > trained and not scaled:
            raise ConfigError(
                "max_model_len", requested, f"the model was trained for at most {trained} tokens"
            )
        return requested

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        per_token = self._kv_bytes_per_token()
        budget = cache.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                # The largest step's activations first (engine/memory_profile.py), then the rest.
                sched = self.config.scheduler
                self.profiled_step_bytes = peak_step_bytes(
                    self.model, self.hf_config, self.dtype, self.device, sched.max_num_batched_tokens,
                    self.max_model_len, sched.max_num_seqs, cache.block_size, self.config.attention_backend)
                free, total = torch.cuda.mem_get_info(self.device)
                budget = kv_budget_bytes(total, free, cache.gpu_memory_utilization, self.profiled_step_bytes)
                logger.info("KV cache: %.2f GiB of %.2f GiB (%.0f%%), after the weights and a %.2f GiB peak of the "
                            "largest step (%d tokens)", budget / 2**30, total / 2**30,
                            100 * cache.gpu_memory_utilization, self.profiled_step_bytes / 2**30,
                            sched.max_num_batched_tokens)
                if budget < cache.block_size * per_token:
                    raise ConfigError("gpu_memory_utilization", cache.gpu_memory_utilization,
                                      f"leaves {max(budget, 0)} bytes for the KV cache after the weights and the "
                                      f"largest step ({self.profiled_step_bytes} bytes at max_num_batched_tokens="
                                      f"{sched.max_num_batched_tokens}); raise it or lower max_num_batched_tokens")
            else:
                budget = DEFAULT_CPU_KV_CACHE_BYTES
        blocks = num_blocks_for_budget(budget, cache.block_size, per_token)
        if blocks < 1:
            raise ConfigError("kv_cache_memory", budget, f"too small for one block ({cache.block_size * per_token} bytes)")
        return blocks

    def _make_offload_tiers(self) -> KVOffloadManager | None:
        cache = self.config.cache
        if not cache.offload_host_bytes:
            return None
        block_bytes = self._block_bytes()
        num_host_blocks = cache.offload_host_bytes // block_bytes
        if num_host_blocks < 1:
            raise ConfigError("kv_offload_cpu_gb", cache.kv_offload_cpu_gb,
                              f"too small for one block ({block_bytes} bytes)")
        if self.source.kind == "gguf":
            files = [self.source.path]
        else:
            files = sorted(Path(self.source.folder).glob("*.safetensors"))
        config = {k: v for k, v in self.hf_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        extra = {"load_format": self.config.load_format}
        if self.config.load_format == "dummy":
            extra["seed"] = self.config.seed  # random weights: the seed is their identity
        if self.linear_method.name != "none":
            extra["quantization"] = self.linear_method.name  # packed weights give other KV values
        fingerprint = model_fingerprint(files, config, self.dtype, cache.block_size, extra)
        host = allocate_host_kv_caches(self.hf_config, num_host_blocks, cache.block_size, self.dtype, self.device)
        return KVOffloadManager(host, fingerprint, cache.kv_offload_disk,
                                disk_max_bytes=int(cache.kv_offload_disk_gb * 1024**3))

    def _kv_bytes_per_token(self) -> int:
        """K and V of every layer per token: the target's, plus the draft model's (same blocks)."""
        per_token = kv_bytes_per_token(self.hf_config, self.dtype)
        if self.draft_model is not None:
            per_token += self.draft_model.kv_bytes_per_token(self.dtype)
        return per_token

    def _block_bytes(self) -> int:
        """Bytes of one KV block: K and V of every layer (the draft's too) for block_size tokens."""
        return self.config.cache.block_size * self._kv_bytes_per_token()

    def close(self) -> None:
        """Saves what the offload disk tier should keep across a restart: every prefix-cache
        block still only on the device. Safe to call more than once."""
        self.structured_output.close()
        offload = self.offload
        if offload is None or offload.disk_dir is None:
            return
        pending = [(h, b) for h, b in self.kv_cache_manager.pool.cached_blocks() if not offload.on_disk(h)]
        while pending:
            batch, pending = pending[:offload.num_host_blocks], pending[offload.num_host_blocks:]
            for block_hash, block_id in batch:
                offload.offload(block_hash, block_id)
            offloads, _ = offload.take_step_copies()
            self.executor.move_blocks(WorkerStep(blocks_to_offload=offloads))
            offload.after_step()

    def _num_swap_blocks(self) -> int:
        """Host blocks for preemption by swap: swap_space GiB // bytes per block (0 in recompute mode).

        In swap mode with a swap space smaller than one block, every preemption falls back to
        recompute (warned here, not refused: swap_space=0 is how to turn swapping off for a run).
        """
        if self.config.scheduler.preemption_mode != "swap":
            return 0
        cache = self.config.cache
        block_bytes = self._block_bytes()
        blocks = int(cache.swap_space * 1024**3) // block_bytes
        if blocks == 0:
            logger.warning("preemption_mode='swap' with swap_space=%s GiB: less than one block (%d bytes); "
                           "every preemption will recompute", cache.swap_space, block_bytes)
        return blocks

    def _eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for value in (getattr(self.hf_config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(value)
        generation_config = Path(self.source.folder) / "generation_config.json"
        if self.source.kind == "hf" and generation_config.is_file():
            value = json.loads(generation_config.read_text()).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else value or [])
        return frozenset(ids)

    # -- requests ----------------------------------------------------------

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Text, token ids, or vLLM's prompt dicts: {"prompt": text} or {"prompt_token_ids": ids}."""
        if isinstance(prompt, dict):
            keys = set(prompt)
            if keys == {"prompt_token_ids"} or keys == {"prompt"}:
                prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
            else:
                raise PromptError(f"prompt dict with keys {sorted(keys)} is invalid: give exactly one of "
                                  "'prompt' (text) or 'prompt_token_ids'.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("prompt: text prompts need a tokenizer; pass token ids instead.")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise PromptError(f"prompt={prompt!r:.80} is invalid: must be a string or a list of token ids.")

    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None,
                    cache_salt: str | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> str:
        """Queues a request. `cache_salt`: only requests with the same salt share prefix-cache blocks.
        `priority`: with the "priority" scheduling policy, lower values are served first.
        `lora_request`: the LoRA adapter to run it with (None: the base model)."""
        params = params or SamplingParams()
        lora_digest = self.check_lora(lora_request) if lora_request is not None else None
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._parents:
            raise ValueError(f"request_id={request_id!r} is already in use.")
        text, token_ids = self.tokenize(prompt)
        self._validate_prompt(token_ids)
        params.validate_against_vocab(self.vocab_size)
        if self.speculator is not None and params.use_beam_search:
            raise ValueError("use_beam_search=True is invalid with speculative decoding: this engine was started "
                             "with speculative_config; send beam search to an engine without it.")
        if params.structured_outputs is not None:
            self.structured_output.check(params.structured_outputs)  # a bad schema is the caller's ValueError
        parent = _ParentRequest(request_id, text, token_ids, params)
        beams = params.use_beam_search
        count = params.beam_width if beams else params.num_samples
        seq_ids = [request_id] if count == 1 else [f"{request_id}#{index}" for index in range(count)]
        taken = next((seq_id for seq_id in seq_ids if seq_id in self._seq_to_parent), None)
        if taken is not None:  # e.g. "a#1" while request "a" has n > 1
            raise ValueError(f"request_id={request_id!r} is invalid: its sequence id {taken!r} belongs to "
                             f"request {self._seq_to_parent[taken]!r}.")
        try:
            for index, seq_id in enumerate(seq_ids):
                child_params = params
                if count > 1 and params.seed is not None:
                    child_params = replace(params, seed=params.seed + index)
                fork_of = parent.sequences[0].request if index and not beams else None
                request = Request(seq_id, token_ids, child_params, self.eos_token_ids, cache_salt=cache_salt,
                                  priority=priority, fork_of=fork_of, lora_request=lora_request,
                                  lora_digest=lora_digest)
                detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
                if not beams:  # Request.check_stop feeds it and matches stop strings (beams keep their rules)
                    request.text = detokenizer
                if params.structured_outputs is not None:  # each sample has its own matcher
                    self.structured_output.add_request(request)
                parent.sequences.append(_Sequence(request, detokenizer))
                self._seq_to_parent[seq_id] = request_id
            if beams:
                head = parent.sequences[0].request
                parent.beam = BeamSearch(params, len(token_ids), self.max_model_len, head.stop_token_set,
                                         frozenset(params.stop_token_ids or ()))
            self._parents[request_id] = parent
            # Beam slots other than the first join when the first selection forks them.
            for seq in parent.sequences[:1] if beams else parent.sequences:
                self.scheduler.add_request(seq.request)
        except BaseException:  # all or nothing: no half-added request stays behind
            self.scheduler.abort_requests([seq.request.request_id for seq in parent.sequences])
            self._forget(parent)
            raise
        return request_id

    def check_lora(self, lora_request: LoRARequest) -> str:
        """Refuses (AdapterError, a ValueError) an adapter this engine cannot serve: LoRA off, an
        id already naming another adapter, or an adapter folder that adapter.py refuses; returns
        the digest of its contents (the prefix-cache key of its KV blocks). Each adapter is read
        once here; the worker reads it again when a step needs it, and refuses other contents."""
        if self.config.lora is None:
            raise AdapterError(f"LoRA adapter {lora_request.lora_name!r}: this engine was started without LoRA "
                               "(enable_lora=True / --enable-lora).")
        lora_id = lora_request.lora_int_id
        known = self._lora_requests.get(lora_id)
        if known is not None and known[0] == lora_request:
            return known[1]
        if known is not None and self.scheduler.lora_in_use(lora_id):
            raise AdapterError(f"lora_int_id={lora_id} already names adapter {known[0].lora_name!r} "
                               f"({known[0].lora_path}); give {lora_request.lora_name!r} another id.")
        adapter = load_adapter(lora_request.lora_path, ModelShape.from_hf_config(self.hf_config),
                               self.config.lora.max_lora_rank, lora_request.lora_name)
        self._lora_requests[lora_id] = (lora_request, adapter.digest)
        if len(self._lora_requests) > _MAX_IDLE_LORAS:
            live = {seq.request.lora_int_id for parent in self._parents.values() for seq in parent.sequences}
            for idle in [i for i in self._lora_requests if i not in live and i != lora_id]:
                del self._lora_requests[idle]
        return adapter.digest

    def remove_lora(self, lora_int_id: int) -> None:
        """The adapter with this id will not be named again (unloaded from the server): the engine
        forgets it, and the worker drops its device slot, host copy and path once the requests
        still running with it have finished (at once when none is)."""
        if self.config.lora is None:
            return
        self._lora_requests.pop(lora_int_id, None)
        self._lora_removals.add(lora_int_id)
        if not self.has_unfinished_requests():  # no step is coming soon: tell the worker now
            self._flush_lora_removals()

    def _flush_lora_removals(self) -> None:
        """An idle engine tells its worker of removed adapters in a step without rows."""
        self._send_lora_removals()
        if self._worker_steps.has_removals:
            self.executor.execute_model(self._worker_steps.build(SchedulerOutput()))

    def _send_lora_removals(self) -> None:
        """Removed adapter ids no unfinished request uses go to the worker with the next step
        (requests accepted before the unload, running or waiting, finish with their adapter)."""
        for lora_id in [i for i in self._lora_removals if not self.scheduler.lora_in_use(i)]:
            self._lora_removals.discard(lora_id)
            self._worker_steps.remove_lora(lora_id)

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise PromptError("prompt is empty: it must have at least 1 token.")
        if len(token_ids) > self.max_model_len:
            raise PromptError(
                f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}."
            )
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise PromptError(f"prompt token id {bad} is invalid: must be in [0, {self.vocab_size}).")

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.get(request_id)
        if parent is None:
            return
        self.scheduler.abort_requests([seq.request.request_id for seq in parent.sequences])
        self._forget(parent)

    def abort_all_requests(self) -> None:
        """Aborts every unfinished request (e.g. at shutdown): all their blocks are freed."""
        for request_id in list(self._parents):
            self.abort_request(request_id)

    def _forget(self, parent: _ParentRequest) -> None:
        """Drops a finished, aborted or failed request from the engine's tables."""
        if self._parents.get(parent.request_id) is parent:
            del self._parents[parent.request_id]
        for seq in parent.sequences:
            seq_id = seq.request.request_id
            if self._seq_to_parent.get(seq_id) == parent.request_id:
                del self._seq_to_parent[seq_id]
            self._suspects.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # -- the loop ----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns an output for every request that changed.

        A request that failed in the step comes back finished with `error` set (module
        docstring); raises EngineStepError when steps keep failing whatever they run.
        """
        failed: dict[str, str] = {}  # parent request id -> what went wrong
        if self.structured_output.has_pending:  # grammars compiled since the last step: their matchers
            for seq_id, message in self.structured_output.update_pending().items():
                self._blame(seq_id, message, failed, invalid_request=True)
        alone = self._next_suspect()
        if self.speculator is not None and alone is None:
            self.speculator.propose(self.scheduler.running)
        scheduler_output = self.scheduler.schedule() if alone is None else self.scheduler.schedule_alone(alone)
        if alone is not None and not scheduler_output.scheduled:
            self._suspects.pop(alone.request_id, None)  # nothing of it can run now: stop isolating it
        for seq_id, message in scheduler_output.failed.items():
            self._blame(seq_id, f"the engine failed to schedule it: {message}", failed)
        if scheduler_output.is_empty:  # nothing to run and no block to move
            if self.offload is not None:
                self.offload.after_step()
            if not failed and self.structured_output.has_pending:  # only grammars compiling: wait, don't spin
                self.structured_output.wait_for_compiles(timeout=0.05)
            return self._fail_parents(failed)
        if self._lora_removals:
            self._send_lora_removals()
        worker_step = None
        try:
            worker_step = self._worker_steps.build(scheduler_output)
            worker_step.grammar_bitmask = self.structured_output.grammar_bitmask(scheduler_output.scheduled)
            runner_output = self.executor.execute_model(worker_step)
        except BaseException as error:  # noqa: BLE001 - undone, then blamed or isolated; non-Exceptions re-raised
            # The worker may have stopped anywhere: its copy of these requests is suspect too,
            # and it may not have seen the removed adapters (removing one twice is harmless).
            self._worker_steps.forget(item.request_id for item in scheduler_output.scheduled)
            for lora_id in worker_step.removed_lora_ids if worker_step is not None else ():
                self._worker_steps.remove_lora(lora_id)
            self._recover_from_failed_step(scheduler_output, error, failed)  # re-raises when it must
            return self._fail_parents(failed)
        if self.offload is not None:
            self.offload.after_step()
        self._consecutive_failed_steps = 0
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        if self.speculator is not None and self.speculator.proposer is None:  # the draft model's proposals
            self.speculator.receive(scheduler_output, runner_output.draft_token_ids)
        self.num_steps += 1
        self._clear_suspects(scheduler_output)
        changed: dict[str, _ParentRequest] = {}
        for update in updates:
            seq_id = update.request.request_id
            parent_id = self._seq_to_parent.get(seq_id)
            if parent_id is None or parent_id in failed:
                continue
            if update.error is not None:
                if self._grammar_stuck(update.request):  # the constraint cannot be finished
                    params = update.request.sampling_params.structured_outputs
                    self._blame(seq_id, f"structured_outputs.{params.kind}: no token of this model's vocabulary "
                                        f"can continue the output after {update.request.num_output_tokens} tokens",
                                failed, invalid_request=True)
                else:
                    self._blame(seq_id, f"the engine failed while running it: {update.error}", failed)
                continue
            parent = self._parents[parent_id]
            if parent.beam is None:
                try:
                    self._process_update(update, parent)
                except Exception as error:  # noqa: BLE001 - its output processing failed: it fails alone
                    self._blame(seq_id, f"the engine failed to process its output: {describe_error(error)}", failed)
                    continue
            changed[parent_id] = parent
        outputs = []
        for parent_id, parent in changed.items():
            if parent_id in failed:
                continue
            try:
                if parent.beam is not None:
                    self._advance_beams(parent)
                if parent.reports_when_finished and not parent.finished:
                    continue
                output = self._make_output(parent)
            except Exception as error:  # noqa: BLE001 - its beams or output failed: it fails alone
                failed[parent_id] = f"the engine failed to process its output: {describe_error(error)}"
                continue
            outputs.append(output)
            if parent.finished:
                self._forget(parent)
        outputs += self._fail_parents(failed)
        if self._lora_removals and not self.has_unfinished_requests():  # the last user of an unloaded adapter
            self._flush_lora_removals()
        return outputs

    # -- failures (module docstring) ----------------------------------------

    @staticmethod
    def _grammar_stuck(request: Request) -> bool:
        """Whether a failed request's grammar allows no next token at all (asked only after a failure)."""
        grammar = request.structured_output
        try:
            return grammar is not None and grammar.at_dead_end()
        except Exception:  # noqa: BLE001 - cannot tell: report the original failure
            logger.exception("checking the grammar of request %r failed", request.request_id)
            return False

    def _blame(self, seq_id: str, message: str, failed: dict[str, str], invalid_request: bool = False) -> None:
        parent_id = self._seq_to_parent.get(seq_id)
        if parent_id is not None and parent_id not in failed:
            failed[parent_id] = message
            parent = self._parents.get(parent_id)
            if parent is not None:
                parent.invalid_request = invalid_request

    def _recover_from_failed_step(self, scheduler_output: SchedulerOutput, error: BaseException,
                                  failed: dict[str, str]) -> None:
        """`runner.execute` raised: undo the step, then blame its one request or isolate its suspects."""
        suspects = self.scheduler.undo_step(scheduler_output)
        if self.offload is not None:
            self.offload.after_step()
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not a request's fault
            raise error
        self._consecutive_failed_steps += 1
        logger.error("engine step failed (%d in a row) running %d sequences: %s", self._consecutive_failed_steps,
                     len(suspects), describe_error(error), exc_info=error)
        if self._consecutive_failed_steps >= self.max_consecutive_failed_steps:
            raise EngineStepError(f"{self._consecutive_failed_steps} engine steps in a row failed, the last with "
                                  f"{describe_error(error)}") from error
        parents = {self._seq_to_parent[r.request_id] for r in suspects if r.request_id in self._seq_to_parent}
        message = f"the engine failed while running it: {describe_error(error)}"
        if len(parents) == 1:  # run alone (or only with its own siblings): it is the culprit
            self._blame(suspects[0].request_id, message, failed)
            return
        for item in scheduler_output.scheduled:
            if item.request in suspects:
                seq_id = item.request_id
                self._suspects[seq_id] = max(self._suspects.get(seq_id, 0), item.end)

    def _next_suspect(self) -> Request | None:
        """The first live suspect, to run alone this step."""
        while self._suspects:
            seq_id = next(iter(self._suspects))
            parent = self._parents.get(self._seq_to_parent.get(seq_id, ""))
            request = next((s.request for s in parent.sequences if s.request.request_id == seq_id), None) \
                if parent is not None else None
            if request is not None and not request.is_finished:
                return request
            del self._suspects[seq_id]
        return None

    def _clear_suspects(self, scheduler_output: SchedulerOutput) -> None:
        """Suspects that ran past the point where their batch failed are cleared."""
        for item in scheduler_output.scheduled:
            target = self._suspects.get(item.request_id)
            if target is not None and (item.request.is_finished or item.request.num_computed_tokens >= target):
                del self._suspects[item.request_id]

    def _fail_parents(self, failed: dict[str, str]) -> list[RequestOutput]:
        outputs = []
        for parent_id, message in failed.items():
            parent = self._parents.get(parent_id)
            if parent is not None:
                outputs.append(self._fail_parent(parent, message))
        return outputs

    def _fail_parent(self, parent: _ParentRequest, message: str) -> RequestOutput:
        """Ends every sequence of the request (blocks freed) and reports the failure."""
        logger.error("request %r failed: %s", parent.request_id, message)
        self.scheduler.abort_requests([seq.request.request_id for seq in parent.sequences],
                                      RequestStatus.FINISHED_ERROR)
        self._forget(parent)
        completions = []
        for index in range(parent.params.n):
            # What was generated before the failure (nothing for beams: no hypothesis is chosen).
            seq = parent.sequences[index] if parent.beam is None and index < len(parent.sequences) else None
            completions.append(CompletionOutput(
                index=index,
                text=seq.detokenizer.text if seq is not None else "",
                token_ids=list(seq.request.output_token_ids) if seq is not None else [],
                cumulative_logprob=None,
                logprobs=None,
                finish_reason="error",
            ))
        output = self._request_output(parent, completions, finished=True, finished_time=time.monotonic(),
                                      error=message)
        output.invalid_request = parent.invalid_request
        return output

    def _process_update(self, update: RequestUpdate, parent: _ParentRequest) -> None:
        """The scheduler has appended the new token, its text and decided whether it ended the
        request (`Request.check_stop`); a finished sequence's last text is flushed here."""
        request = update.request
        if request.is_finished:
            seq = next(s for s in parent.sequences if s.request is request)
            seq.detokenizer.flush()
            if parent.finished and parent.finished_time is None:
                parent.finished_time = time.monotonic()

    def _advance_beams(self, parent: _ParentRequest) -> None:
        """Once every live beam has its candidates: choose, fork and extend the slots."""
        beam = parent.beam
        slots = [seq.request for seq in parent.sequences]
        if beam.done or any(slots[i].beam_candidates is None for i in beam.live):
            return
        step: BeamStep = beam.step({i: slots[i] for i in beam.live})
        for source, target in step.forks:
            self.scheduler.fork_request(slots[source], slots[target])
            self._worker_steps.forget([slots[target].request_id])  # its sequence was replaced
        now = time.monotonic()
        for slot, entry in step.appends:
            request = slots[slot]
            request.append_output_token(entry.token_id)
            request.output_logprobs.append(entry)
            request.beam_candidates = None
            if request.first_token_time is None:
                request.first_token_time = now
        for slot in step.dropped:
            self.scheduler.finish_request(slots[slot].request_id, RequestStatus.FINISHED_STOPPED)
        if step.done:
            parent.finished_time = now

    def _make_output(self, parent: _ParentRequest) -> RequestOutput:
        if parent.beam is not None:
            completions = self._beam_completions(parent)
        else:
            completions = self._sample_completions(parent)
        prompt_logprobs = None
        if parent.params.prompt_logprobs is not None and not (parent.delta and parent.sent_prompt_logprobs):
            first = parent.sequences[0].request
            prompt_logprobs = [None] + [logprob_dict(entry) for entry in first.prompt_logprobs]
            # DELTA: only once they are complete (a chunked prompt computes them over steps).
            parent.sent_prompt_logprobs = len(prompt_logprobs) >= len(parent.prompt_token_ids)
        return self._request_output(parent, completions, parent.finished, parent.finished_time, prompt_logprobs)

    @staticmethod
    def _request_output(parent: _ParentRequest, completions: list[CompletionOutput], finished: bool,
                        finished_time: float | None, prompt_logprobs=None,
                        error: str | None = None) -> RequestOutput:
        head = parent.sequences[0].request
        if parent.delta:  # the completions hold only the last tokens; the sequences hold all
            num_output_tokens = sum(seq.request.num_output_tokens for seq in parent.sequences)
        else:
            num_output_tokens = sum(len(c.token_ids) for c in completions)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=head.num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=head.arrival_time,
                first_scheduled_time=head.first_scheduled_time,
                first_token_time=head.first_token_time,
                finished_time=finished_time,
                num_preemptions=sum(s.request.num_preemptions for s in parent.sequences),
                num_output_tokens=num_output_tokens,
            ),
            error=error,
        )

    def _beam_completions(self, parent: _ParentRequest) -> list[CompletionOutput]:
        params = parent.params
        completions = []
        for index, hypothesis in enumerate(parent.beam.best()):
            text_ids = hypothesis.token_ids
            if hypothesis.finish_reason == "stop" and not params.include_stop_str_in_output:
                text_ids = text_ids[:-1]
            detokenizer = IncrementalDetokenizer(self.tokenizer, parent.prompt_token_ids, params)
            detokenizer.add_tokens(text_ids)
            detokenizer.flush()
            completions.append(CompletionOutput(
                index=index,
                text=detokenizer.visible_text(True),
                token_ids=hypothesis.token_ids,
                cumulative_logprob=hypothesis.cumulative_logprob,
                logprobs=[logprob_dict(e) for e in hypothesis.logprobs] if params.logprobs is not None else None,
                finish_reason=hypothesis.finish_reason,
                stop_reason=hypothesis.stop_reason,
            ))
        return completions

    def _sample_completions(self, parent: _ParentRequest) -> list[CompletionOutput]:
        params = parent.params
        sequences = parent.sequences
        ranked = params.num_samples > params.n
        if ranked:  # best_of: the n samples with the highest cumulative logprob
            sequences = sorted(sequences, key=lambda seq: -sum(e.logprob for e in seq.request.output_logprobs))
            sequences = sequences[: params.n]
        completions = []
        for index, seq in enumerate(sequences):
            request = seq.request
            text = seq.detokenizer.visible_text(request.is_finished)
            first_token = 0
            if parent.delta:  # only what earlier outputs did not carry (ranked never streams)
                first_token = seq.sent_tokens
                text, seq.sent_text = text[seq.sent_text:], len(text)
                seq.sent_tokens = request.num_output_tokens
            logprobs = None
            cumulative = None
            if params.logprobs is not None:
                logprobs = [logprob_dict(entry) for entry in request.output_logprobs[first_token:]]
            if params.logprobs is not None or ranked:
                cumulative = sum(entry.logprob for entry in request.output_logprobs)
            completions.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=request.output_token_ids[first_token:],
                    cumulative_logprob=cumulative,
                    logprobs=logprobs,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        return completions
