"""Quantized weight formats for `pagoda.model.layers.linear.Linear` (docs/quantization.md).

- `gguf_blocks`: GGUF Q4_0/Q4_1 blocks as read from the file, decoded exactly.
- `packed`: the packed forms (int4 groups, int8 rows) and their matmuls.
- `methods`: one linear method per format, and the 'auto' rule.
"""
