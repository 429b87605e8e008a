"""Host-memory and disk tiers for prefix-cache blocks, end to end on a tiny model.

A prefix evicted from a small device cache comes back from host memory or
disk with the same tokens as recomputing it; the disk tier survives a new
engine; foreign or corrupt files are refused, never loaded.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import ConfigError
from pagoda.core.kv_offload import KVOffloadManager
from tests.conftest import TINY_VOCAB

BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # layers x (K, V) x block_size x kv_heads x head_dim x fp32
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(tiny_llama, **kwargs) -> LLM:
    kwargs.setdefault("num_blocks", 24)  # 96 tokens: one 60-token prompt at a time stays resident
    return LLM(str(tiny_llama), dtype="float32", show_progress=False, block_size=4, max_model_len=96, **kwargs)


PREFIX = _tokens(60, seed=1)
OTHERS = [_tokens(60, seed=10 + i) for i in range(3)]  # enough to evict PREFIX from 24 blocks


@pytest.fixture(scope="module")
def expected(tiny_llama):
    plain = _llm(tiny_llama, enable_prefix_caching=False)
    return [o.outputs[0].token_ids for o in plain.generate([PREFIX + [5]] + [p + [5] for p in OTHERS], GREEDY)]


def _run(llm: LLM) -> list[list[int]]:
    first = llm.generate([PREFIX + [5]], GREEDY)
    rest = [llm.generate([p + [5]], GREEDY)[0] for p in OTHERS]  # one by one: each evicts the last
    return [o.outputs[0].token_ids for o in first + rest]


def test_host_tier_brings_back_an_evicted_prefix(tiny_llama, expected):
    llm = _llm(tiny_llama, kv_offload_cpu_gb=64 * BLOCK_BYTES / 1024**3)
    assert _run(llm) == expected
    stats = llm.engine.stats()
    assert stats.kv_offload_saved_blocks_total >= 15  # PREFIX's blocks were evicted, and kept
    before = stats.kv_offload_host_hits_total
    [again] = llm.generate([PREFIX + [5]], GREEDY)
    assert again.outputs[0].token_ids == expected[0]
    assert llm.engine.stats().kv_offload_host_hits_total - before == 15  # 60 tokens = 15 full blocks
    assert again.num_cached_tokens == 60
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_without_tiers_the_evicted_prefix_is_recomputed(tiny_llama, expected):
    llm = _llm(tiny_llama)
    assert _run(llm) == expected
    [again] = llm.generate([PREFIX + [5]], GREEDY)
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == expected[0]


def test_disk_tier_survives_a_new_engine(tiny_llama, expected, tmp_path):
    with _llm(tiny_llama, kv_offload_disk=str(tmp_path)) as first:
        assert _run(first) == expected
    files = list(tmp_path.glob("*/*.safetensors"))
    assert len(files) >= 15 * 4  # every prompt's full blocks: evicted ones and, at close, resident ones
    second = _llm(tiny_llama, kv_offload_disk=str(tmp_path))
    [output] = second.generate([PREFIX + [5]], GREEDY)  # the new engine's very first request
    assert output.num_cached_tokens == 60 and output.outputs[0].token_ids == expected[0]
    assert second.engine.stats().kv_offload_disk_hits_total == 15


def test_foreign_and_corrupt_files_are_ignored(tiny_llama, expected, tmp_path):
    from pagoda.core.kv_cache_manager import request_block_hashes

    with _llm(tiny_llama, kv_offload_disk=str(tmp_path)) as first:
        first.generate([PREFIX + [5]], GREEDY)
    llm = _llm(tiny_llama, kv_offload_disk=str(tmp_path))
    offload = llm.engine.offload
    hashes = request_block_hashes(PREFIX, 4)
    path = {i: offload.disk_dir / f"{hashes[i].hex()}.safetensors" for i in range(3)}
    _rewrite_metadata(path[0], fingerprint="0" * 64)  # block 0: written by "another model"
    raw = bytearray(path[1].read_bytes())
    raw[-8:] = bytes(8)  # block 1: damaged data, header intact
    path[1].write_bytes(bytes(raw))

    assert offload.stage(hashes[1]) is None and not path[1].exists()  # checksum mismatch: refused, deleted
    [output] = llm.generate([PREFIX + [5]], GREEDY)
    assert output.num_cached_tokens == 0  # the lookup met the foreign block 0 first: nothing loaded
    assert output.outputs[0].token_ids == expected[0]
    assert offload.stats.rejected_files == 2 and not path[0].exists()
    assert offload.stage(hashes[2]) is not None  # an intact file of this model still loads


def _manager(num_slots: int, **kwargs) -> KVOffloadManager:
    """One layer, blocks of 4 tokens, 1 KV head of 2 dims: a block is (1, 2, 4, 1, 2)."""
    host = [(torch.zeros(num_slots, 4, 1, 2), torch.zeros(num_slots, 4, 1, 2))]
    return KVOffloadManager(host, "f" * 64, **kwargs)


def _rewrite_metadata(path, **changes) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


def test_a_pinned_host_slot_is_never_reused_within_a_step():
    manager = _manager(2)
    manager.offload(b"a", device_block=0)
    manager.offload(b"b", device_block=1)
    manager.offload(b"c", device_block=2)  # both slots pinned by this step's copies: c is dropped
    assert not manager.contains(b"c")
    assert manager.take_step_copies() == ([(0, 0), (1, 1)], [])
    manager.after_step()
    assert manager.stage(b"a") == 0  # a is now the most recently used, and pinned
    manager.offload(b"c", device_block=2)  # evicts b (least recently used, unpinned)
    assert manager.contains(b"c") and not manager.contains(b"b")
    manager.offload(b"d", device_block=3)  # only a (pinned) and c (pinned) remain: dropped
    assert not manager.contains(b"d")


def test_a_load_into_a_block_evicted_before_the_step_is_cancelled():
    manager = _manager(4)
    manager.offload(b"a", device_block=0)
    manager.take_step_copies()
    manager.after_step()
    manager.plan_load(manager.stage(b"a"), device_block=5)
    manager.offload(b"a", device_block=5)  # block 5 evicted again before the load ran
    assert manager.take_step_copies() == ([], [])


def test_offload_settings_are_validated():
    with pytest.raises(ConfigError, match="kv_offload_cpu_gb"):
        LLM("unused", kv_offload_cpu_gb=-1)
    with pytest.raises(ConfigError, match="prefix caching"):
        LLM("unused", kv_offload_cpu_gb=1, enable_prefix_caching=False)


def test_a_later_block_still_on_the_device_is_used_not_loaded():
    """Host has blocks 0 and 1, the device still has 1: the lookup loads 0 and shares 1."""
    from pagoda.core.kv_cache_manager import KVCacheManager, request_block_hashes
    from pagoda.request import Request

    offload = _manager(8)
    kv = KVCacheManager(num_blocks=6, block_size=4, offload=offload)
    prompt = list(range(10, 19))  # 9 tokens: two full blocks
    h0, h1 = request_block_hashes(prompt, 4)
    offload.offload(h0, device_block=4)
    offload.offload(h1, device_block=5)
    offload.take_step_copies()
    offload.after_step()
    [b1] = kv.pool.allocate(1)
    kv.pool.cache_block(b1, h1)
    kv.pool.free([b1])  # block 1's KV is on the device (free, cached); block 0's only in host memory
    request = Request("r", prompt, SamplingParams(max_tokens=1), frozenset({2}))
    blocks = kv.find_cached_prefix(request)
    assert len(blocks) == 2 and blocks[1] == b1
    assert offload.take_step_copies()[1] == [(offload._slot_of[h0], blocks[0])]
    assert kv.allocate_slots("r", 9, blocks, 8)  # admission takes both as prefix hits
    assert kv.block_table("r")[:2] == blocks


def test_disk_budget_keeps_the_most_recent_files(tmp_path):
    offload = _manager(4, disk_dir=tmp_path, disk_max_bytes=1)
    for i in range(3):
        offload.offload(bytes([i]) * 32, device_block=i)
        offload.take_step_copies()
        offload.after_step()
    assert offload.num_disk_blocks == 1 and offload.on_disk(bytes([2]) * 32)
    assert len(list(offload.disk_dir.glob("*.safetensors"))) == 1


def test_a_failed_disk_write_is_skipped_not_raised(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    offload = _manager(4, disk_dir=tmp_path)
    offload.offload(b"a" * 32, device_block=0)
    offload.take_step_copies()
    offload.after_step()  # logs, does not raise
    assert offload.contains(b"a" * 32) and not offload.on_disk(b"a" * 32)
    assert list(offload.disk_dir.iterdir()) == []
