"""Qwen3: Llama with per-head RMSNorm on queries and keys before rope."""

from __future__ import annotations

from pagoda.model.llama import ArchSwitches, LlamaForCausalLM


def qwen3_switches(hf_config) -> ArchSwitches:
    bias = bool(getattr(hf_config, "attention_bias", False))
    return ArchSwitches(qkv_bias=bias, o_bias=bias, qk_norm=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    switches_for = staticmethod(qwen3_switches)
