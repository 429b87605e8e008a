"""How much GPU memory a step needs beside the weights and the KV cache, measured before the
KV cache is sized (as vLLM's profile run does).

The KV cache takes what is left of ``gpu_memory_utilization`` of the GPU once the weights are
loaded. A step's activations come on top, and the largest step the scheduler can plan, a
prefill of ``max_num_batched_tokens`` tokens (with the logits of up to ``max_num_seqs`` rows),
needs the most. Sizing the cache without them lets a long prefill run out of memory after
start-up. So, on CUDA, the engine runs that step once, on dummy token ids over a temporary
KV cache just big enough for it, and reserves its peak (`peak_step_bytes`).

`run_largest_step` is the step itself (any device, tested on the CPU); `peak_step_bytes`
measures it on CUDA; `kv_budget_bytes` is the arithmetic.
"""

from __future__ import annotations

import logging

import torch

from pagoda.model.attention.backend import select_attention_backend
from pagoda.model.attention.metadata import StepLayout
from pagoda.worker.kv_cache import allocate_kv_caches, kv_bytes_per_token

logger = logging.getLogger(__name__)


def largest_step_lengths(max_num_batched_tokens: int, max_model_len: int, max_num_seqs: int) -> list[int]:
    """Prompt rows of the largest step the scheduler can plan: `max_num_batched_tokens`
    tokens, in rows of at most `max_model_len` tokens, at most `max_num_seqs` rows."""
    lengths, left = [], max_num_batched_tokens
    while left > 0 and len(lengths) < max_num_seqs:
        lengths.append(min(left, max_model_len))
        left -= lengths[-1]
    return lengths


@torch.inference_mode()
def run_largest_step(model, hf_config, dtype: torch.dtype, device: torch.device, lengths: list[int],
                     num_sampled_rows: int, block_size: int, attention_backend: str) -> torch.Tensor:
    """One prefill step of rows `lengths` on dummy token ids (0 .. vocab-1, a fixed pattern)
    over a temporary KV cache that holds just those rows, then the logits (and their
    log-softmax, as a step with logprobs takes) of `num_sampled_rows` rows. Returns the
    logits; the temporary cache is gone when this returns."""
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    blocks_per_row = [-(-n // block_size) for n in lengths]
    kv_caches = allocate_kv_caches(hf_config, sum(blocks_per_row) + 1, block_size, dtype, device)
    width = max(blocks_per_row)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    next_block = 1  # block 0 stays unused, as in the engine's pool
    for row, count in enumerate(blocks_per_row):
        tables[row, :count] = torch.arange(next_block, next_block + count, dtype=torch.int32)
        next_block += count
    layout = StepLayout.build(lengths, lengths, 0, tables.to(device), block_size)
    backend = select_attention_backend(attention_backend, device, num_heads, num_kv_heads)
    meta = backend.build_metadata(layout)
    total = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    input_ids = (torch.arange(total) % hf_config.vocab_size).to(device)
    hidden = model(input_ids, positions, kv_caches, meta)
    logits = model.compute_logits(hidden[:max(1, min(num_sampled_rows, total))])
    torch.log_softmax(logits, dim=-1)
    del kv_caches, hidden
    return logits


def peak_step_bytes(model, hf_config, dtype: torch.dtype, device: torch.device, max_num_batched_tokens: int,
                    max_model_len: int, max_num_seqs: int, block_size: int, attention_backend: str) -> int:
    """CUDA: the bytes the largest step allocates at its peak beyond what was allocated before
    it (its temporary KV cache not counted: the real one replaces it)."""
    lengths = largest_step_lengths(max_num_batched_tokens, max_model_len, max_num_seqs)
    # The temporary KV cache run_largest_step allocates, taken out of the peak.
    num_blocks = sum(-(-n // block_size) for n in lengths) + 1
    kv_bytes = num_blocks * block_size * kv_bytes_per_token(hf_config, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    logits = run_largest_step(model, hf_config, dtype, device, lengths, max_num_seqs, block_size, attention_backend)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - kv_bytes
    del logits
    torch.cuda.empty_cache()
    return max(0, peak)


def kv_budget_bytes(total: int, free: int, utilization: float, peak_step: int) -> int:
    """The KV cache's share: `utilization` of the GPU's `total` memory, less what is in use
    already (`total - free`: weights, the CUDA context, other processes) and less the largest
    step's peak."""
    return int(total * utilization - (total - free) - peak_step)
