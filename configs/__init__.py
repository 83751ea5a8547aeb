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
    "rotate_render": "facecorpus.configs.rotate_render:RotateRenderConfig",
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


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``{"fit.camera": "perspective"}``) in a config mapping, in place."""
    for key, value in (overrides or {}).items():
        node = data
        *head, last = key.split(".")
        for k in head:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{k}' is not a section")
            node = nxt
        node[last] = value
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments -> overrides (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_config(path_or_dict: str | os.PathLike | dict[str, Any] | None, kind: str | None = None,
                overrides: dict[str, Any] | None = None):
    """Read (YAML file) or take (dict) a config, apply dotted ``overrides``, validate it as
    its kind. The one config loader of the project (flows and CLI commands call it).

    Args:
        path_or_dict: a YAML file path, an already-parsed mapping, or None for the shipped
            default of ``kind`` (``configs/<kind>.yaml``).
        kind: the expected kind; None: the mapping's top-level ``kind:`` key. If both are
            given they must agree.
        overrides: dotted keys set after reading, before validation.

    Raises:
        ConfigError: listing every error with its key path.
    """
    from facecorpus.configs.base import read_yaml, validate

    if path_or_dict is None:
        if kind is None:
            raise ConfigError("load_config(None) needs a kind")
        path_or_dict = default_config_path(f"{kind}.yaml")
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
    apply_overrides(data, overrides)
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


__all__ = ["CONFIG_DIR", "CONFIG_KINDS", "ConfigError", "apply_overrides", "config_class",
           "default_config_path", "load_config", "parse_set"]
