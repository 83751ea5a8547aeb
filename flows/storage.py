"""Run-folder I/O on local paths and fsspec URLs alike: whole-file writes (temp + rename
locally, one PUT on object stores), reads, existence, joins, contact sheets."""

from __future__ import annotations

import os
from pathlib import Path


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def put_bytes(path: str, data: bytes) -> None:
    """Write a file of a run folder whole: temp + rename locally, one PUT on object stores."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "wb") as fh:
            fh.write(data)
    else:
        from facecorpus.core import atomic

        atomic.write_bytes(path, data)


def get_bytes(path: str) -> bytes | None:
    """A run-folder file's bytes, or None when it does not exist."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_sheet(path: str, rows: list, **kw) -> str:
    """A PNG contact sheet (:func:`facecorpus.sheets.contact_sheet`) at a local path or an
    fsspec URL (drawn locally, then put whole)."""
    import tempfile

    from facecorpus.sheets import contact_sheet

    if not is_url(path):
        return str(contact_sheet(rows, path, **kw))
    with tempfile.TemporaryDirectory() as d:
        tmp = contact_sheet(rows, os.path.join(d, "sheet.png"), **kw)
        put_bytes(path, Path(tmp).read_bytes())
    return path


def exists(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)
