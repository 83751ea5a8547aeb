"""Typed (pydantic) run configs, their YAML defaults (package data) and the error types.

A YAML config names its type with a top-level ``kind:`` key (one of :data:`CONFIG_KINDS`);
:func:`load_config` validates it and raises one ConfigError listing every problem with its
dotted key path. Config classes are imported lazily, so this package stays cheap to import.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from facecorpus.core.errors import ConfigError

CONFIG_KINDS: dict[str, str] = {
    "model": "facecorpus.configs.model:ModelConfig",
    "pseudo_gt": "facecorpus.configs.pseudo_gt:PseudoGTConfig",
    "synthesis": "facecorpus.configs.synthesis:SynthesisConfig",
    "train": "facecorpus.configs.train:TrainConfig",
}

CONFIG_DIR = Path(__file__).resolve().parent  # the shipped YAML defaults live here


def config_class(kind: str):
    """The pydantic class registered for ``kind`` (imported on first use)."""
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind '{kind}'; known: {', '.join(sorted(CONFIG_KINDS))}")
    mod_name, _, cls_name = CONFIG_KINDS[kind].partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise ConfigError(f"config kind '{kind}' is not available ({mod_name} missing)") from None
        raise
    return getattr(mod, cls_name)


def load_config(path_or_dict: str | os.PathLike | dict[str, Any], kind: str | None = None):
    """Read (YAML file) or take (dict) a config and validate it as its kind.

    Args:
        path_or_dict: a YAML file path or an already-parsed mapping.
        kind: the expected kind; None: the mapping's top-level ``kind:`` key. If both are
            given they must agree.

    Raises:
        ConfigError: listing every error with its key path.
    """
    from facecorpus.configs.base import read_yaml, validate

    if isinstance(path_or_dict, dict):
        data, source = dict(path_or_dict), "<config>"
    else:
        data, source = read_yaml(path_or_dict), str(path_or_dict)
    declared = data.get("kind")
    if kind is None:
        if declared is None:
            raise ConfigError(f"{source}: no top-level 'kind:' key; expected one of "
                              f"{', '.join(sorted(CONFIG_KINDS))}")
        kind = str(declared)
    elif declared is not None and declared != kind:
        raise ConfigError(f"{source}: kind: '{declared}' but a '{kind}' config was expected")
    cls = config_class(kind)
    if "kind" not in cls.model_fields:
        data.pop("kind", None)
    return validate(cls, data, source)


def default_config_path(name: str) -> Path:
    """A shipped YAML default, e.g. ``default_config_path("model_ict.yaml")``."""
    p = CONFIG_DIR / name
    if not p.is_file():
        raise ConfigError(f"no shipped config '{name}' in {CONFIG_DIR}")
    return p


__all__ = ["CONFIG_DIR", "CONFIG_KINDS", "ConfigError", "config_class", "default_config_path",
           "load_config"]
