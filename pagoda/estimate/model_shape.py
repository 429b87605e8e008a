"""A decoder-only transformer's shape, and what follows from it: parameter
counts by part, KV-cache bytes per token, prefill and decode FLOPs.

Formulas (d = hidden size, L = layers, h = attention heads, k = KV heads,
a = head dim, f = MLP intermediate size, V = vocabulary, T = tokens):

  attention params / layer = d*h*a (q) + 2*d*k*a (k, v) + h*a*d (o)   [+ q/k/v biases]
  MLP params / layer       = 3*d*f (gate, up, down)    MoE: E experts of 3*d*f_e, a d*E router,
                                                      active = top-k experts (+ shared expert)
  simple count             = L * (attention + MLP) + V*d   (linear weights and one embedding)
  total                    = simple + V*d if the LM head is not tied + norms and biases
  KV bytes / token         = 2 * L * k * a * bytes
  prefill FLOPs (T tokens) = 2 * P_layers * T  +  4 * L * T^2 * h*a  +  2 * V*d
                             (matmuls; QK^T and AV over the full T x T score matrix;
                             logits for the last token only, as a serving engine computes)
  decode FLOPs / token     = 2 * P_layers  +  4 * L * C * h*a  +  2 * V*d     (C = context length)

P_layers counts the active parameters of the layers (embedding lookups cost no FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf_config(cls, config, name: str = "") -> ModelShape:
        """From a transformers config (or anything with the same attribute names)."""
        get = lambda *keys, default=None: next(  # noqa: E731
            (getattr(config, key) for key in keys if getattr(config, key, None) is not None), default)
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        if hidden is None or heads is None:
            raise ValueError(f"config of {name or 'the model'} has no hidden_size / num_attention_heads: "
                             "not a decoder-only transformer the estimator knows")
        experts = get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0
        intermediate = get("intermediate_size", "ffn_dim", default=4 * hidden)
        return cls(
            name=name or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"),
            hidden_size=hidden,
            num_layers=get("num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate_size=intermediate,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", "qkv_bias", default=getattr(config, "model_type", "") == "qwen2")),
            qk_norm=getattr(config, "model_type", "") in ("qwen3", "qwen3_moe"),
            num_experts=experts,
            experts_per_token=get("num_experts_per_tok", default=0) or 0,
            expert_intermediate_size=get("moe_intermediate_size", default=intermediate) if experts else 0,
            shared_expert_intermediate_size=get("shared_expert_intermediate_size", default=0) or 0,
            max_position_embeddings=get("max_position_embeddings"),
        )

    # -- parameters ----------------------------------------------------------

    @property
    def attention_params_per_layer(self) -> int:
        d, h, k, a = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        return d * h * a + 2 * d * k * a + h * a * d

    def mlp_params_per_layer(self, active: bool = False) -> int:
        d = self.hidden_size
        if not self.num_experts:
            return 3 * d * self.intermediate_size
        experts = self.experts_per_token if active else self.num_experts
        shared = 3 * d * self.shared_expert_intermediate_size
        return experts * 3 * d * self.expert_intermediate_size + shared + d * self.num_experts

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's own weights (0 when tied to the embedding)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def small_params(self) -> int:
        """Norms and biases: two RMSNorms per layer and a final one, q/k/v biases, q/k norms."""
        per_layer = 2 * self.hidden_size
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return self.num_layers * per_layer + self.hidden_size

    def layer_params(self, active: bool = False) -> int:
        return self.num_layers * (self.attention_params_per_layer + self.mlp_params_per_layer(active))

    @property
    def simple_params(self) -> int:
        return self.layer_params() + self.embedding_params

    def total_params(self, active: bool = False) -> int:
        return self.layer_params(active) + self.embedding_params + self.head_params + self.small_params

    def param_breakdown(self) -> dict[str, int]:
        parts = {
            "embedding": self.embedding_params,
            "attention": self.num_layers * self.attention_params_per_layer,
            "mlp": self.num_layers * self.mlp_params_per_layer(),
            "norms and biases": self.small_params,
            "lm head": self.head_params,
        }
        parts["total"] = self.total_params()
        if self.num_experts:
            parts["mlp active"] = self.num_layers * self.mlp_params_per_layer(active=True)
            parts["total active"] = self.total_params(active=True)
        return parts

    # -- memory and FLOPs ----------------------------------------------------

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

    def prefill_flops(self, tokens: int) -> float:
        """One sequence of `tokens` prompt tokens (see the module docstring)."""
        attention = 4 * self.num_layers * tokens**2 * self.num_heads * self.head_dim
        return 2 * self.layer_params(active=True) * tokens + attention + 2 * self.vocab_size * self.hidden_size

    def decode_flops(self, context: int) -> float:
        """One new token attending to `context` tokens."""
        attention = 4 * self.num_layers * context * self.num_heads * self.head_dim
        return 2 * self.layer_params(active=True) + attention + 2 * self.vocab_size * self.hidden_size


# Shapes of well-known models, for planning without their files (no model hub here).
KNOWN_SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    ModelShape("llama-2-7b", 4096, 32, 32, 32, 128, 11008, 32000, max_position_embeddings=4096),
    ModelShape("llama-2-13b", 5120, 40, 40, 40, 128, 13824, 32000, max_position_embeddings=4096),
    ModelShape("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, max_position_embeddings=131072),
    ModelShape("llama-3.1-70b", 8192, 80, 64, 8, 128, 28672, 128256, max_position_embeddings=131072),
    ModelShape("qwen2.5-7b", 3584, 28, 28, 4, 128, 18944, 152064, qkv_bias=True, max_position_embeddings=32768),
    ModelShape("qwen2.5-32b", 5120, 64, 40, 8, 128, 27648, 152064, qkv_bias=True, max_position_embeddings=32768),
    ModelShape("qwen3-8b", 4096, 36, 32, 8, 128, 12288, 151936, qk_norm=True, max_position_embeddings=40960),
    ModelShape("mixtral-8x7b", 4096, 32, 32, 8, 128, 14336, 32000, num_experts=8, experts_per_token=2,
               expert_intermediate_size=14336, max_position_embeddings=32768),
]}
