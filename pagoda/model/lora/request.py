"""`LoRARequest`: which adapter a request uses, as plain (picklable) data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's shape: ``LoRARequest(lora_name, lora_int_id, lora_path)``.

    ``lora_int_id`` (>= 1) identifies the adapter inside the engine (slots, caches); two
    requests with the same id must name the same adapter. The engine keys the prefix cache
    by a digest of the adapter's files (`Request.lora_digest`); ``cache_key`` (name + path)
    is the fallback for a `Request` made without an engine (scheduler tests).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id={self.lora_int_id!r} is invalid: must be an integer >= 1.")
        if not self.lora_name:
            raise ValueError("lora_name is empty: give the adapter a name.")
        if not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} is empty.")

    @property
    def cache_key(self) -> tuple:
        return ("lora", self.lora_name, str(self.lora_path))
