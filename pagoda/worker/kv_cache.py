"""The KV-cache tensors the worker owns, and how many blocks fit a budget.

Per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim],
addressed by block id and offset (slot = block_id * block_size + offset).
"""

from __future__ import annotations

import torch

from pagoda.model.llama import head_dim_of


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * kv_heads * head_dim_of(hf_config) * element


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    return budget_bytes // (block_size * bytes_per_token)


def allocate_kv_caches(
    hf_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    shape = (num_blocks, block_size, kv_heads, head_dim_of(hf_config))
    # Zeroed: attention gathers whole blocks, so it reads (and masks out)
    # slots never written, and masking needs finite values there.
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(hf_config.num_hidden_layers)
    ]
