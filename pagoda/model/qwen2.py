"""Qwen2: Llama with biases on the q/k/v projections (not on o_proj)."""

from __future__ import annotations

from pagoda.model.llama import ArchSwitches, LlamaForCausalLM


def qwen2_switches(hf_config) -> ArchSwitches:
    return ArchSwitches(qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    switches_for = staticmethod(qwen2_switches)
