"""Planning inputs: list them, check every listed row, hash what they bring.

A listing row that cannot be used (a null URI, landmarks of the wrong length, non-finite
landmarks) is a rejected row, never an exception; a URI listed twice is one input; two URIs
with the same bytes keep the first and reject the other as its duplicate. Every input's key
covers its bytes, its given landmarks, its mask's bytes and its subject id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from facecorpus.core import hashing
from facecorpus.core.errors import InputError, RejectedRow


@dataclass
class PlannedInput:
    """One input as planned: what the analyse stage reads and what its key covers."""

    source_uri: str
    sha256: str = ""  # "" when unreadable: ingest then rejects it with the real reason
    landmarks: list | None = None  # (68, 2) as nested lists, original-image pixels
    mask_uri: str | None = None
    mask_sha256: str = ""
    subject_id: str = ""
    group: str = ""  # the listing's ``group`` (same-group DR sampling downstream)
    duplicate_of: str | None = None  # a rejection decided at planning time
    listing_error: str | None = None  # the listing row itself was unusable

    def key_part(self) -> dict:
        return {"uri": self.source_uri, "sha256": self.sha256, "landmarks": self.landmarks,
                "mask": self.mask_sha256, "subject": self.subject_id,
                "dup": self.duplicate_of, "bad": self.listing_error,
                # only when set: listings without groups keep their keys
                **({"group": self.group} if self.group else {})}

    def rejection(self) -> RejectedRow | None:
        if self.listing_error:
            return RejectedRow(self.source_uri, "ingest", self.listing_error, "listing")
        if self.duplicate_of:
            return RejectedRow(self.source_uri, "ingest", self.duplicate_of, "duplicate")
        return None


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(base, uri)


def parquet_rows(path: str) -> list[PlannedInput]:
    """Every row of a Parquet listing, an unusable one with its ``listing_error``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - an unreadable listing names no inputs: the run cannot start
        raise InputError(f"{path}: not a readable Parquet table ({e})") from None
    col = "source_uri" if "source_uri" in table.column_names else "uri"
    if col not in table.column_names:
        raise InputError(f"{path}: needs a 'source_uri' or 'uri' column, has {table.column_names}")
    base = os.path.dirname(os.path.abspath(path))
    cols = table.to_pydict()
    n = table.num_rows
    lms = cols.get("landmarks", [None] * n)
    masks = cols.get("mask_uri", [None] * n)
    subjects = cols.get("subject_id", [""] * n)
    groups = cols.get("group", [""] * n)
    out = []
    for i in range(n):
        uri = cols[col][i]
        if uri is None or not str(uri).strip():
            out.append(PlannedInput(f"{path}#row={i}", listing_error=f"listing row {i}: no "
                                    f"{col}"))
            continue
        p = PlannedInput(_resolve(str(uri), base), subject_id=str(subjects[i] or ""),
                         group=str(groups[i] or ""))
        if masks[i]:
            p.mask_uri = _resolve(str(masks[i]), base)
        if lms[i] is not None:
            arr = np.asarray(lms[i], dtype=np.float64)
            if arr.size != 136:
                p.listing_error = f"listing row {i}: landmarks have {arr.size} values, need 136"
            elif not np.isfinite(arr).all():
                p.listing_error = f"listing row {i}: landmarks are not finite"
            else:
                p.landmarks = arr.astype(np.float32).reshape(68, 2).tolist()
        out.append(p)
    return out


def list_planned(spec: str | os.PathLike) -> list[PlannedInput]:
    """Inputs of a folder, glob, single file or ``.parquet`` listing (see
    :func:`facecorpus.tasks.ingest.list_inputs`), each URI once (first listing wins)."""
    from facecorpus.tasks.ingest import list_inputs

    s = os.fspath(spec)
    if s.endswith(".parquet"):
        rows = parquet_rows(s)
    else:
        rows = [PlannedInput(r.source_uri) for r in list_inputs(s)]
    seen, out = set(), []
    for r in rows:
        if r.source_uri in seen:  # listed twice: one input, not a duplicate of itself
            continue
        seen.add(r.source_uri)
        out.append(r)
    return out


