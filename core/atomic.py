"""Atomic local writes: a temp file beside the target, then ``os.replace``.

A reader, or a run killed half-way, never sees half a file. The temp name carries the
process and thread so concurrent writers into one folder never share it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> IO:
    """``with atomic_open(p) as fh: ...`` writes ``p`` whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> Path:
    return write_text(path, json.dumps(obj, indent=2, **dumps_kw))


def write_with(path: str | os.PathLike, writer: Callable[[IO], Any], mode: str = "wb") -> Path:
    """Atomic write through a function of a file handle (``np.save``, ``Image.save`` ...)."""
    with atomic_open(path, mode) as fh:
        writer(fh)
    return Path(path)


def save_npz(path: str | os.PathLike, arrays: dict, *, compressed: bool = True) -> Path:
    import numpy as np

    fn = np.savez_compressed if compressed else np.savez
    return write_with(path, lambda fh: fn(fh, **arrays))


def npz_bytes(arrays: dict, level: int = 1) -> bytes:
    """``np.savez_compressed``'s format (what ``np.load`` reads, no pickles) at zlib
    ``level``: numpy fixes 6, which on a shard's analysis (8 photos, 10.5 MB raw: images,
    float16 UV maps, masks) costs 0.19 CPU-s for 4.41 MB; level 1 0.13 s for 4.48 MB (#12)."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def load_npz(path: str | os.PathLike) -> dict:
    """All members of a pickle-free ``.npz``."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
