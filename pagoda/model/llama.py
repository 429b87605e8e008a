"""Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window).

Qwen2 and Qwen3 are the same network with a few switches (`qwen2.py`,
`qwen3.py`). Names of parameters follow HF checkpoints except for two fused
projections: q/k/v -> `qkv_proj` and gate/up -> `gate_up_proj`, which
`load_weights` assembles from the HF shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.model.attention.metadata import AttentionMetadata
from pagoda.model.decoder_stack import CompiledDecoderStack
from pagoda.model.layers.activation import silu_and_mul
from pagoda.model.layers.linear import Linear
from pagoda.model.layers.norm import RMSNorm
from pagoda.model.layers.rotary import RotaryEmbedding, rope_spec_from_hf_config


@dataclass(frozen=True)
class ArchSwitches:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def llama_switches(hf_config) -> ArchSwitches:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return ArchSwitches(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


def head_dim_of(hf_config) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return head_dim or hf_config.hidden_size // hf_config.num_attention_heads


class Attention(nn.Module):
    def __init__(self, hf_config, switches: ArchSwitches, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_kv_heads} is invalid: must divide "
                f"num_attention_heads={self.num_heads}."
            )
        self.head_dim = head_dim_of(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        hidden = hf_config.hidden_size
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=switches.qkv_bias,
                               shard_sizes=[self.q_size, self.kv_size, self.kv_size])
        self.o_proj = Linear(self.q_size, hidden, bias=switches.o_bias)
        if switches.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = meta.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, hf_config, switches: ArchSwitches):
        super().__init__()
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported: only silu (SwiGLU).")
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=switches.mlp_bias, shard_sizes=[inter, inter])
        self.down_proj = Linear(inter, hidden, bias=switches.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config, switches: ArchSwitches, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(hf_config, switches, rotary)
        self.mlp = MLP(hf_config, switches)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta):
        """Residual stream as in vLLM: returns (mlp output, residual); their sum is HF's layer output.

        The add of the previous sublayer's output is fused into the next norm;
        it rounds exactly as HF's `residual + hidden` (a float add commutes).
        """
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, hf_config, switches: ArchSwitches, max_position: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
        rotary = RotaryEmbedding(rope_spec_from_hf_config(hf_config, head_dim_of(hf_config)), max_position)
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, switches, rotary) for _ in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta):
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(positions, h, residual, kv_cache, meta)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm(h, residual)[0]


# HF shard name -> (our fused parameter, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    switches_for = staticmethod(llama_switches)

    def __init__(self, hf_config, max_position: int):
        super().__init__()
        self.config = hf_config
        self.model = DecoderModel(hf_config, self.switches_for(hf_config), max_position)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Multi-LoRA: the step's adapter context (model/lora/layers.py), set by the worker's
        # LoRAManager; None when LoRA is off.
        self.lora_context = None

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        embed = self.model.embed_tokens
        # The compiled stack knows no LoRA: a step where any token uses an adapter runs the modules.
        lora_active = self.lora_context is not None and self.lora_context.active
        if not lora_active and CompiledDecoderStack.applies(input_ids, self.model.norm.weight.dtype, meta):
            stack = self._decoder_stack()
            if stack is not None and stack.takes_step(input_ids.shape[0]):
                return stack(embed(input_ids), positions, kv_caches, meta)
        return self.model(input_ids, positions, kv_caches, meta)

    def _decoder_stack(self) -> CompiledDecoderStack | None:
        """The compiled decoder stack (model/decoder_stack.py), built at the first step that may use
        it, once the weights are final; None where it cannot run."""
        if not hasattr(self, "_compiled_stack"):
            self._compiled_stack = CompiledDecoderStack.build(self.model)
        return self._compiled_stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _shard_sizes(self, fused: str) -> list[int]:
        attn = self.model.layers[0].self_attn
        if fused == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        inter = self.config.intermediate_size
        return [inter, inter]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the model; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = name, None
            for hf_part, (fused, index) in _STACKED.items():
                if f".{hf_part}." in name:
                    target, shard = name.replace(hf_part, fused), index
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}.")
            if not isinstance(tensor, torch.Tensor):  # quantized blocks, kept packed (GGUFBlocks)
                layer = self.get_submodule(target.rsplit(".", 1)[0])
                layer.load_gguf_shard(shard or 0, tensor, name)
                if shard is not None:
                    target = f"{target}#{shard}"
            elif shard is None:
                _copy(param, tensor, name)
            else:
                sizes = self._shard_sizes(target.split(".")[-2])
                offset = sum(sizes[:shard])
                _copy(param.narrow(0, offset, sizes[shard]), tensor, name)
                target = f"{target}#{shard}"
            loaded.add(target)
        expected = set()
        for pname in params:
            if pname == "lm_head.weight" and self.tie_word_embeddings:
                continue
            fused = pname.split(".")[-2] if pname.count(".") >= 1 else ""
            if fused in ("qkv_proj", "gate_up_proj"):
                expected.update(f"{pname}#{i}" for i in range(len(self._shard_sizes(fused))))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}.")


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}.")
    dst.copy_(src)
