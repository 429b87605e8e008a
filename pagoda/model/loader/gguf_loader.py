"""Load GGUF checkpoints: an HF-style config, HF-named float32 weights, a cached tokenizer.

Supported architectures (``general.architecture``): ``llama`` (llama.cpp also writes
Mistral models as llama), ``qwen2`` and ``qwen3``.

Invariants:
- ``read_gguf_config`` returns the keys of an HF ``config.json`` for the matching HF
  model class, with the values transformers' own GGUF conversion produces
  (``transformers.AutoConfig.from_pretrained(dir, gguf_file=name)``).
- ``iter_gguf_weights`` yields every tensor in the file exactly once, under its HF
  parameter name, as a float32 tensor in HF layout (``[out_features, in_features]``,
  llama.cpp's rope row permutation of q/k undone), except that linear-layer weights
  of the types in ``packed_types`` come as ``GGUFBlocks`` (the raw blocks, rows in the
  same HF order) for a quantized linear method to keep packed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from pagoda.model.quant.gguf_blocks import GGUFBlocks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# GGUF architecture name -> HF model class name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# llama.cpp's converter permutes the q/k rows of these architectures (and only these)
# for its interleaved rope; qwen2/qwen3 use the HF (half-split) layout unchanged.
_ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-layer GGUF tensor stem -> HF module path inside ``model.layers.{i}``.
_LAYER_TENSOR_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Stems of the weights that linear layers multiply by (what may stay packed).
_LINEAR_STEMS = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})

_LAYER_TENSOR_RE = re.compile(r"blk\.(?P<layer>\d+)\.(?P<stem>\w+)\.(?P<kind>weight|bias)")

# Rope scaling types with an HF equivalent that needs only scalar metadata.
_SUPPORTED_ROPE_SCALING = ("linear", "yarn")

# Default rope base of llama.cpp and of the HF llama/qwen configs.
_DEFAULT_ROPE_THETA = 10000.0

_MISSING = object()

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metadata


def _open_reader(path: str | Path) -> GGUFReader:
    """A parsed GGUF file, turning a missing or bad file into an error that names it.

    Parsing the metadata takes seconds for a large vocabulary, so the last file's reader
    is reused (``read_gguf_config`` then ``iter_gguf_weights`` parse once); a file
    rewritten since (new size or mtime) is parsed again.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    stat = path.stat()
    return _parse_gguf(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _parse_gguf(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    """Parse ``path``; ``size`` and ``mtime_ns`` only key the cache."""
    try:
        return GGUFReader(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _metadata(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The scalar value (int, float, bool or str) of metadata ``key``.

    Without ``default``, a missing key is an error naming the key.
    """
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file {reader.data.filename} lacks required metadata key {key!r}.")
        return default
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value[0].item()


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {tensor.name for tensor in reader.tensors}


def _architecture(reader: GGUFReader) -> str:
    """``general.architecture``, checked against the supported ones."""
    arch = _metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; "
            f"supported architectures are: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def _vocab_size(reader: GGUFReader, arch: str) -> int:
    """From ``{arch}.vocab_size``, else the token list's length, else token_embd's rows."""
    vocab_size = _metadata(reader, f"{arch}.vocab_size", None)
    if vocab_size is not None:
        return int(vocab_size)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            # GGUF shapes list the fastest-varying dimension first: [hidden, vocab].
            return int(tensor.shape[-1])
    raise ValueError(
        f"GGUF file {reader.data.filename} gives no vocabulary size: no {arch}.vocab_size, "
        "no tokenizer.ggml.tokens and no token_embd.weight tensor."
    )


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*``, or None when the file has none."""
    if "rope_freqs.weight" in _tensor_names(reader):
        # llama.cpp stores Llama-3.1-style scaling only as per-dimension frequency
        # factors; the HF parameters (low/high freq factors) can't be recovered from them.
        raise ValueError(
            f"GGUF file {reader.data.filename} uses per-dimension rope frequency factors "
            "(rope_freqs.weight, Llama 3.1-style 'llama3' rope scaling), which is not supported."
        )
    prefix = f"{arch}.rope.scaling"
    scaling_type = _metadata(reader, f"{prefix}.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type not in _SUPPORTED_ROPE_SCALING:
        raise ValueError(
            f"GGUF rope scaling type {scaling_type!r} is not supported; "
            f"supported types are: {', '.join(_SUPPORTED_ROPE_SCALING)}."
        )
    scaling: dict[str, Any] = {
        "rope_type": scaling_type,
        "factor": float(_metadata(reader, f"{prefix}.factor")),
    }
    original_context = _metadata(reader, f"{prefix}.original_context_length", None)
    if original_context is not None:
        scaling["original_max_position_embeddings"] = int(original_context)
    for gguf_suffix, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = _metadata(reader, f"{prefix}.{gguf_suffix}", None)
        if value is not None:
            scaling[hf_key] = float(value)
    return scaling


def _config_from_reader(reader: GGUFReader) -> dict[str, Any]:
    arch = _architecture(reader)
    hidden_size = int(_metadata(reader, f"{arch}.embedding_length"))
    num_heads = int(_metadata(reader, f"{arch}.attention.head_count"))
    tensor_names = _tensor_names(reader)
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "hidden_size": hidden_size,
        "intermediate_size": int(_metadata(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_metadata(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_metadata(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(_metadata(reader, f"{arch}.attention.key_length", hidden_size // num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(_metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_metadata(reader, f"{arch}.rope.freq_base", _DEFAULT_ROPE_THETA)),
        "max_position_embeddings": int(_metadata(reader, f"{arch}.context_length")),
        "vocab_size": _vocab_size(reader, arch),
        # The converter drops lm_head when it is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _metadata(reader, "tokenizer.ggml.eos_token_id", None),
    }
    pad_token_id = _metadata(reader, "tokenizer.ggml.padding_token_id", None)
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """An HF ``config.json``-style dict built from a GGUF file's metadata.

    ``bos_token_id``/``eos_token_id`` come from ``tokenizer.ggml.*`` (None when absent),
    as in transformers' GGUF conversion. Raises ``ValueError`` for an unsupported
    architecture or rope scaling, or when required metadata is missing.
    """
    return _config_from_reader(_open_reader(path))


# --------------------------------------------------------------------------- weights


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Dequantize one GGUF tensor's raw data (as ``GGUFReader`` exposes it) to float32.

    A quantized tensor's ``data`` is ``[rows, bytes_per_row]`` uint8; the result is
    ``[rows, columns]`` and never shares memory with ``data``. Raises ``ValueError`` for a
    type gguf-py can't dequantize.
    """
    try:
        values = gguf.quants.dequantize(data, qtype)
    except NotImplementedError as exc:
        raise ValueError(
            f"GGUF tensor type {qtype.name} is not supported: "
            f"gguf {importlib.metadata.version('gguf')} cannot dequantize it."
        ) from exc
    # F32 comes back as a view of ``data`` (often a read-only memory map); copy it.
    if np.may_share_memory(values, data):
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False))


def _hf_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor; unknown tensors are an error."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match is None or match["stem"] not in _LAYER_TENSOR_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart in pagoda's loader.")
    return f"model.layers.{match['layer']}.{_LAYER_TENSOR_NAMES[match['stem']]}.{match['kind']}"


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's q/k row permutation for llama.cpp's interleaved rope.

    HF orders each head's rows as [first elements of the rotary pairs, second elements];
    the converter interleaves them pairwise with
    ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)``, ``d = rows // n_head``.
    This is its inverse; it applies to weights and biases alike.
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(
    path: str | Path, packed_types: frozenset[GGMLQuantizationType] = frozenset()
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Yield ``(hf_name, float32 tensor in HF layout)`` for every tensor in a GGUF file.

    Linear-layer weights whose type is in ``packed_types`` come as ``GGUFBlocks`` instead.

    A tied model yields no ``lm_head.weight``. Raises ``ValueError`` for an unsupported
    architecture, a tensor type that can't be dequantized, or an unknown tensor name.
    """
    reader = _open_reader(path)
    config = _config_from_reader(reader)
    rope_heads: dict[str, int] = {}
    if config["model_type"] in _ROPE_PERMUTED_ARCHITECTURES:
        rope_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        stem = tensor.name.split(".")[-2]
        if (tensor.tensor_type in packed_types and stem in _LINEAR_STEMS
                and tensor.name.endswith(".weight") and len(tensor.shape) == 2):
            blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
            if stem in rope_heads:
                blocks = _unpermute_rope_rows(blocks, rope_heads[stem]).contiguous()
            yield hf_name, GGUFBlocks(tensor.tensor_type, blocks, (int(tensor.shape[1]), int(tensor.shape[0])))
            continue
        try:
            # A plain-ndarray view: slicing np.memmap costs Python-level overhead per block row.
            weight = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except ValueError as exc:
            raise ValueError(f"Cannot load tensor {tensor.name!r} from {path}: {exc}") from exc
        # GGUF shapes list the fastest-varying dimension first; HF's is the reverse.
        expected_shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if tuple(weight.shape) != expected_shape:
            raise ValueError(
                f"Tensor {tensor.name!r} in {path} dequantized to shape {tuple(weight.shape)}, "
                f"expected {expected_shape}."
            )
        if stem in rope_heads:
            weight = _unpermute_rope_rows(weight, rope_heads[stem])
        yield hf_name, weight


# --------------------------------------------------------------------------- tokenizer


def gguf_file_fingerprint(path: str | Path) -> str:
    """A short key for a GGUF file from its name, size and modification time.

    Readable (``<stem>-<16 hex digits>``) and cheap: the file's contents aren't read.
    """
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
    return f"{stem}-{digest[:16]}"


def default_tokenizer_cache_dir() -> Path:
    """``$PAGODA_CACHE_DIR/tokenizers`` if that variable is set, else ``~/.cache/pagoda/tokenizers``."""
    root = os.environ.get("PAGODA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "pagoda") / "tokenizers"


def _write_tokenizer_cache(path: Path, target: Path) -> None:
    """Convert the GGUF tokenizer and save it at ``target``, atomically.

    The tokenizer is saved into a temporary sibling directory that is then renamed onto
    ``target``, so ``target`` exists only when complete. When another process gets there
    first, its (complete) copy is kept.
    """
    from transformers import (
        AutoTokenizer,  # imported lazily: slow, and only tokenizers need it
    )

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp creates it private (0700); make it an ordinary directory
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process renamed its complete copy into place first: keep that one.
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def load_gguf_tokenizer(path: str | Path, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The transformers tokenizer embedded in a GGUF file, cached after the first call.

    Converting a GGUF tokenizer takes seconds, so the first call saves the converted
    tokenizer under ``cache_dir`` (default: ``default_tokenizer_cache_dir()``) in a
    directory keyed by ``gguf_file_fingerprint`` and the transformers version; every call
    loads from that directory, so the first and later calls return identical tokenizers.
    """
    import transformers  # imported lazily: slow, and only tokenizers need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    root = Path(cache_dir) if cache_dir is not None else default_tokenizer_cache_dir()
    target = root / f"{gguf_file_fingerprint(path)}-transformers-{transformers.__version__}"
    if not target.is_dir():
        logger.warning("converting the GGUF tokenizer of %s (first run only; cached in %s)", path.name, root)
        _write_tokenizer_cache(path, target)
    return transformers.AutoTokenizer.from_pretrained(target)
