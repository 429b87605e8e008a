"""The batched LoRA layer against a per-token reference; the LoRA path is skipped when no
token of a step has an adapter (and the compiled decoder stack stays usable)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pagoda.model.lora import layers
from pagoda.model.lora.layers import LoRALinearWeights, LoRAStepContext


def _setup(max_loras=3, max_rank=8, in_features=24, shards=(16, 8, 8)):
    gen = torch.Generator().manual_seed(0)
    ctx = LoRAStepContext(torch.device("cpu"), max_loras)
    weights = LoRALinearWeights(ctx, max_loras, max_rank, in_features, shards, torch.float32, torch.device("cpu"))
    adapters = {}
    for slot, (rank, used) in enumerate([(8, (0, 1, 2)), (3, (0, 2)), (5, (1,))][:max_loras]):
        pairs = {s: (torch.randn(rank, in_features, generator=gen), torch.randn(shards[s], rank, generator=gen))
                 for s in used}
        weights.set_slot(slot, pairs)
        adapters[slot] = pairs
    return ctx, weights, adapters, shards


def _reference(x, slots, adapters, shards, base):
    out = base.clone()
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        for shard, (a, b) in adapters[slot].items():
            row = sum(shards[:shard])
            out[t, row:row + shards[shard]] += b @ (a @ x[t])
    return out


def _paths():
    """The compiled op (where the extension builds) and the torch path."""
    from pagoda.kernels import cpu_ext

    return ["kernel", "torch"] if cpu_ext.cpu_ops() is not None else ["torch"]


@contextlib.contextmanager
def _path(name):
    with (layers.lora_kernel_disabled() if name == "torch" else contextlib.nullcontext()):
        yield


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("num_tokens", [1, 5, 40, 300])  # dense (few tokens) and segment paths
def test_mixed_slots_match_per_token_reference(num_tokens, path):
    ctx, weights, adapters, shards = _setup()
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 24, generator=gen)
    slots = torch.randint(-1, 3, (num_tokens,), generator=gen).numpy()
    slots[0] = 1
    base = torch.randn(num_tokens, sum(shards), generator=gen)
    with _path(path):
        ctx.set_step(slots.astype(np.int64))
        assert ctx.active and ctx.dense == (num_tokens <= layers.DENSE_MAX_TOKENS)
        assert (ctx.ops is not None) == (path == "kernel")
        out = weights.apply(x, base.clone())
    torch.testing.assert_close(out, _reference(x, slots, adapters, shards, base), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", _paths())
def test_slot_range_and_cleared_slots(path):
    ctx, weights, adapters, shards = _setup()
    x = torch.randn(4, 24)
    base = torch.zeros(4, sum(shards))
    with _path(path):
        ctx.set_step(np.array([2, -1, 2, 2]))  # one slot only: range 2..2
        assert ctx.slots() == {2} and (ctx.plan().lo, ctx.plan().hi) == (2, 2)
        torch.testing.assert_close(weights.apply(x, base.clone()),
                                   _reference(x, [2, -1, 2, 2], adapters, shards, base))
        weights.clear_slot(2)
        assert torch.equal(weights.apply(x, base.clone()), base)


@pytest.mark.parametrize("max_rank", [8, 5])
@pytest.mark.parametrize("num_tokens", [3, 32, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_and_torch_paths_agree_in_16_bit(num_tokens, dtype, max_rank):
    """Realistic widths (vector loops and their tails: 72 = 64 + 8 columns, 100 inputs), odd ranks."""
    if "kernel" not in _paths():
        pytest.skip("compiled CPU kernels unavailable")
    gen = torch.Generator().manual_seed(7)
    shards, in_features = (128, 72, 72), 100
    ctx = LoRAStepContext(torch.device("cpu"), 4)
    weights = LoRALinearWeights(ctx, 4, max_rank, in_features, shards, dtype, torch.device("cpu"))
    for slot, rank in enumerate([max_rank, 4, 0, max_rank - 1]):
        if rank:
            weights.set_slot(slot, {s: (torch.randn(rank, in_features, generator=gen) * 0.1,
                                        torch.randn(size, rank, generator=gen) * 0.1)
                                    for s, size in enumerate(shards) if (s + slot) % 3})
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    base = torch.randn(num_tokens, sum(shards), generator=gen).to(dtype)
    slots = torch.randint(-1, 4, (num_tokens,), generator=gen).numpy().astype(np.int64)
    ctx.set_step(slots)
    fast = weights.apply(x, base.clone())
    with layers.lora_kernel_disabled():
        ctx.set_step(slots)
        slow = weights.apply(x, base.clone())
    assert not torch.equal(fast, base)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


def test_no_adapter_tokens_leave_the_context_inactive():
    ctx, *_ = _setup()
    ctx.set_step(np.array([-1, -1, -1]))
    assert not ctx.active


def test_base_only_steps_skip_lora_and_keep_the_compiled_stack(tmp_path, monkeypatch):
    from pagoda import LLM, LoRARequest, SamplingParams
    from pagoda.model.decoder_stack import CompiledDecoderStack
    from tests.conftest import make_tiny_checkpoint
    from tests.lora.adapters import make_adapter

    base = make_tiny_checkpoint(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "a", ["q_proj"], rank=4, seed=1)
    llm = LLM(str(base), dtype="float32", show_progress=False, kv_cache_memory=16 * 1024**2, enable_lora=True)
    seen = []
    applies = CompiledDecoderStack.applies
    monkeypatch.setattr(CompiledDecoderStack, "applies", staticmethod(
        lambda *args: seen.append("asked") or applies(*args)))
    calls = []
    monkeypatch.setattr(LoRALinearWeights, "apply", lambda self, x, out: calls.append(1) or out)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([[5, 6, 7]], params)
    assert seen and not calls  # base only: the stack is considered, no LoRA layer runs
    seen.clear()
    llm.generate([[5, 6, 7]], params, lora_request=LoRARequest("a", 1, str(adapter)))
    assert calls and not seen  # a LoRA step never asks for the compiled stack
