"""Content hashing: one way to turn the things an output depends on into a key."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return {"__nd__": str(o.dtype), "shape": list(o.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest()}
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot hash {type(o).__name__}")


def digest(*parts: Any, n: int = 64) -> str:
    """sha256 over the parts (bytes as is, anything else as stable JSON), truncated to n."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else stable_json(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:n]


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """sha256 of a local file or any fsspec URL's bytes."""
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as fh:
        while b := fh.read(chunk):
            h.update(b)
    return h.hexdigest()


def package_version() -> str:
    from facecorpus import __version__

    return __version__


_SOURCE: dict[tuple, str] = {}


def source_digest(packages: tuple[str, ...] = ("core", "meshops", "renderers", "datasets",
                                               "tasks")) -> str:
    """sha256 over the source files of the packages whose code makes a dataset's bytes, so a
    code change (an edited stage, a fixed kernel) changes every key even without a release.
    Computed once per process."""
    import os

    got = _SOURCE.get(packages)
    if got is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for pkg in packages:
            folder = os.path.join(root, pkg)
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    h.update(f"{pkg}/{name}\0".encode())
                    with open(os.path.join(folder, name), "rb") as fh:
                        h.update(fh.read())
        got = _SOURCE[packages] = h.hexdigest()[:16]
    return got
