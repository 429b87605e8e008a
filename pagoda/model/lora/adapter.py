"""Reads a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
into per-layer (A, B) weights for pagoda's fused layers, refusing what it cannot serve.

Supported: LoRA on any of q/k/v/o/gate/up/down projections of the decoder layers, rank up
to ``max_lora_rank`` (per module: ``rank_pattern`` works, the rank is read from the
tensors), scaling ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
Refused, with an `AdapterError` naming the reason: a missing or unreadable folder, DoRA,
``modules_to_save``, adapters on embeddings or lm_head (or any other module), trained
biases, ``alpha_pattern``, fan_in_fan_out, a rank above ``max_lora_rank``, shapes or layer
indices that do not fit the base model.

The scaling is folded into B, so a slot holds ``A`` [r, in] and ``B * scaling`` [out, r].

Each loaded adapter carries ``digest``, a SHA-256 of the exact bytes it was read from (config
and tensors): the prefix cache keys an adapter's KV blocks by it, so a folder rewritten in
place never meets the KV blocks of its old contents.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# HF module name -> (pagoda's Linear attribute path in a decoder layer, shard index in it).
TARGET_MODULES = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and why."""


@dataclass(frozen=True)
class ModelShape:
    """The (in, out) features of each target module, and the number of layers."""

    num_layers: int
    features: dict[str, tuple[int, int]]

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelShape:
        hidden = hf_config.hidden_size
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        inter = hf_config.intermediate_size
        return cls(hf_config.num_hidden_layers, {
            "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        })


@dataclass
class LoRAAdapter:
    """A loaded adapter: weights[(layer index, HF module name)] = (A [r, in], B * scaling [out, r])."""

    name: str
    path: str
    rank: int  # the largest rank of its modules
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    digest: str = ""  # SHA-256 (hex) of the config and tensor file bytes this was read from

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.weights})


def _read_config_bytes(path: str | Path, name: str) -> bytes:
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter {name!r}: {str(path)!r} is not a folder.")
    if not config_file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {str(config_file)!r} does not exist (a PEFT adapter "
                           "folder holds adapter_config.json and adapter_model.safetensors).")
    try:
        return config_file.read_bytes()
    except OSError as error:
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {str(config_file)!r}: {error}") from None


def _parse_config(data: bytes, config_file: Path, name: str) -> dict:
    try:
        config = json.loads(data)
    except ValueError as error:
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {str(config_file)!r}: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"LoRA adapter {name!r}: {str(config_file)!r} is not a JSON object.")
    return config


def check_config(config: dict, name: str) -> None:
    """Refuses the adapter kinds pagoda does not serve, naming what."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"LoRA adapter {name!r}: peft_type {peft_type!r} is not supported (only LORA).")
    if config.get("use_dora"):
        raise AdapterError(f"LoRA adapter {name!r} uses DoRA (use_dora=true), which is not supported.")
    if config.get("modules_to_save"):
        raise AdapterError(f"LoRA adapter {name!r} has modules_to_save={config['modules_to_save']!r}: adapters "
                           "that replace whole modules (embeddings, lm_head) are not supported.")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regular expression: checked on the tensors below
        targets = []
    unknown = sorted(set(targets) - set(TARGET_MODULES))
    if unknown:
        what = "embeddings or lm_head" if set(unknown) & {"embed_tokens", "lm_head", "wte"} else "modules"
        raise AdapterError(f"LoRA adapter {name!r} targets {unknown}: LoRA on {what} is not supported; "
                           f"target modules must be among {sorted(TARGET_MODULES)}.")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"LoRA adapter {name!r} trains biases (bias={config['bias']!r}); only bias='none' "
                           "is supported.")
    if config.get("alpha_pattern"):
        raise AdapterError(f"LoRA adapter {name!r} has alpha_pattern, which is not supported.")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"LoRA adapter {name!r} has fan_in_fan_out=true, which is not supported.")


def load_adapter(path: str | Path, shape: ModelShape, max_rank: int, name: str = "adapter",
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """The adapter at `path`, checked against the base model's `shape` and `max_rank`."""
    from safetensors.torch import load as load_safetensors

    config_bytes = _read_config_bytes(path, name)
    config = _parse_config(config_bytes, Path(path) / "adapter_config.json", name)
    check_config(config, name)
    tensor_file = Path(path) / "adapter_model.safetensors"
    if not tensor_file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {str(tensor_file)!r} does not exist (only the safetensors "
                           "format is read).")
    try:  # parsed from the very bytes the digest covers: the digest names what was loaded
        tensor_bytes = tensor_file.read_bytes()
        tensors = load_safetensors(tensor_bytes)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {str(tensor_file)!r}: {error}") from None
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"LoRA adapter {name!r} holds DoRA magnitudes ({key!r}): DoRA is not supported.")
        match = _KEY.search(key)
        if match is None:
            what = "embeddings or lm_head" if ("embed" in key or "lm_head" in key) else "this module"
            raise AdapterError(f"LoRA adapter {name!r} has tensor {key!r}: LoRA on {what} is not supported; "
                               f"target modules must be among {sorted(TARGET_MODULES)} of the decoder layers.")
        layer, module, half = int(match.group(1)), match.group(2), match.group(3)
        if module not in TARGET_MODULES:
            raise AdapterError(f"LoRA adapter {name!r} targets {module!r} (tensor {key!r}), which is not supported; "
                               f"target modules must be among {sorted(TARGET_MODULES)}.")
        if layer >= shape.num_layers:
            raise AdapterError(f"LoRA adapter {name!r} has tensor {key!r} for layer {layer}, but the model has "
                               f"{shape.num_layers} layers.")
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise AdapterError(f"LoRA adapter {name!r}: {str(tensor_file)!r} holds no LoRA weights.")
    weights = {}
    top_rank = 0
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: layer {layer} {module} has lora_{next(iter(pair))} "
                               "without its other half.")
        a, b = pair["A"], pair["B"]
        in_features, out_features = shape.features[module]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise AdapterError(f"LoRA adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and "
                               f"B {tuple(b.shape)}, expected A (r, {in_features}) and B ({out_features}, r): "
                               "it was made for another base model.")
        if rank > max_rank:
            raise AdapterError(f"LoRA adapter {name!r} has rank {rank} (layer {layer} {module}), more than "
                               f"max_lora_rank={max_rank}; start the engine with a larger max_lora_rank.")
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        weights[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scaling).to(dtype).contiguous())
        top_rank = max(top_rank, rank)
    return LoRAAdapter(name, str(path), top_rank, weights, content_digest(config_bytes, tensor_bytes))


def content_digest(config_bytes: bytes, tensor_bytes: bytes) -> str:
    """SHA-256 of an adapter's two files, length-prefixed so that no two pairs collide by concatenation."""
    h = hashlib.sha256()
    for part in (config_bytes, tensor_bytes):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()
