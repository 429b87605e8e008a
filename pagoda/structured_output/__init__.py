"""Structured outputs (constrained decoding) with xgrammar.

- `params.py`: `StructuredOutputsParams`, the constraint a request carries (no xgrammar).
- `grammar.py`: constraint -> xgrammar Grammar; the edge's validity check.
- `request.py`: one sequence's compile future and matcher.
- `manager.py`: `StructuredOutputManager`, the engine side: compile cache and thread,
  matchers, the per-step token bitmask.
- `bitmask.py`: the worker side: apply a step's bitmask to the logits, batched.
"""
