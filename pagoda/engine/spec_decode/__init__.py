"""Speculative decoding: proposers, their configuration, and the engine-side speculator."""
