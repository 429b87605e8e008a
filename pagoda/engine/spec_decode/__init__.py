"""Speculative decoding: the configuration, the engine-side speculator, the n-gram proposer and the rejection sampler."""
