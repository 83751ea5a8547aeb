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