def hash_inputs(inputs: list[PlannedInput]) -> list[PlannedInput]:
    """Fill ``sha256`` (and the mask's), mark content duplicates (first in order wins)."""
    first: dict[str, str] = {}
    for p in inputs:
        if p.listing_error:
            continue
        try:
            p.sha256 = hashing.file_sha256(p.source_uri)
        except Exception:  # noqa: BLE001 - unreadable: ingest rejects it with the real reason
            p.sha256 = ""
        if p.mask_uri:
            try:
                p.mask_sha256 = hashing.file_sha256(p.mask_uri)
            except Exception:  # noqa: BLE001
                p.mask_sha256 = "unreadable"
        if p.sha256:
            if p.sha256 in first:
                p.duplicate_of = f"duplicate of {first[p.sha256]} (sha256 {p.sha256[:12]})"
            else:
                first[p.sha256] = p.source_uri
    return inputs


def assign_shards(uris: list[str], known: dict[str, int], per_shard: int, *,
                  subjects: dict[str, str] | None = None) -> dict[str, int]:
    """Stable shard membership: an input keeps the shard it was in; removed inputs leave
    their shard (which is then recomputed without them); new inputs, in listing order, fill
    the last shard up to ``per_shard`` and then open new ones. So adding photos changes at
    most the last shard and adds new ones; it never moves a finished input.

    ``subjects`` (uri -> subject id, joint fitting on): a subject's photos share one shard.
    A new photo of a known subject joins that subject's shard (even past ``per_shard``); a
    new subject's photos move together, into the last shard if they fit, else a new one (a
    subject larger than ``per_shard`` gets a shard of its own, that large). Photos without a
    subject id fill shards as above."""
    if subjects:
        return _assign_by_subject(uris, known, per_shard, subjects)
    out = {u: known[u] for u in uris if u in known}
    sizes: dict[int, int] = {}
    for s in out.values():
        sizes[s] = sizes.get(s, 0) + 1
    last = max(list(known.values()) + [-1])
    fill = sizes.get(last, 0) if last >= 0 else per_shard
    for u in uris:
        if u in out:
            continue
        if last < 0 or fill >= per_shard:
            last += 1
            fill = 0
        out[u] = last
        fill += 1
    return out


def _assign_by_subject(uris, known, per_shard, subjects):
    out = {u: known[u] for u in uris if u in known}
    home = {subjects.get(u, ""): s for u, s in out.items() if subjects.get(u, "")}
    sizes: dict[int, int] = {}
    for s in out.values():
        sizes[s] = sizes.get(s, 0) + 1
    last = max(list(known.values()) + [-1])
    groups: dict[str, list[str]] = {}
    for u in uris:
        if u in out:
            continue
        sid = subjects.get(u, "")
        if sid and sid in home:
            out[u] = home[sid]
            sizes[home[sid]] = sizes.get(home[sid], 0) + 1
            continue
        groups.setdefault(sid or "\0" + u, []).append(u)  # no id: a group of one
    for members in groups.values():
        if last < 0 or sizes.get(last, 0) + len(members) > per_shard and sizes.get(last, 0):
            last += 1
        for u in members:
            out[u] = last
        sizes[last] = sizes.get(last, 0) + len(members)
    return out


def committed_membership(dataset_root: str) -> dict[str, int]:
    """source_uri -> shard of every input a dataset has committed (accepted or rejected)."""
    import fsspec
    from facecorpus.datasets.store import open_dataset

    fs, p = fsspec.core.url_to_fs(dataset_root)
    if not fs.exists(p.rstrip("/") + "/schema.json"):
        return {}
    ds = open_dataset(dataset_root)
    out = {}
    for t in (ds.manifest, ds.rejected):
        if t.num_rows:
            for u, s in zip(t.column("source_uri").to_pylist(), t.column("shard").to_pylist(),
                            strict=True):
                out[str(u)] = int(s)
    return out
