"""Which tensors may take the compiled CPU ops (pagoda/csrc/cpu/{norm,rotary,activation}.cpp).

`cpu_ops_for(x)` is ``torch.ops.pagoda`` when `x` is a CPU tensor of a dtype
those ops support and the extension loaded, else None: the caller then runs
its torch code, which the compiled ops reproduce rounding for rounding
(tests/unit/test_fused_ops.py). Other devices always take the torch code.
"""

from __future__ import annotations

import torch

from pagoda.kernels import cpu_ext

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_ops_for(x: torch.Tensor):
    if not x.is_cpu or x.dtype not in FUSED_DTYPES:
        return None
    return cpu_ext.cpu_ops()
