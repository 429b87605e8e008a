"""Speculative decoding: draft proposers and the verification (rejection) sampler."""
