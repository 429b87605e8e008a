"""Builds a ready model from a `ModelSource`: config, tokenizer, weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from pagoda.model.layers.rotary import RotaryEmbedding
from pagoda.model.loader.gguf_loader import (
    iter_gguf_weights,
    load_gguf_tokenizer,
    read_gguf_config,
)
from pagoda.model.loader.hf_folder import iter_safetensors_weights
from pagoda.model.loader.resolve import ModelSource
from pagoda.model.quant.methods import FloatMethod, LinearMethod, apply_linear_method
from pagoda.model.registry import model_class_for

logger = logging.getLogger(__name__)


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    if source.kind == "gguf":
        fields = read_gguf_config(source.path)
        return AutoConfig.for_model(**fields)
    return AutoConfig.from_pretrained(str(source.folder))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """The tokenizer named by `tokenizer`, else the model's own.

    None for a folder without tokenizer files (dummy or test checkpoints):
    the engine then takes token-id prompts only and returns no text.
    """
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    if source.kind == "gguf":
        return load_gguf_tokenizer(source.path)
    if not any((source.folder / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: token-id prompts only, no text output", source.folder)
        return None
    return AutoTokenizer.from_pretrained(str(source.folder))


def _iter_weights(source: ModelSource, method: LinearMethod) -> Iterator[tuple[str, torch.Tensor]]:
    if source.kind == "gguf":
        return iter_gguf_weights(source.path, packed_types=method.gguf_types)
    return iter_safetensors_weights(source.folder)


def build_model(
    hf_config: PretrainedConfig,
    source: ModelSource,
    *,
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    seed: int = 0,
    show_progress: bool = True,
    linear_method: LinearMethod | None = None,
) -> nn.Module:
    """Creates the model without initializing memory twice, then fills it.

    Parameters are created on the meta device and materialized directly in
    `dtype` on `device`; then the checkpoint (or random values for
    load_format='dummy') is copied in. Last, `linear_method` packs the linear
    layers (default: float weights, as loaded).
    """
    method = linear_method or FloatMethod()
    expected_kind = {"safetensors": "hf", "gguf": "gguf"}.get(load_format)
    if expected_kind is not None and expected_kind != source.kind:
        raise ValueError(f"load_format={load_format!r} is invalid: {source.name!r} is a {source.kind} model.")
    model_cls = model_class_for(hf_config)
    with torch.device("meta"):
        model = model_cls(hf_config, max_position)
    model = model.to(dtype=dtype).to_empty(device=device)
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    if load_format == "dummy":
        _fill_dummy(model, seed)
    else:
        weights = _iter_weights(source, method)
        if show_progress:
            weights = tqdm(weights, desc="Loading weights", unit=" tensors", leave=False, mininterval=1.0, delay=1.0)
        model.load_weights(weights)
    apply_linear_method(model, method)
    # Inference only: no autograd graph may ever hold activations alive.
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _fill_dummy(model: nn.Module, seed: int) -> None:
    """Random weights at the real size: N(0, 0.02) matrices, ~1 norm scales."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        values = torch.empty(param.shape, dtype=torch.float32)
        if param.dim() == 1 and "norm" in name:
            values.uniform_(0.9, 1.1, generator=gen)
        else:
            values.normal_(0.0, 0.02, generator=gen)
        param.copy_(values)
