"""Which architecture module serves a model: by config `model_type` or GGUF `general.architecture`.

A new architecture is one file in runtime/models/ (meeting runtime/models/base.py's contract) plus a
line in each table below. Architecture modules are imported on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.errors import ModelFormatError
from runtime.models.base import check
from runtime.weights import read_config

# config.json model_type -> runtime.models.<module>
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "mamba": "mamba",
    "falcon_mamba": "mamba",
    "mamba2": "mamba2",
    "jamba": "jamba",
}

# GGUF general.architecture -> runtime.models.<module>
GGUF_ARCHS = {
    "llama": "llama",
    "mamba": "mamba",
    "mamba2": "mamba2",
    "jamba": "jamba",
}

# mistral-inference's params.json (Codestral Mamba) -> the module whose config_from_params maps it
PARAMS_JSON = "mamba2"


def _import(name: str) -> ModuleType:
    return check(importlib.import_module(f"runtime.models.{name}"))


def short_name(arch_mod: ModuleType) -> str:
    """The module's name in runtime/models/ ("llama", "mamba", ...): LoadedModel.arch."""
    return arch_mod.__name__.rsplit(".", 1)[1]


def gguf_architecture(arch_mod: ModuleType) -> str:
    """The GGUF general.architecture a module writes."""
    return next(k for k, v in GGUF_ARCHS.items() if v == short_name(arch_mod))


def arch_for_config(cfg: dict, where: str = "config.json") -> ModuleType:
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ModelFormatError(f"{where}: no model_type field; cannot tell the architecture")
    if model_type not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise ModelFormatError(f"{where}: unsupported model_type {model_type!r} (supported: {known})")
    return _import(MODEL_TYPES[model_type])


def arch_for_folder(folder: Path) -> tuple[dict, Path, ModuleType, Any]:
    """A model folder's (config, config path, architecture module, parsed Args): config.json (HF) or
    params.json (mistral-inference, mapped to the HF config of PARAMS_JSON's architecture)."""
    cfg, cfg_path = read_config(folder)
    if cfg_path.name == "params.json":
        cfg = _import(PARAMS_JSON).config_from_params(cfg)
    arch_mod = arch_for_config(cfg, str(cfg_path))
    try:
        args = arch_mod.Args.from_config(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        why = f"a count of 0 ({e})" if isinstance(e, ZeroDivisionError) else e
        raise ModelFormatError(f"{cfg_path}: missing or invalid field {why}") from None
    return cfg, cfg_path, arch_mod, args


def arch_for_gguf(architecture: str, where: str) -> ModuleType:
    if architecture not in GGUF_ARCHS:
        known = ", ".join(sorted(GGUF_ARCHS))
        raise ModelFormatError(f"{where}: unsupported GGUF architecture {architecture!r} (supported: {known})")
    return _import(GGUF_ARCHS[architecture])
