"""`pagoda estimate`: parameters, memory, FLOPs and roofline times for a model on an accelerator."""
