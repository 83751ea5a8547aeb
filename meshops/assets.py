"""Where model assets come from: the local mirror, the cache, and downloads.

- ``$FACECORPUS_ASSETS``: a local, read-only mirror (e.g. ``models/ict-facekit/<archive>``);
  the only place product code looks for pre-placed assets.
- ``$FACECORPUS_CACHE`` (default ``~/.cache/facecorpus``): built ``.npz`` models and downloads.
- Downloads: ``http(s)://`` and ``file://`` URLs, written atomically into the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

from facecorpus.core.errors import AssetUnavailableError

log = logging.getLogger(__name__)


def assets_dir() -> Path | None:
    """The local mirror folder from ``$FACECORPUS_ASSETS``, or None if unset or missing."""
    env = os.environ.get("FACECORPUS_ASSETS")
    if env and Path(env).is_dir():
        return Path(env)
    return None


def cache_dir() -> Path:
    """``$FACECORPUS_CACHE`` or ``~/.cache/facecorpus`` (not created here)."""
    env = os.environ.get("FACECORPUS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "facecorpus"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: str | os.PathLike, suffixes=(".obj", ".json")) -> str:
    """A digest of a folder: sha256 over sorted (relative name, file sha256) pairs."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.suffix in suffixes):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "file")


def fetch(url: str, dest_dir: str | os.PathLike | None = None, *, timeout: float = 30.0,
          sha256: str | None = None) -> Path:
    """Make a URL's content available as a local file.

    ``file://`` URLs resolve to the file itself (no copy). ``http(s)`` URLs download once into
    ``dest_dir`` (default ``$FACECORPUS_CACHE/downloads``), atomically (temp file, then
    rename); an existing complete download is reused.

    Raises:
        AssetUnavailableError: the URL cannot be reached or read, or the checksum differs.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        if not path.exists():
            raise AssetUnavailableError(f"{url}: no such file")
        return path
    if parsed.scheme not in ("http", "https"):
        raise AssetUnavailableError(f"{url}: unsupported URL scheme '{parsed.scheme}'")
    dest_dir = Path(dest_dir) if dest_dir else cache_dir() / "downloads"
    name = Path(urllib.parse.unquote(parsed.path)).name or "download"
    # Two URLs with the same basename must not collide.
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    dest = dest_dir / f"{key}-{name}"
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    log.info("downloading %s", url)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "facecorpus"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise AssetUnavailableError(f"{url}: download failed ({e})") from None
    if sha256 is not None and (got := sha256_file(tmp)) != sha256:
        tmp.unlink(missing_ok=True)
        raise AssetUnavailableError(f"{url}: sha256 {got} differs from expected {sha256}")
    os.replace(tmp, dest)
    return dest
