"""The server's LoRA adapters: names clients put in `model`, and loading/unloading at run time.

`LoRARegistry` maps adapter names to `LoRARequest`s (each load gets a new id, never reused,
so a name reloaded from another folder never meets the old adapter's slot or KV blocks).
It is the one piece of mutable state the endpoints share: requests read it when they start
(`lookup`); only the load/unload routes change it. Requests already running keep the
adapter they started with, even if it is unloaded meanwhile.

Runtime loading (vLLM's `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`) takes
only folders under `--lora-dir`: a client never names an arbitrary path on the server.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from pagoda.entrypoints.openai.errors import APIError
from pagoda.model.lora.adapter import AdapterError, ModelShape, load_adapter
from pagoda.model.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self, enabled: bool = False, max_lora_rank: int = 16, lora_dir: str | None = None,
                 modules: dict[str, str] | None = None):
        self.enabled = enabled
        self.max_lora_rank = max_lora_rank
        self.lora_dir = lora_dir
        self._ids = itertools.count(1)
        self.adapters: dict[str, LoRARequest] = {}
        for name, path in (modules or {}).items():  # --lora-modules: the operator's own paths
            self.adapters[name] = LoRARequest(name, next(self._ids), str(path))

    def lookup(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (Ollama's ':latest' tag allowed), or None."""
        if not model:
            return None
        return self.adapters.get(model) or self.adapters.get(model.removesuffix(":latest"))

    def _folder_under_lora_dir(self, lora_path: str) -> str:
        if self.lora_dir is None:
            raise APIError(400, "loading LoRA adapters at run time is off: start the server with --lora-dir DIR "
                                "(adapters are loaded only from folders under it)", "lora_path")
        root = os.path.realpath(self.lora_dir)
        path = Path(lora_path)
        resolved = os.path.realpath(path if path.is_absolute() else Path(root) / path)
        if os.path.commonpath([root, resolved]) != root or resolved == root:
            raise APIError(403, f"lora_path {lora_path!r} is not a folder under the server's --lora-dir "
                                f"{self.lora_dir!r}", "lora_path", "permission_error")
        return resolved

    def load(self, name: str, lora_path: str, hf_config, served_model_name: str) -> LoRARequest:
        """Checks and registers an adapter; APIError 400/403 naming what is wrong."""
        if not self.enabled:
            raise APIError(400, "this server was started without --enable-lora", "lora_name")
        if not name:
            raise APIError(400, "lora_name is empty", "lora_name")
        if name == served_model_name or name in self.adapters:
            raise APIError(400, f"lora_name {name!r} is already in use: unload it first or pick another name",
                           "lora_name")
        folder = self._folder_under_lora_dir(lora_path)
        try:
            load_adapter(folder, ModelShape.from_hf_config(hf_config), self.max_lora_rank, name)
        except AdapterError as error:
            raise APIError(400, str(error), "lora_path") from None
        if name in self.adapters:  # loaded meanwhile by another request
            raise APIError(400, f"lora_name {name!r} is already in use", "lora_name")
        request = LoRARequest(name, next(self._ids), folder)
        self.adapters[name] = request
        return request

    def unload(self, name: str) -> LoRARequest:
        """Forgets the adapter `name` (404 if not loaded) and returns it: the caller tells the
        engine (`AsyncLLM.remove_lora`), which drops its device slot and host copy."""
        if name not in self.adapters:
            raise APIError(404, f"LoRA adapter {name!r} is not loaded", "lora_name", "not_found_error")
        return self.adapters.pop(name)
