"""``verify``: check a dataset root end to end and report every problem found.

Checks, in order (a failure in one never stops the next):

- ``schema.json`` parses; the Zarr group has every field's array with the schema's dtype,
  per-sample shape, chunk and shard layout.
- Every manifest part: readable, has its commit record, the record's shard id and row count
  match the file name and the table, ``shard``/``row`` columns are ``s``/``0..n-1``, required
  columns present, ``sample_id`` unique (across the whole dataset too), path columns stay
  inside the root (every offending row is listed).
- Rejected parts: the row count matches the commit record; none without a committed shard.
- Data: each committed shard's rows of every field decode (per-chunk crc32c) and their sha256
  equals the stored checksum.
- No orphan data (shard files of uncommitted shards, left by an interrupted write), no leftover
  temp files, no unexpected files in ``manifest/`` or ``rejected/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from facecorpus.datasets.store import (
    _PART_RE,
    _TMP_PREFIX,
    MANIFEST_DIR,
    REJECTED_DIR,
    REQUIRED_COLUMNS,
    SHARD_META_KEY,
    FacecorpusError,
    ShardInfo,
    StoredDataset,
    _Root,
    check_relative_path,
    field_checksum,
    part_name,
    path_columns_of,
    read_schema,
)


@dataclass
class VerifyReport:
    """What verify found: ``problems`` empty means the dataset is sound."""

    root: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a defect
    n_shards: int = 0
    n_samples: int = 0
    n_rejected: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(root: str | os.PathLike, storage_options: dict | None = None,
                   check_data: bool = True) -> VerifyReport:
    """Check a dataset; see the module docstring for what is checked."""
    import pyarrow.parquet as pq

    r = _Root(root, storage_options)
    rep = VerifyReport(root=r.url)
    P = rep.problems.append

    def part_files(folder):
        """(name, shard) of each committed part in ``folder``; anything else is a problem."""
        for name in r.ls_names(folder):
            m = _PART_RE.match(name)
            if name.startswith(_TMP_PREFIX):
                P(f"{folder}/{name}: leftover temp file of an interrupted commit")
            elif not m:
                P(f"{folder}/{name}: unexpected file")
            else:
                yield name, int(m.group(1))

    try:
        schema = read_schema(r)
    except FacecorpusError as e:
        P(str(e))
        return rep
    sps = schema.samples_per_shard

    ds = None
    try:
        ds = StoredDataset(r.url, storage_options, load_manifest=False)
    except Exception as e:  # noqa: BLE001 - report, keep checking
        P(f"cannot open dataset: {e}")
    arrays_ok = set()
    for name, spec in schema.fields.items():
        try:
            a = ds.array(name) if ds is not None else None
        except Exception as e:  # noqa: BLE001
            P(f"field {name!r}: array missing or unreadable: {e}")
            continue
        if a is None:
            continue
        want_chunks = (schema.samples_per_shard, *spec.shape)
        if a.dtype != np.dtype(spec.dtype) or tuple(a.shape[1:]) != spec.shape:
            P(f"field {name!r}: array is {a.dtype}{tuple(a.shape[1:])}, schema says {spec.dtype}{spec.shape}")
        elif tuple(a.shards or a.chunks) != want_chunks:
            P(f"field {name!r}: shard shape {a.shards or a.chunks} != {want_chunks}")
        else:
            arrays_ok.add(name)

    # ---- manifest parts
    infos: dict[int, ShardInfo] = {}
    seen_ids: dict[str, int] = {}
    for name, s in part_files(MANIFEST_DIR):
        where = f"{MANIFEST_DIR}/{name}"
        try:
            with r.fs.open(r.join(MANIFEST_DIR, name), "rb") as f:
                t = pq.read_table(f)
        except Exception as e:  # noqa: BLE001
            P(f"{where}: unreadable Parquet: {e}")
            continue
        raw = (t.schema.metadata or {}).get(SHARD_META_KEY)
        try:
            info = ShardInfo.from_record(json.loads(raw))
        except Exception as e:  # noqa: BLE001
            P(f"{where}: missing or bad commit record ({e})")
            continue
        if info.shard != s:
            P(f"{where}: commit record says shard {info.shard}")
        if info.n_samples != t.num_rows:
            P(f"{where}: commit record says {info.n_samples} samples, table has {t.num_rows} rows")
        if t.num_rows > sps:
            P(f"{where}: {t.num_rows} rows > samples_per_shard={sps}")
        missing = [c for c in REQUIRED_COLUMNS if c not in t.column_names]
        if missing:
            P(f"{where}: required columns missing: {missing}")
        if "shard" in t.column_names and t.num_rows and not (t.column("shard").to_numpy(zero_copy_only=False) == s).all():
            P(f"{where}: column 'shard' is not {s} everywhere")
        if "row" in t.column_names and not np.array_equal(
                t.column("row").to_numpy(zero_copy_only=False), np.arange(t.num_rows)):
            P(f"{where}: column 'row' is not 0..{t.num_rows - 1}")
        if "sample_id" in t.column_names:
            for sid in t.column("sample_id").to_pylist():
                if sid in seen_ids:
                    P(f"{where}: sample_id {sid!r} duplicated (also in shard {seen_ids[sid]})")
                else:
                    seen_ids[sid] = s
        for col in path_columns_of(t, schema.path_columns):
            for i, v in enumerate(t.column(col).to_pylist()):
                try:
                    check_relative_path(v, column=col, row=i, where=f"{where}: ")
                except FacecorpusError as e:
                    P(str(e))
        missing_sums = set(schema.fields) - set(info.checksums)
        if missing_sums:
            P(f"{where}: no checksum for fields {sorted(missing_sums)}")
        infos[s] = info
        rep.n_samples += t.num_rows
    rep.n_shards = len(infos)

    # ---- rejected parts
    for name, s in part_files(REJECTED_DIR):
        if s not in infos:
            P(f"{REJECTED_DIR}/{name}: rejected rows of shard {s}, which is not committed")
            continue
        try:
            with r.fs.open(r.join(REJECTED_DIR, name), "rb") as f:
                n = pq.read_metadata(f).num_rows
        except Exception as e:  # noqa: BLE001
            P(f"{REJECTED_DIR}/{name}: unreadable Parquet: {e}")
            continue
        if n != infos[s].n_rejected:
            P(f"{REJECTED_DIR}/{name}: {n} rows, commit record says {infos[s].n_rejected}")
        rep.n_rejected += n
    for s, info in infos.items():
        if info.n_rejected and not r.exists(REJECTED_DIR, part_name(s)):
            P(f"{REJECTED_DIR}/{part_name(s)}: missing ({info.n_rejected} rejected rows recorded)")

    # ---- data
    if check_data and ds is not None:
        for s in sorted(infos):
            info = infos[s]
            for name in schema.fields:
                if name not in arrays_ok or name not in info.checksums:
                    continue
                try:
                    got = ds.read_rows(name, s, 0, info.n_samples)
                except Exception as e:  # noqa: BLE001
                    P(f"shard {s} field {name!r}: unreadable data: {e}")
                    continue
                if field_checksum(got) != info.checksums[name]:
                    P(f"shard {s} field {name!r}: sha256 of the stored data does not match the "
                      f"commit record (corrupted or missing chunk data)")

    # ---- provenance: shards made by different package versions, models or code
    made: dict[str, dict[str, list[int]]] = {}
    for s, info in infos.items():
        for k, v in (info.made_by or {}).items():
            made.setdefault(k, {}).setdefault(v, []).append(s)
    for k, groups in sorted(made.items()):
        if len(groups) > 1:
            rep.notes.append(f"shards made with different {k}: " + "; ".join(
                f"{v}: shards {sorted(ss)[:8]}{' ...' if len(ss) > 8 else ''}"
                for v, ss in sorted(groups.items())))

    # ---- orphans: shard files with no committed manifest part, temp and stray files
    for name, spec in schema.fields.items():
        base = r.join(name, "c")
        try:
            files = r.fs.find(base)
        except FileNotFoundError:
            files = []
        suffix = "/".join(["0"] * len(spec.shape))
        orphans = set()
        for f in files:
            rel = f[len(base.rstrip("/")) + 1:] if f.startswith(base.rstrip("/")) else f
            head, _, rest = rel.partition("/")
            if rel.rsplit("/", 1)[-1].startswith(_TMP_PREFIX):
                P(f"{name}/c/{rel}: leftover temp file of an interrupted write")
            elif not head.isdigit() or rest != suffix:
                P(f"{name}/c/{rel}: unexpected file")
            elif int(head) not in infos:
                orphans.add(int(head))
        for s in sorted(orphans):
            P(f"{name}/c/{s}: orphan data of uncommitted shard {s} (an interrupted write; "
              f"rerun the shard to commit it)")
    return rep
