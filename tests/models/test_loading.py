"""Loading paths: sharded safetensors, a bare config.json with dummy weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from tests.conftest import TINY_VOCAB


def _generate(model_path: str, **kwargs) -> list[int]:
    llm = LLM(model_path, dtype="float32", show_progress=False, kv_cache_memory=32 * 1024**2, **kwargs)
    prompt = torch.randint(3, TINY_VOCAB, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0].token_ids


def test_sharded_safetensors_load_like_a_single_file(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert _generate(str(tmp_path)) == _generate(str(tiny_llama))


def test_dummy_weights_from_a_bare_config(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    tokens = _generate(str(tmp_path / "config.json"), load_format="dummy")
    assert len(tokens) == 10 and all(0 <= t < TINY_VOCAB for t in tokens)
    assert _generate(str(tmp_path), load_format="dummy") == tokens  # seeded: the same random weights


def test_missing_weights_are_a_clear_error(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="load_format='dummy'"):
        _generate(str(tmp_path))
