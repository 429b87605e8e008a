"""Loads the draft model of `speculative_config={"method": "draft_model", ...}`.

The draft is a smaller model that shares the target's tokenizer, or the target itself with
other linear weights (`"quantization": "int4"`: self-speculation, no second checkpoint).
It must have the target's vocab_size: drafts are token ids the target verifies. What it
runs on is the worker's business (worker/draft_runner.py); this module only checks and
loads it, and sizes its KV per token for the engine's KV memory budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.config import ConfigError
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.model.loader.loader import build_model, load_hf_config
from pagoda.model.loader.resolve import ModelNotFoundError, resolve_model
from pagoda.model.quant.methods import resolve_quantization
from pagoda.worker.kv_cache import kv_bytes_per_token

logger = logging.getLogger(__name__)


@dataclass
class DraftModel:
    name: str  # as the user named it (the target's name for self-speculation)
    hf_config: object
    model: nn.Module
    quantization: str  # the linear method it runs ("none", "int8", "int4", "gguf")

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return kv_bytes_per_token(self.hf_config, dtype)


def load_draft_model(spec: SpeculativeConfig, *, target_name: str, target_vocab_size: int, target_quantization: str,
                     load_format: str, dtype: torch.dtype, device: torch.device, max_model_len: int, seed: int,
                     show_progress: bool) -> DraftModel:
    """The draft model, checked against the target; errors name the speculative_config key."""
    name = spec.model or target_name
    try:
        source = resolve_model(name)
    except ModelNotFoundError as error:
        raise ConfigError("speculative_config.model", name, str(error).rstrip(".")) from None
    hf_config = load_hf_config(source)
    vocab_size = getattr(hf_config, "vocab_size", None)
    if vocab_size != target_vocab_size:
        raise ConfigError("speculative_config.model", name,
                          f"its vocab_size={vocab_size} differs from the target model's vocab_size="
                          f"{target_vocab_size}; a draft model must share the target's tokenizer")
    # Dummy weights follow the target's choice only for the target's own checkpoint (self-speculation).
    same_checkpoint = spec.model is None or spec.model == target_name
    draft_format = load_format if same_checkpoint else "auto"
    try:
        method = resolve_quantization(spec.quantization or "auto", source_kind=source.kind,
                                      load_format=draft_format, device=device, dtype=dtype)
    except ConfigError as error:
        limit = str(error).split(" is invalid: ", 1)[-1].rstrip(".")
        raise ConfigError("speculative_config.quantization", spec.quantization, limit) from None
    if same_checkpoint and method.name == target_quantization:
        logger.warning("speculative_config: the draft model is the target itself (%s, quantization=%s): every "
                       "draft is accepted but each costs a full forward pass; give the draft another "
                       "`quantization` (int4, int8) or a smaller `model`", name, method.name)
    model = build_model(hf_config, source, load_format=draft_format, dtype=dtype, device=device,
                        max_position=max(max_model_len, getattr(hf_config, "max_position_embeddings", 0) or 0),
                        seed=seed, show_progress=show_progress, linear_method=method)
    return DraftModel(name, hf_config, model, method.name)
