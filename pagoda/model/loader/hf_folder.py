"""HF checkpoint folders: config.json, *.safetensors (sharded or not), tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def iter_safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}; use load_format='dummy' for random weights.")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
