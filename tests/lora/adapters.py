"""Test adapters made with peft on a base checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base: Path, folder: Path, targets: list[str], rank: int, seed: int, alpha: float | None = None,
                 use_rslora: bool = False, **extra) -> Path:
    """A PEFT LoRA adapter with random (nonzero) A and B on `targets`, saved to `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                        use_rslora=use_rslora, init_lora_weights=False, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    peft_model.save_pretrained(folder)
    return folder


def hf_greedy(base: Path, adapter: Path | None, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers (+ peft) greedy tokens, float32 (EOS neither stops nor is suppressed, as with
    pagoda's ignore_eos)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return greedy_loop(model, prompt, new_tokens)


def greedy_loop(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Argmax decoding with the KV cache, every token kept (generate's min_new_tokens would
    instead forbid EOS, which ignore_eos does not)."""
    tokens, past = [], None
    inputs = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            inputs = torch.tensor([[token]])
    return tokens
