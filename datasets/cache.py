"""A local, size-limited cache of remote shard files (object stores: ``s3://``, ``gs://`` ...).

One cache folder may be shared by every DataLoader worker and every process of a machine:
entries are written atomically (:mod:`facecorpus.core.atomic`), named by the content they hold
(root URL + field + shard + the shard's committed sha256), so a rewritten shard is a new
entry and a stale one is never served. Least-recently-used entries (file mtime, refreshed on
every hit) are removed when the folder exceeds ``max_bytes``; a file larger than the whole
limit is served without being cached. Entries evicted by another process between our check
and our read are fetched again, never mistaken for absent data.
"""

from __future__ import annotations

import os
from pathlib import Path

from facecorpus.core.atomic import write_bytes
from facecorpus.core.hashing import digest


class ShardCache:
    """Whole shard files of a remote dataset, kept on local disk up to ``max_bytes``.

    Args:
        folder: local cache folder (created on first use).
        max_bytes: size limit of the folder's entries; least recently used go first.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int):
        if int(max_bytes) <= 0:
            raise ValueError(f"cache max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0

    def entry(self, *identity: str) -> Path:
        key = digest(*identity, n=40)
        return self.folder / key[:2] / key

    def get(self, fs, path: str, *identity: str) -> bytes:
        """The bytes of ``fs``'s ``path``, from the cache when ``identity`` is cached.

        Raises FileNotFoundError when the remote file does not exist (nothing is cached)."""
        local = self.entry(path, *identity)
        try:
            data = local.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None:
            self.hits += 1
            try:
                os.utime(local)  # recently used: evicted last
            except FileNotFoundError:
                pass
            return data
        self.misses += 1
        data = fs.cat_file(path)
        if len(data) <= self.max_bytes:
            write_bytes(local, data)
            self._evict(keep=local)
        return data

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        try:
            subdirs = list(os.scandir(self.folder))
        except FileNotFoundError:
            return out
        for d in subdirs:
            if not d.is_dir():
                continue
            for e in os.scandir(d.path):
                if e.name.startswith("."):  # a write in progress (core.atomic temp file)
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, Path(e.path)))
        return out

    def _evict(self, keep: Path) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
            except FileNotFoundError:  # another process evicted it first
                pass
            total -= size
