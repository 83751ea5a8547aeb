"""Pydantic base for run configs and YAML loading with complete, key-path error reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from facecorpus.core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StrictConfig(BaseModel):
    """Base of every run config: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def key_path(loc: tuple) -> str:
    """Pydantic error location -> dotted key path (``augment.views[2].yaw``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def format_errors(e: ValidationError, source: str) -> str:
    """One line per error: ``key.path: message (got: value)``."""
    lines = [f"{source}: {e.error_count()} error(s)"]
    for err in e.errors(include_url=False):
        loc = key_path(tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p
                                                             and p.endswith("]"))))
        got = ""
        if err.get("type") not in ("missing", "extra_forbidden") and "input" in err:
            text = repr(err["input"])
            got = f" (got: {text[:60]}{'...' if len(text) > 60 else ''})"
        msg = "unknown key" if err.get("type") == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (safe loader); ConfigError naming the file otherwise."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(cls: type[BaseModel], data: dict[str, Any], source: str = "<config>"):
    """``cls.model_validate(data)`` with every error reported in one ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


class RunnerFields(StrictConfig):
    """Where a flow runs (never part of any content key: the same inputs and config give the
    same bytes whatever runs them). Shared by every flow config."""

    workers: int = Field(2, ge=1)
    task_runner: Literal["threads", "dask"] = Field(
        "dask", description="threads: one process; dask: a LocalCluster of single-threaded "
                            "processes, or the scheduler at dask_address")
    dask_address: str | None = Field(None, description="join this Dask scheduler (tcp://...) "
                                                       "instead of starting a LocalCluster")
    retries: int = Field(2, ge=0, description="retries of a shard task (transient failures: "
                                              "I/O, a lost worker)")


RUNNER_FIELDS = frozenset(RunnerFields.model_fields)


def content_config(cfg: BaseModel) -> dict:
    """The part of a run config that determines the output bytes (not how it is scheduled)."""
    return cfg.model_dump(mode="json", exclude=set(RUNNER_FIELDS))


def check_device(key: str, device: str, *, needs_cuda: bool) -> None:
    """Validate a torch device setting (``cpu | cuda | cuda:N | auto``); with ``needs_cuda``
    (a cuda device the run will use) fail now when CUDA is absent, not later in a worker."""
    d = device
    if not (d in ("cpu", "auto", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
        raise ValueError(f"{key}: cpu | cuda | cuda:N | auto, not {d!r}")
    if needs_cuda and d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{key} {d!r}: no CUDA device on this machine")
