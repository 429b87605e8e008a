"""Multi-LoRA serving (S-LoRA / Punica style): many PEFT adapters mixed in one batch.

- `request.py`: `LoRARequest`, the plain data naming an adapter (vLLM's shape).
- `adapter.py`: reads and validates a PEFT adapter folder into per-layer A/B weights.
- `layers.py`: the per-step context (`LoRAStepContext`) and each `Linear`'s stacked slot
  weights (`LoRALinearWeights`), whose `apply` adds the low-rank deltas of every adapter in
  the step together (the compiled `pagoda::lora_add_` on the CPU, csrc/cpu/lora.cpp; else
  masked all-slot matmuls for few tokens, one matmul pair per adapter otherwise).
- `manager.py`: the worker's `LoRAManager`: `max_loras` device slots, an LRU of adapters
  in host memory, each step's per-token slot indices, and dropping unused or removed ids.
"""

from pagoda.model.lora.request import LoRARequest

__all__ = ["LoRARequest"]
