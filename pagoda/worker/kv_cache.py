"""The KV-cache tensors the worker owns, and how many blocks fit a budget.

Per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim],
addressed by block id and offset (slot = block_id * block_size + offset).
Host block pools (swap space, offload tier) have the same layout in host memory.
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


def allocate_host_kv_caches(
    hf_config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Host block pools (the swap space, the offload tier of the prefix cache): per layer K
    and V like the device caches, in host memory (pinned when the device is CUDA).

    Left uninitialised (no pages touched until used): a host block is read only after a
    whole block was written into it (a swap-out, an offload, a disk read), so the
    device's finite values are all it ever holds when read.
    """
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    shape = (num_blocks, block_size, kv_heads, head_dim_of(hf_config))
    pin = device.type == "cuda"
    return [
        (torch.empty(shape, dtype=dtype, pin_memory=pin), torch.empty(shape, dtype=dtype, pin_memory=pin))
        for _ in range(hf_config.num_hidden_layers)
    ]


def move_blocks(
    source: list[tuple[torch.Tensor, torch.Tensor]],
    target: list[tuple[torch.Tensor, torch.Tensor]],
    pairs: list[tuple[int, int]],
) -> None:
    """Copies block `s` of every layer's K and V in `source` to block `t` in `target`, for each
    (s, t) in `pairs`: one index_select + index_copy_ per tensor.

    `source` and `target` are different tensors (device and host), so no copy reads
    another's write; targets must be distinct (index_copy_ with repeated indices keeps
    an unspecified one).
    """
    if not pairs:
        return
    from_device = source[0][0].device
    to_device = target[0][0].device
    sources = torch.tensor([s for s, _ in pairs], device=from_device)
    targets = torch.tensor([t for _, t in pairs], device=to_device)
    for (source_k, source_v), (target_k, target_v) in zip(source, target, strict=True):
        for source_cache, target_cache in ((source_k, target_k), (source_v, target_v)):
            target_cache.index_copy_(0, targets, transfer(source_cache.index_select(0, sources), to_device))


def transfer(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. Between a GPU and the host it crosses in pinned memory (torch's
    caching host allocator keeps the buffers): pageable copies run at a fraction of bus speed."""
    if tensor.device.type == device.type:
        return tensor.to(device)
    if device.type == "cpu":
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor)
        return pinned
    return tensor.pin_memory().to(device, non_blocking=True)
