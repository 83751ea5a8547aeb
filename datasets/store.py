"""Sharded dataset store: one Zarr v3 array per field, a Parquet manifest in per-shard parts.

Layout of a dataset root (any fsspec URL: a local path, ``file://``, ``memory://``, ``s3://``
with s3fs installed, ``gs://`` with gcsfs)::

    ROOT/
      schema.json                      DatasetSchema (fields, dtypes, shapes, units, versions)
      zarr.json                        Zarr v3 group; one array per field
      <field>/zarr.json                array (capacity, *shape), chunk = samples_per_chunk samples,
      <field>/c/<shard>/0/...          sharding codec, one shard file = samples_per_shard samples
      rejected/shard-000012.parquet    rejected inputs of shard 12 (source_uri, stage, reason, ...)
      manifest/shard-000012.parquet    accepted samples of shard 12 + its commit record

Sample ``row`` of shard ``s`` lives at global index ``s * samples_per_shard + row`` of every
field array; a shard may hold fewer than ``samples_per_shard`` samples (the rest of its rows
are fill value and never listed). The first array dimension is a *capacity*
(``max_shards * samples_per_shard``), fixed when the dataset is created, so concurrent writers
never touch array metadata; the manifest, not the array shape, says which samples exist.

Commit protocol (one shard at a time, :meth:`DatasetWriter.write_shard`):

1. If the shard is committed with the same content key and checksums, return (no-op); with
   different content raise :class:`ShardConflictError` unless ``overwrite=True``, in which case
   the manifest part is removed first (the shard becomes invisible while it is rewritten).
2. Write the data: each field's shard file is encoded here in zarr's sharding format (rows
   past ``n`` are fill value) and written whole, with the same atomic put as the manifest;
   exactly one file per field is touched and stale rows of an earlier write vanish. (An array
   with another codec layout is written through zarr, as one whole-shard assignment.)
3. Write ``rejected/shard-N.parquet``, then ``manifest/shard-N.parquet`` LAST. The manifest part
   carries the commit record (content key, row count, sha256 of each field's raw bytes) in its
   Parquet key-value metadata under ``facecorpus.shard``. Local filesystems: written to a
   dot-prefixed temp file then renamed (atomic). Other filesystems (memory, object stores): one
   ``pipe`` of the complete bytes under the final name, written only after the data is
   complete; an object-store PUT is atomic, so the part is either absent or whole.

A shard is *committed* iff its manifest part exists. A writer killed anywhere before the rename
leaves data files with no manifest part: invisible to readers, reported by ``verify`` as an
orphan, and overwritten by a rerun of the same shard. Different processes (Dask workers) may
write different shards concurrently; two writers must never write the same shard at once.

Manifest columns always present: ``sample_id`` (str, unique), ``source_uri`` (str, provenance,
any URI), ``subject_id`` (str), ``group`` (str), ``yaw``/``pitch``/``roll`` (float32, degrees),
``shard`` (int32), ``row`` (int32), ``split`` (str); producers add more (metrics ...). The loaded
manifest also has ``index`` (int64, the global sample index). Columns listed in
``DatasetSchema.path_columns``, and every column whose name ends in ``_path``, hold
root-relative paths and are checked on write, on open and by verify:
absolute paths, ``..`` components and URLs are refused (:class:`PathEscapeError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from facecorpus.core.errors import FacecorpusError, InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SCHEMA_FILE = "schema.json"
MANIFEST_DIR = "manifest"
REJECTED_DIR = "rejected"
SHARD_META_KEY = b"facecorpus.shard"
_PART_RE = re.compile(r"^shard-(\d{6,})\.parquet$")
_TMP_PREFIX = "."

# name -> (pyarrow type name, default for a producer that omits it)
REQUIRED_COLUMNS: dict[str, tuple[str, Any]] = {
    "sample_id": ("string", None),
    "source_uri": ("string", ""),
    "subject_id": ("string", ""),
    "group": ("string", ""),
    "yaw": ("float32", float("nan")),
    "pitch": ("float32", float("nan")),
    "roll": ("float32", float("nan")),
    "shard": ("int32", None),
    "row": ("int32", None),
    "split": ("string", "train"),
}
REJECTED_COLUMNS = ("source_uri", "stage", "reason")


class StoreError(FacecorpusError):
    """The dataset store cannot do what was asked; the message names the root and the reason."""


class ShardConflictError(StoreError):
    """A committed shard would be replaced by different content without ``overwrite=True``."""


class PathEscapeError(InputError):
    """A manifest path column points outside the dataset root."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class FieldSpec:
    """One per-sample array: every sample of the field has ``shape`` and ``dtype``.

    Args:
        shape: per-sample shape, e.g. ``(128, 128, 3)`` for an HWC image.
        dtype: numpy dtype name (``"uint8"``, ``"float32"``, ...); stored little-endian.
        units: free text saying what a value means (``"srgb"``, ``"mm"``, ``"ncc*255"``).
        description: optional longer text.
    """

    shape: tuple[int, ...]
    dtype: str
    units: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if any(s <= 0 for s in self.shape):
            raise StoreError(f"field shape must be positive, got {self.shape}")


@dataclass
class DatasetSchema:
    """What a dataset holds; written once to ``ROOT/schema.json``.

    Args:
        fields: field name -> :class:`FieldSpec`.
        samples_per_shard: samples per shard (one shard file per field, one manifest part).
        samples_per_chunk: samples per compressed chunk inside a shard; must divide
            ``samples_per_shard``. Larger chunks read faster, smaller ones serve random
            access with less waste.
        producer: name of the producing flow (``"pseudo_gt"``, ``"synthesis"``, ...).
        config_hash: hash of the producing run config; reopening with another hash fails.
        attrs: free JSON metadata (not compared on reopen).
        path_columns: manifest columns holding root-relative paths (checked, never escape);
            columns named ``*_path`` are treated the same without being listed.
        compression: ``"zstd"`` or ``"blosc-lz4"``; ``compression_level`` its level.
        max_shards: capacity of the arrays in shards.
    """

    fields: dict[str, FieldSpec]
    samples_per_shard: int = 256
    samples_per_chunk: int = 8
    producer: str = ""
    config_hash: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    path_columns: tuple[str, ...] = ()
    compression: str = "zstd"
    compression_level: int = 3
    max_shards: int = 1 << 20
    format_version: int = FORMAT_VERSION
    package_version: str = ""

    def __post_init__(self) -> None:
        self.fields = {
            str(k): (v if isinstance(v, FieldSpec) else FieldSpec(**v)) for k, v in self.fields.items()
        }
        self.path_columns = tuple(self.path_columns)
        if not self.fields:
            raise StoreError("a dataset schema needs at least one field")
        for name in self.fields:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in (MANIFEST_DIR, REJECTED_DIR):
                raise StoreError(f"invalid field name {name!r}")
        if self.samples_per_shard <= 0 or self.samples_per_chunk <= 0:
            raise StoreError("samples_per_shard and samples_per_chunk must be positive")
        if self.samples_per_shard % self.samples_per_chunk:
            raise StoreError(
                f"samples_per_chunk={self.samples_per_chunk} must divide "
                f"samples_per_shard={self.samples_per_shard}"
            )
        if self.compression not in ("zstd", "blosc-lz4"):
            raise StoreError(f"compression must be 'zstd' or 'blosc-lz4', got {self.compression!r}")
        if not self.package_version:
            from facecorpus import __version__

            self.package_version = __version__

    def to_json(self) -> str:
        d = asdict(self)
        d["fields"] = {k: {**asdict(v), "shape": list(v.shape)} for k, v in self.fields.items()}
        d["path_columns"] = list(self.path_columns)
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetSchema:
        d = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def mismatches(self, other: DatasetSchema) -> list[str]:
        """Differences that make ``other`` unable to extend a dataset written with ``self``."""
        out = []
        for name in ("fields", "samples_per_shard", "samples_per_chunk", "producer", "config_hash",
                     "path_columns", "compression", "compression_level", "max_shards"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: stored {a!r} != requested {b!r}")
        return out


@dataclass(frozen=True)
class ShardInfo:
    """The commit record of one shard (stored in its manifest part's metadata).

    ``checksums[field]`` is the sha256 of the C-order bytes of the shard's ``(n, *shape)``
    array; ``written`` is False when :meth:`DatasetWriter.write_shard` was a no-op.
    """

    shard: int
    key: str
    n_samples: int
    n_rejected: int
    checksums: dict[str, str]
    written: bool = True

    made_by: dict[str, str] = field(default_factory=dict)  # package / model / code provenance

    def record(self) -> dict[str, Any]:
        return {"shard": self.shard, "key": self.key, "n_samples": self.n_samples,
                "n_rejected": self.n_rejected, "checksums": self.checksums,
                "format_version": FORMAT_VERSION, "made_by": self.made_by}

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(shard=int(d["shard"]), key=str(d["key"]), n_samples=int(d["n_samples"]),
                   n_rejected=int(d["n_rejected"]), checksums=dict(d["checksums"]), written=False,
                   made_by=dict(d.get("made_by") or {}))


# --------------------------------------------------------------------------- helpers


def field_checksum(a: np.ndarray) -> str:
    """sha256 hex of an array's C-order bytes (what verify recomputes from the store)."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def part_name(shard: int) -> str:
    return f"shard-{shard:06d}.parquet"


def check_relative_path(value: Any, *, column: str, row: int | str, where: str = "") -> None:
    """Raise :class:`PathEscapeError` unless ``value`` is a root-relative path staying inside.

    Refused: absolute paths (``/x``, ``C:\\x``, ``\\\\host``, ``~``), URLs with any scheme
    (``s3://``, ``file:``), any ``..`` component (``/`` or ``\\`` separated), and the escape
    tricks that become ``..`` or a separator after some later decoding step: percent-encoding
    (``%2e%2e/x``, ``%2F``; stored paths are plain, never URL-encoded), control characters,
    components that Unicode NFKC folds to dots (``\uff0e\uff0e``, the one-dot leader) and dot
    components with trailing spaces or dots (``.. ``, ``...``: Windows strips those).
    Empty values are allowed (no asset).
    """
    if value is None or value == "":
        return
    s = str(value)
    reason = None
    folded = unicodedata.normalize("NFKC", s)
    if re.search(r"[\x00-\x1f\x7f]", s):
        reason = "contains a control character"
    elif re.search(r"%[0-9A-Fa-f]{2}", s):
        reason = "is percent-encoded (manifest paths are stored decoded)"
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", folded):
        reason = "is a URL or drive path, expected a path relative to the dataset root"
    elif folded.startswith(("/", "\\", "~")):
        reason = "is absolute, expected a path relative to the dataset root"
    elif any(c.strip(". ") == "" and c.count(".") >= 2 for c in re.split(r"[\\/]+", folded)):
        reason = "has a '..' component that escapes the dataset root"
    if reason:
        raise PathEscapeError(f"{where}row {row}, column {column!r}: path {s!r} {reason}")


def _pa():
    import pyarrow as pa

    return pa


def _to_table(rows: Any, what: str):
    pa = _pa()
    if rows is None:
        return pa.table({})
    if isinstance(rows, pa.Table):
        return rows
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas, without importing it
        return pa.Table.from_pandas(rows, preserve_index=False)
    rows = list(rows)
    if not rows:
        return pa.table({})
    try:
        return pa.Table.from_pylist([dict(r) for r in rows])
    except (TypeError, ValueError, pa.ArrowException) as e:
        raise StoreError(f"{what}: rows cannot form a table: {e}") from e


# --------------------------------------------------------------------------- filesystem


class _Root:
    """An fsspec filesystem + path for a dataset root; picklable, opened lazily."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._path = None

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options, "_fs": None, "_path": None}

    def _open(self):
        from fsspec.core import url_to_fs

        opts = dict(self.storage_options)
        if not self.url.startswith(("file:", "/", ".", "memory:")) and "://" in self.url:
            # Other processes (Dask workers, a resumed run) commit shards behind this one's
            # back: a cached listing would hide their manifest parts (s3fs answers "absent"
            # from a stale parent listing), so object-store listings are never cached.
            opts.setdefault("use_listings_cache", False)
        fs, path = url_to_fs(self.url, **opts)
        self._fs, self._path = fs, path.rstrip("/") or "/"

    @property
    def fs(self):
        if self._fs is None:
            self._open()
        return self._fs

    @property
    def path(self) -> str:
        if self._path is None:
            self._open()
        return self._path

    @property
    def is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.join(*parts))

    def cat(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.join(*parts))

    def ls_names(self, *parts: str) -> list[str]:
        p = self.join(*parts)
        try:
            entries = self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def rm(self, *parts: str) -> None:
        try:
            self.fs.rm_file(self.join(*parts))
        except FileNotFoundError:
            pass

    def put_atomic(self, data: bytes, *parts: str) -> None:
        """Make ``parts`` appear with exactly ``data`` or not at all (see module docstring)."""
        final = self.join(*parts)
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{parent}/{_TMP_PREFIX}{final.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(final, data)

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                    read_only=read_only)


def _codecs(schema: DatasetSchema):
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if schema.compression == "zstd":
        comp = ZstdCodec(level=schema.compression_level)
    else:
        comp = BloscCodec(cname="lz4", clevel=schema.compression_level, shuffle="noshuffle")
    # crc32c per chunk: a flipped byte is a clear checksum error at read time, not garbage.
    return [comp, Crc32cCodec()]


def _write_part(root: _Root, table, subdir: str, shard: int, meta: dict | None = None) -> None:
    import pyarrow.parquet as pq

    if meta is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), SHARD_META_KEY: json.dumps(meta).encode()}
        )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    root.put_atomic(buf.getvalue(), subdir, part_name(shard))


def _read_part_info(root: _Root, shard: int) -> ShardInfo | None:
    import pyarrow.parquet as pq

    p = root.join(MANIFEST_DIR, part_name(shard))
    try:
        with root.fs.open(p, "rb") as f:
            md = pq.read_schema(f).metadata or {}
    except FileNotFoundError:
        return None
    raw = md.get(SHARD_META_KEY)
    if raw is None:
        raise StoreError(f"{root.url}: manifest part {p} has no commit record")
    return ShardInfo.from_record(json.loads(raw))


def _committed_ids(root: _Root) -> list[int]:
    out = []
    for name in root.ls_names(MANIFEST_DIR):
        m = _PART_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def read_schema(root: str | os.PathLike | _Root, storage_options: dict | None = None) -> DatasetSchema:
    r = root if isinstance(root, _Root) else _Root(root, storage_options)
    try:
        return DatasetSchema.from_json(r.cat(SCHEMA_FILE))
    except FileNotFoundError:
        raise StoreError(f"{r.url}: not a facecorpus dataset ({SCHEMA_FILE} missing)") from None
    except (ValueError, TypeError) as e:
        raise StoreError(f"{r.url}/{SCHEMA_FILE}: unreadable schema: {e}") from e


# --------------------------------------------------------------------------- writer


class DatasetWriter:
    """Creates or reopens a dataset and commits whole shards.

    Picklable (holds only the URL and schema), so one writer made in the driver can be shipped
    to Dask workers; create it in the driver first so the arrays exist before workers write.

    Args:
        root: dataset root URL or path.
        schema: what the dataset holds; must match a stored schema (see
            :meth:`DatasetSchema.mismatches`).
        storage_options: passed to fsspec.
    """

    def __init__(self, root: str | os.PathLike, schema: DatasetSchema,
                 storage_options: dict | None = None):
        self.root = _Root(root, storage_options)
        self.schema = schema
        self._arrays: dict[str, Any] = {}
        self._encoders: dict[str, Any] = {}
        self._pid = os.getpid()
        self._create_or_check()

    def __getstate__(self):
        return {"root": self.root, "schema": self.schema, "_arrays": {}, "_encoders": {}, "_pid": None}

    @property
    def url(self) -> str:
        return self.root.url

    def _create_or_check(self) -> None:
        import zarr

        r = self.root
        if r.exists(SCHEMA_FILE):
            stored = read_schema(r)
            bad = stored.mismatches(self.schema)
            if bad:
                raise StoreError(f"{r.url}: schema does not match the stored one: " + "; ".join(bad))
            self.schema = stored
        group = zarr.open_group(r.zarr_store(), mode="a",
                                attributes={"facecorpus_format_version": FORMAT_VERSION})
        s = self.schema
        for name, spec in s.fields.items():
            if r.exists(name, "zarr.json"):
                continue
            try:
                group.create_array(
                    name, shape=(s.max_shards * s.samples_per_shard, *spec.shape), dtype=spec.dtype,
                    chunks=(s.samples_per_chunk, *spec.shape), shards=(s.samples_per_shard, *spec.shape),
                    compressors=_codecs(s), fill_value=0,
                    # named dimensions: xarray (xr.open_zarr) needs them on Zarr v3 arrays;
                    # "sample" is shared, so the fields line up as one xarray Dataset
                    dimension_names=("sample", *(f"{name}_{k}" for k in range(1, 1 + len(spec.shape)))),
                    attributes={"units": spec.units, "description": spec.description},
                )
            except Exception:  # a concurrent creator won the race: accept it (checked below)
                if not r.exists(name, "zarr.json"):
                    raise
        if not r.exists(SCHEMA_FILE):
            r.put_atomic(self.schema.to_json().encode(), SCHEMA_FILE)

    def _array(self, name: str):
        if self._pid != os.getpid():  # forked or unpickled: zarr handles are per process
            self._arrays, self._pid = {}, os.getpid()
        a = self._arrays.get(name)
        if a is None:
            import zarr

            a = zarr.open_array(self.root.zarr_store(), path=name, mode="r+")
            self._arrays[name] = a
        return a

    # -- queries
    def committed_shards(self) -> dict[int, str]:
        """Shard id -> content key, for every committed shard."""
        out = {}
        for s in _committed_ids(self.root):
            info = _read_part_info(self.root, s)
            if info is not None:
                out[s] = info.key
        return out

    def shard_info(self, shard_id: int) -> ShardInfo | None:
        return _read_part_info(self.root, shard_id)

    def is_committed(self, shard_id: int, key: str | None = None) -> bool:
        """True if the shard is committed (and, when ``key`` is given, with that content key)."""
        info = _read_part_info(self.root, shard_id)
        return info is not None and (key is None or info.key == key)

    # -- validation
    def _check_arrays(self, shard_id: int, arrays: Mapping[str, np.ndarray]) -> tuple[dict, int]:
        s = self.schema
        where = f"{self.url}: shard {shard_id}"
        missing = set(s.fields) - set(arrays)
        extra = set(arrays) - set(s.fields)
        if missing or extra:
            raise StoreError(f"{where}: fields {sorted(arrays)} != schema fields {sorted(s.fields)}")
        out, n = {}, None
        for name, spec in s.fields.items():
            a = np.asarray(arrays[name])
            if a.shape[1:] != spec.shape:
                raise StoreError(f"{where}: field {name!r} has per-sample shape {a.shape[1:]}, "
                                 f"schema says {spec.shape}")
            if a.dtype != np.dtype(spec.dtype):
                if not np.can_cast(a.dtype, spec.dtype, casting="safe"):
                    raise StoreError(f"{where}: field {name!r} dtype {a.dtype} cannot be stored "
                                     f"losslessly as {spec.dtype}")
                a = a.astype(spec.dtype)
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise StoreError(f"{where}: field {name!r} has {a.shape[0]} samples, others {n}")
            out[name] = np.ascontiguousarray(a)
        if n > s.samples_per_shard:
            raise StoreError(f"{where}: {n} samples > samples_per_shard={s.samples_per_shard}")
        return out, int(n)

    def _manifest_table(self, shard_id: int, manifest: Any, n: int):
        pa = _pa()
        where = f"{self.url}: shard {shard_id} manifest"
        t = _to_table(manifest, where)
        if t.num_rows != n:
            raise StoreError(f"{where}: {t.num_rows} rows for {n} samples")
        if n == 0:
            t = pa.table({c: pa.array([], type=getattr(pa, ty)()) for c, (ty, _) in REQUIRED_COLUMNS.items()})
        for col, (ty, default) in REQUIRED_COLUMNS.items():
            typ = getattr(pa, ty)()
            if col == "shard":
                arr = pa.array(np.full(n, shard_id, np.int32))
            elif col == "row":
                arr = pa.array(np.arange(n, dtype=np.int32))
            elif col in t.column_names:
                try:
                    arr = t.column(col).cast(typ)
                except pa.ArrowException as e:
                    raise StoreError(f"{where}: column {col!r} is not {ty}: {e}") from e
            elif default is None:
                raise StoreError(f"{where}: required column {col!r} missing")
            else:
                arr = pa.array([default] * n, type=typ)
            if col in ("shard", "row") and col in t.column_names:
                given = t.column(col).to_numpy(zero_copy_only=False)
                if not np.array_equal(given, arr.to_numpy()):
                    raise StoreError(f"{where}: column {col!r} disagrees with the shard layout")
            if col in t.column_names:
                t = t.set_column(t.column_names.index(col), col, arr)
            else:
                t = t.append_column(col, arr)
        if "index" in t.column_names:
            t = t.drop_columns(["index"])  # derived on open, never stored
        extra = [c for c in t.column_names if c not in REQUIRED_COLUMNS]
        t = t.select(list(REQUIRED_COLUMNS) + extra)
        ids = t.column("sample_id")
        if ids.null_count:
            raise StoreError(f"{where}: sample_id has nulls")
        if len(set(ids.to_pylist())) != n:
            raise StoreError(f"{where}: sample_id values are not unique")
        check_path_columns(t, self.schema.path_columns, where=f"{where}: ")
        return t

    def _rejected_table(self, shard_id: int, rejected: Any):
        pa = _pa()
        t = _to_table(rejected, f"{self.url}: shard {shard_id} rejected")
        n = t.num_rows
        for col in REJECTED_COLUMNS:
            if col not in t.column_names:
                t = t.append_column(col, pa.array([""] * n, type=pa.string()))
            else:
                t = t.set_column(t.column_names.index(col), col, t.column(col).cast(pa.string()))
        shard = pa.array(np.full(n, shard_id, np.int32))
        if "shard" in t.column_names:
            t = t.set_column(t.column_names.index("shard"), "shard", shard)
        else:
            t = t.append_column("shard", shard)
        return t

    # -- the write
    def write_shard(self, shard_id: int, arrays: Mapping[str, np.ndarray], manifest: Any,
                    key: str = "", rejected: Any = None, overwrite: bool = False,
                    made_by: Mapping[str, str] | None = None) -> ShardInfo:
        """Commit one whole shard: data first, rejected part, manifest part last.

        Args:
            shard_id: ``0 <= shard_id < max_shards``; callers own disjoint shard ids.
            arrays: field -> ``(n, *shape)`` array, ``n <= samples_per_shard`` (``n`` may be 0
                when every input of the shard was rejected).
            manifest: ``n`` rows (list of dicts, a pyarrow Table or a pandas DataFrame) with
                at least ``sample_id``; ``shard``/``row`` are filled in; other required
                columns default to ``""``/NaN/``"train"``.
            key: content key of the inputs + config (e.g. a hash); compared on rewrite.
            rejected: rows ``{"source_uri", "stage", "reason", ...}`` committed with the shard.
            overwrite: replace a committed shard whose content differs.
            made_by: provenance kept in the commit record (package version, model hash, code
                digest); ``verify`` reports a dataset whose shards disagree on it.

        Returns:
            The commit record; ``written`` is False if the identical shard was already there.
        """
        s = self.schema
        if not (0 <= int(shard_id) < s.max_shards):
            raise StoreError(f"{self.url}: shard id {shard_id} outside [0, {s.max_shards})")
        shard_id = int(shard_id)
        data, n = self._check_arrays(shard_id, arrays)
        table = self._manifest_table(shard_id, manifest, n)
        rej = self._rejected_table(shard_id, rejected)
        sums = {name: field_checksum(a) for name, a in data.items()}
        info = ShardInfo(shard=shard_id, key=str(key), n_samples=n, n_rejected=rej.num_rows,
                         checksums=sums, made_by={k: str(v) for k, v in (made_by or {}).items()})
        old = _read_part_info(self.root, shard_id)
        if old is not None:
            if old.key == info.key and old.checksums == sums and old.n_samples == n:
                return old
            if not overwrite:
                raise ShardConflictError(
                    f"{self.url}: shard {shard_id} is committed with different content "
                    f"(key {old.key!r} -> {info.key!r}); pass overwrite=True to replace it"
                )
            # Uncommit first: readers must never see the old manifest over new data.
            self.root.rm(MANIFEST_DIR, part_name(shard_id))
        self._clean_tmp(shard_id)
        for name, a in data.items():
            if n < s.samples_per_shard:
                # Pad to the whole shard: one full-shard write replaces the shard file (no
                # read-modify-write) and leaves no stale rows from an earlier, longer write.
                full = np.zeros((s.samples_per_shard, *a.shape[1:]), a.dtype)
                full[:n] = a
                a = full
            self._write_field_shard(name, shard_id, a)
        self._before_commit(shard_id)
        _write_part(self.root, rej, REJECTED_DIR, shard_id)
        _write_part(self.root, table, MANIFEST_DIR, shard_id, meta=info.record())
        return info

    def _write_field_shard(self, name: str, shard_id: int, a: np.ndarray) -> None:
        """Replace one field's shard file with ``a`` (``(samples_per_shard, *shape)``).

        Encodes the shard file directly and writes it with :meth:`_Root.put_atomic` (so even a
        data file is never half-written) when the array has our codec layout; else zarr."""
        if self._encoders.get(name) is None:
            layout = _codec_layout(self._array(name).metadata, self.schema, name)
            self._encoders[name] = layout or False
        layout = self._encoders[name]
        if layout is False:
            lo = shard_id * self.schema.samples_per_shard
            self._array(name)[lo:lo + self.schema.samples_per_shard] = a
            return
        blob = encode_shard(a, self.schema.samples_per_chunk, *layout)
        parts = _shard_key(name, shard_id, len(self.schema.fields[name].shape))
        if blob is None:
            self.root.rm(*parts)
        else:
            self.root.put_atomic(blob, *parts)

    def _before_commit(self, shard_id: int) -> None:
        """Hook between data and manifest (tests kill the process here)."""

    def _clean_tmp(self, shard_id: int) -> None:
        """Remove temp files an interrupted earlier write of this shard left behind."""
        if not self.root.is_local:
            return
        stem = _TMP_PREFIX + part_name(shard_id)
        for sub in (MANIFEST_DIR, REJECTED_DIR):
            for name in self.root.ls_names(sub):
                if name.startswith(stem) and name.endswith(".tmp"):
                    self.root.rm(sub, name)
        for field_name, spec in self.schema.fields.items():
            parent = _shard_key(field_name, shard_id, len(spec.shape))[:-1]
            for name in self.root.ls_names(*parent):
                if name.startswith(_TMP_PREFIX) and name.endswith(".tmp"):
                    self.root.rm(*parent, name)


def _shard_key(name: str, shard: int, ndim: int) -> tuple[str, ...]:
    """Path parts of a field's shard file (zarr v3 default chunk keys, '/' separator)."""
    return (name, "c", str(shard), *["0"] * ndim)


def path_columns_of(table, declared: Sequence[str]) -> list[str]:
    """The columns of ``table`` that hold root-relative paths: declared ones + ``*_path``."""
    return [c for c in table.column_names if c in declared or c.endswith("_path")]


def check_path_columns(table, columns: Sequence[str], where: str = "") -> None:
    """Raise :class:`PathEscapeError` naming the first row/column whose path escapes the root.

    ``columns`` are the declared path columns; ``*_path`` columns are checked too."""
    for col in path_columns_of(table, columns):
        if col not in table.column_names:
            continue
        rows = table.column("sample_id").to_pylist() if "sample_id" in table.column_names else None
        for i, v in enumerate(table.column(col).to_pylist()):
            check_relative_path(v, column=col, row=f"{i}" + (f" (sample_id {rows[i]!r})" if rows else ""),
                                where=where)


# --------------------------------------------------------------------------- reading


class StoredDataset:
    """A committed dataset opened for reading (see :func:`open_dataset`).

    Attributes:
        schema: the :class:`DatasetSchema`.
        manifest: pyarrow Table, one row per committed sample, sorted by ``index``
            (``shard * samples_per_shard + row``, int64).
        rejected: pyarrow Table of rejected inputs of the committed shards.
        shards: shard id -> :class:`ShardInfo` of every committed shard.

    Picklable and fork-safe: zarr handles are opened lazily in each process.

    Args:
        verify_checksums: check each field's shard against its committed sha256 the first
            time this process reads it (the whole shard is decoded once for that); a mismatch
            raises :class:`StoreError`. Off by default: per-chunk crc32c already catches
            corrupted bytes; this also catches wrong-but-decodable data (docs/benchmarks.md
            gives the cost).
        cache_dir, cache_max_bytes: for a remote root, keep whole shard files in this local
            folder (see :class:`facecorpus.datasets.cache.ShardCache`), least recently used
            out first beyond ``cache_max_bytes``; ignored for local roots.
    """

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None,
                 check_paths: bool = True, load_manifest: bool = True,
                 verify_checksums: bool = False, cache_dir: str | os.PathLike | None = None,
                 cache_max_bytes: int = 10 * 2**30):
        self.root = _Root(root, storage_options)
        self.schema = read_schema(self.root)
        self._arrays: dict[str, Any] = {}
        self._fast: dict[str, Any] = {}
        self._pid = os.getpid()
        self.verify_checksums = bool(verify_checksums)
        self._verified: set[tuple[str, int]] = set()
        self.cache = None
        if cache_dir is not None and not self.root.is_local:
            from facecorpus.datasets.cache import ShardCache

            self.cache = ShardCache(cache_dir, cache_max_bytes)
        self.shards: dict[int, ShardInfo] = {}
        if load_manifest:  # verify reads parts one by one itself, tolerating bad ones
            self._load(check_paths)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"], d["_fast"], d["_pid"], d["_verified"] = {}, {}, None, set()
        return d

    @property
    def url(self) -> str:
        return self.root.url

    def _load(self, check_paths: bool) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        parts, rejs, self.shards = [], [], {}
        ids = _committed_ids(self.root)
        # one batched fetch: concurrent on object stores (s3fs/gcsfs are async)
        man_paths = [self.root.join(MANIFEST_DIR, part_name(s)) for s in ids]
        rej_paths = [self.root.join(REJECTED_DIR, part_name(s)) for s in ids]
        blobs = self.root.fs.cat(man_paths + rej_paths, on_error="omit") if ids else {}
        norm = {k.rstrip("/").split("://")[-1]: v for k, v in blobs.items()}

        def blob(path):
            return norm.get(path.rstrip("/").split("://")[-1])

        for s, mp, rp in zip(ids, man_paths, rej_paths, strict=True):
            b = blob(mp)
            if b is None:  # removed between listing and reading (an overwrite in progress)
                continue
            try:
                t = pq.read_table(pa.BufferReader(b))
            except pa.ArrowException as e:
                raise StoreError(f"{self.url}: manifest part {part_name(s)} unreadable: {e}") from e
            raw = (t.schema.metadata or {}).get(SHARD_META_KEY)
            if raw is None:
                raise StoreError(f"{self.url}: manifest part {part_name(s)} has no commit record")
            self.shards[s] = ShardInfo.from_record(json.loads(raw))
            parts.append(t.replace_schema_metadata(None))
            rb = blob(rp)
            if rb is not None:
                rejs.append(pq.read_table(pa.BufferReader(rb)).replace_schema_metadata(None))
        if parts:
            try:
                m = pa.concat_tables(parts, promote_options="permissive")
            except pa.ArrowException as e:
                raise StoreError(f"{self.url}: manifest parts have incompatible columns: {e}") from e
        else:
            m = pa.table({c: pa.array([], type=getattr(pa, ty)()) for c, (ty, _) in REQUIRED_COLUMNS.items()})
        idx = pc.add(pc.multiply(m.column("shard").cast(pa.int64()), self.schema.samples_per_shard),
                     m.column("row").cast(pa.int64()))
        m = m.append_column("index", idx)
        self.manifest = m.sort_by("index")
        self.rejected = (pa.concat_tables(rejs, promote_options="permissive") if rejs
                         else pa.table({c: pa.array([], pa.string()) for c in REJECTED_COLUMNS}))
        if check_paths:
            check_path_columns(self.manifest, self.schema.path_columns, where=f"{self.url}: manifest ")

    def __len__(self) -> int:
        return self.manifest.num_rows

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return self.schema.fields

    def select(self, filter: Any = None):
        """The manifest rows matching a pyarrow compute expression (all rows if None)."""
        return self.manifest if filter is None else self.manifest.filter(filter)

    def resolve(self, relative: str, column: str = "path") -> str:
        """URL of a root-relative path from a path column, refusing escapes."""
        check_relative_path(relative, column=column, row="?", where=f"{self.url}: ")
        return self.root.join(relative)

    def array(self, name: str):
        """The zarr array of a field (opened lazily, per process, read-only)."""
        if name not in self.schema.fields:
            raise StoreError(f"{self.url}: no field {name!r} (fields: {sorted(self.schema.fields)})")
        if self._pid != os.getpid():
            self._arrays, self._fast, self._pid, self._verified = {}, {}, os.getpid(), set()
        a = self._arrays.get(name)
        if a is None:
            import zarr

            a = zarr.open_array(self.root.zarr_store(read_only=True), path=name, mode="r")
            self._arrays[name] = a
        return a

    def _fast_reader(self, name: str) -> _FastShardReader | bool:
        fast = self._fast.get(name) if self._pid == os.getpid() else None
        if fast is None:
            self.array(name)  # resets per-process state after a fork
            fast = self._fast[name] = _FastShardReader.for_array(self, name)
        return fast

    def read_rows(self, name: str, shard: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one shard of a field: ``(stop - start, *shape)``.

        Decodes the shard file directly (one read, chunk by chunk into the output) when the
        array uses the codec layout this module writes, which is several times faster than
        zarr's generic pipeline; otherwise falls back to zarr. Both give identical bytes.
        """
        full = self._first_read_verified(name, shard)
        if full is not None:
            return full[start:stop]
        return self._read_rows(name, shard, start, stop)

    def _read_rows(self, name: str, shard: int, start: int, stop: int) -> np.ndarray:
        fast = self._fast_reader(name)
        if fast is not False:
            return fast.read(shard, start, stop)
        base = shard * self.schema.samples_per_shard
        return self.array(name)[base + start: base + stop]

    def read_rows_into(self, name: str, shard: int, rows: np.ndarray, out: np.ndarray,
                       slots: np.ndarray) -> None:
        """Rows ``rows`` (ascending) of one shard of a field written to ``out[slots]``.

        The streaming reader's shuffle buffer is filled this way: each chunk is decoded into
        a small buffer and scattered from the CPU cache, instead of decoding the whole run
        into a fresh array and copying that (one pass over memory less per sample)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        full = self._first_read_verified(name, shard)
        if full is not None:
            out[slots] = full[rows]
            return
        fast = self._fast_reader(name)
        if fast is not False:
            fast.read_at(shard, rows, out, slots)
            return
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        out[slots] = self._read_rows(name, shard, lo, hi)[rows - lo]

    def _first_read_verified(self, name: str, shard: int) -> np.ndarray | None:
        """With ``verify_checksums``, on this process's first read of a field's shard: the
        whole shard's rows, checked against the commit record; else None."""
        if not self.verify_checksums or (name, shard) in self._verified:
            return None
        info = self.shards.get(shard)
        if info is None or name not in info.checksums:
            return None
        full = self._read_rows(name, shard, 0, info.n_samples)
        if field_checksum(full) != info.checksums[name]:
            raise StoreError(f"{self.url}: field {name!r} shard {shard}: sha256 of the stored data "
                             f"does not match its commit record (corrupted or replaced data; run "
                             f"`facecorpus data verify`)")
        self._verified.add((name, shard))
        return full

    def read_shard(self, shard: int, fields: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Every committed sample of a shard: field -> ``(n, *shape)``."""
        info = self.shards.get(shard)
        if info is None:
            raise StoreError(f"{self.url}: shard {shard} is not committed")
        return {f: self.read_rows(f, shard, 0, info.n_samples)
                for f in (fields or self.schema.fields)}

    def read(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Samples by global index (manifest column ``index``): ``(len(indices), *shape)``.

        Reads each shard's needed row run once, in index order, then scatters.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        spec = self.schema.fields.get(name)
        if spec is None:
            raise StoreError(f"{self.url}: no field {name!r} (fields: {sorted(self.schema.fields)})")
        out = np.empty((idx.size, *spec.shape), spec.dtype)
        if idx.size == 0:
            return out
        sps = self.schema.samples_per_shard
        shard, row = np.divmod(idx, sps)
        order = np.argsort(idx, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for grp in np.split(order, bounds):
            s = int(shard[grp[0]])
            info = self.shards.get(s)
            rows = row[grp]
            if info is None or rows.max() >= info.n_samples or rows.min() < 0:
                raise StoreError(f"{self.url}: index {int(idx[grp[0]])} (shard {s}) is not a committed sample")
            full = self._first_read_verified(name, s)
            if full is not None:
                out[grp] = full[rows]
                continue
            fast = self._fast_reader(name)
            if fast is not False:
                out[grp] = fast.read_at(s, rows)
                continue
            # rows are ascending; read runs of chunks, skipping gaps of more than one chunk
            chunk = rows // self.schema.samples_per_chunk
            for sub in np.split(np.arange(rows.size), np.flatnonzero(np.diff(chunk) > 1) + 1):
                r = rows[sub]
                lo, hi = int(r[0]), int(r[-1]) + 1
                out[grp[sub]] = self.read_rows(name, s, lo, hi)[r - lo]
        return out


def _codec_layout(md: Any, s: DatasetSchema, name: str) -> tuple[Any, bool] | None:
    """(numcodecs compressor, has per-chunk crc32c) if a field's zarr metadata is the layout
    this module writes (see :class:`_FastShardReader`), else None."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    try:
        (sh,) = md.codecs
        enc = md.chunk_key_encoding
        ok = (isinstance(sh, ShardingCodec)
              and tuple(sh.chunk_shape) == (s.samples_per_chunk, *s.fields[name].shape)
              and tuple(md.chunk_grid.chunk_shape) == (s.samples_per_shard, *s.fields[name].shape)
              and sh.index_location.value == "end"
              and [type(c) for c in sh.index_codecs] == [BytesCodec, Crc32cCodec]
              and isinstance(sh.codecs[0], BytesCodec)
              and getattr(sh.codecs[0].endian, "value", "little") == "little"
              and getattr(enc, "name", "") == "default" and getattr(enc, "separator", "") == "/")
        inner = list(sh.codecs[1:])
    except (ValueError, AttributeError, TypeError):
        return None
    if not ok or md.fill_value != 0:
        return None
    has_crc = bool(inner) and isinstance(inner[-1], Crc32cCodec)
    if has_crc:
        inner = inner[:-1]
    if len(inner) != 1:
        return None
    c = inner[0]
    import numcodecs

    if isinstance(c, ZstdCodec):
        return numcodecs.Zstd(level=c.level, checksum=bool(c.checksum)), has_crc
    if isinstance(c, BloscCodec) and c.shuffle.value == "noshuffle":
        return numcodecs.Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=numcodecs.Blosc.NOSHUFFLE,
                               blocksize=c.blocksize), has_crc
    return None


def encode_shard(a: np.ndarray, samples_per_chunk: int, codec: Any, has_crc: bool) -> bytes | None:
    """One shard file's bytes for ``a`` (``(samples_per_shard, *shape)``), in the layout
    :class:`_FastShardReader` documents; chunks whose bytes are all zero (the fill value) are
    not stored, as zarr does; None if every chunk is. Byte-level emptiness keeps ``-0.0``."""
    import google_crc32c

    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    n_chunks = a.shape[0] // samples_per_chunk
    flat = a.reshape(n_chunks, -1).view(np.uint8)
    index = np.full((n_chunks, 2), 2**64 - 1, "<u8")
    parts, off = [], 0
    for c in range(n_chunks):
        raw = flat[c]
        if not raw.any():
            continue
        comp = bytes(codec.encode(raw))
        if has_crc:
            comp += np.uint32(google_crc32c.value(comp)).astype("<u4").tobytes()
        index[c] = (off, len(comp))
        parts.append(comp)
        off += len(comp)
    if not parts:
        return None
    ib = index.tobytes()
    parts.append(ib + np.uint32(google_crc32c.value(ib)).astype("<u4").tobytes())
    return b"".join(parts)


class _FastShardReader:
    """Reads rows of one field straight from its shard files.

    Shard file layout (zarr v3 ``sharding_indexed``, index at the end): the compressed chunks,
    then ``chunks_per_shard`` pairs of little-endian uint64 ``(offset, nbytes)`` (``2**64-1``
    twice for an empty chunk, i.e. all fill value), then the index's crc32c. Each chunk is
    ``crc32c(compress(raw little-endian bytes))``: compressed bytes + 4 checksum bytes.
    """

    EMPTY = np.uint64(2**64 - 1)

    def __init__(self, ds: StoredDataset, name: str, codec: Any, has_crc: bool):
        self.ds, self.name, self.codec, self.has_crc = ds, name, codec, has_crc
        spec = ds.schema.fields[name]
        self.shape = spec.shape
        self.dtype = np.dtype(spec.dtype).newbyteorder("<")
        self.spc = ds.schema.samples_per_chunk
        self.n_chunks = ds.schema.samples_per_shard // self.spc
        self.index_nbytes = 16 * self.n_chunks + 4

    @classmethod
    def for_array(cls, ds: StoredDataset, name: str) -> _FastShardReader | bool:
        """A reader if the array's codecs are the ones we write, else False (use zarr)."""
        layout = _codec_layout(ds.array(name).metadata, ds.schema, name)
        return False if layout is None else cls(ds, name, *layout)

    def _path(self, shard: int) -> str:
        return self.ds.root.join(*_shard_key(self.name, shard, len(self.shape)))

    def _cached(self, shard: int) -> bytes | None:
        """The whole shard file through the dataset's local cache; None without a cache.
        Raises FileNotFoundError for a shard file that does not exist (all fill value)."""
        cache, info = self.ds.cache, self.ds.shards.get(shard)
        if cache is None or info is None or self.name not in info.checksums:
            return None
        return cache.get(self.ds.root.fs, self._path(shard), self.name, str(shard),
                         info.checksums[self.name])

    def _check(self, buf: np.ndarray, what: str, shard: int) -> np.ndarray:
        import google_crc32c

        body = buf[:-4]
        if google_crc32c.value(body) != int.from_bytes(buf[-4:].tobytes(), "little"):
            raise StoreError(f"{self.ds.url}: field {self.name!r} shard {shard}: {what} "
                             f"checksum mismatch (corrupted file {self._path(shard)})")
        return body

    def _decode(self, buf: np.ndarray, c: int, shard: int, out: np.ndarray) -> None:
        if self.has_crc:
            buf = self._check(buf, f"chunk {c}", shard)
        try:
            self.codec.decode(buf, out=out)
        except (RuntimeError, ValueError) as e:
            raise StoreError(f"{self.ds.url}: field {self.name!r} shard {shard} chunk {c}: "
                             f"cannot decode ({e}) in {self._path(shard)}") from e

    def read_at(self, shard: int, rows: np.ndarray, out: np.ndarray | None = None,
                slots: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (ascending, repeats allowed) of one shard: ``(len(rows), *shape)``,
        or written to ``out[slots]`` (``out``: C-contiguous ``(cap, *shape)``).

        One open of the shard file; only the chunks holding ``rows`` are read and decoded
        (the whole file in one read when they are at least half of it), each into a
        chunk-sized buffer that stays in the CPU cache until its rows are copied out."""
        rows = np.asarray(rows, dtype=np.int64)
        direct = out is None
        if direct:
            out = np.zeros((rows.size, *self.shape), self.dtype)
        else:
            slots = np.asarray(slots, dtype=np.int64)
        if rows.size == 0:
            return out
        flat = out.reshape(out.shape[0], -1).view(np.uint8)

        def dest(lo, hi):
            return slice(lo, hi) if direct else slots[lo:hi]
        chunks = rows // self.spc
        starts = np.flatnonzero(np.r_[True, np.diff(chunks) != 0])
        needed = chunks[starts]
        whole = needed.size * 2 >= self.n_chunks
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        tmp = np.empty((self.spc, row_bytes), np.uint8)
        path = self._path(shard)
        fs = self.ds.root.fs
        try:
            cached = self._cached(shard)
            whole = whole or cached is not None
            if whole:  # one GET on an object store (an open file adds a HEAD and read-ahead)
                cached = fs.cat_file(path) if cached is None else cached
                f = contextlib.nullcontext()
            else:
                f = fs.open(path, "rb")
        except FileNotFoundError:
            flat[dest(0, rows.size)] = 0  # zarr drops all-fill shards: fill value
            return out
        with f:
            if whole:
                blob = np.frombuffer(cached, np.uint8)
                tail = blob[-self.index_nbytes:]
            else:
                f.seek(-self.index_nbytes, 2)
                tail = np.frombuffer(f.read(), np.uint8)
            if tail.size != self.index_nbytes:
                raise StoreError(f"{self.ds.url}: truncated shard file {path}")
            index = self._check(tail, "shard index", shard).view("<u8").reshape(self.n_chunks, 2)
            for k, c in enumerate(needed.tolist()):
                off, nb = (int(x) for x in index[c])
                lo = starts[k]
                hi = starts[k + 1] if k + 1 < starts.size else rows.size
                if off == int(self.EMPTY):
                    flat[dest(lo, hi)] = 0  # an all-fill chunk zarr did not store
                    continue
                if whole:
                    buf = blob[off:off + nb]
                else:
                    f.seek(off)
                    buf = np.frombuffer(f.read(nb), np.uint8)
                if buf.size != nb:
                    raise StoreError(f"{self.ds.url}: truncated shard file {path}")
                self._decode(buf, c, shard, tmp.reshape(-1))
                flat[dest(lo, hi)] = tmp[rows[lo:hi] - c * self.spc]
        return out.astype(self.dtype.newbyteorder("="), copy=False)

    def read(self, shard: int, start: int, stop: int) -> np.ndarray:
        n = stop - start
        if n <= 0:
            return np.zeros((0, *self.shape), self.dtype)
        out = np.empty((n, *self.shape), self.dtype)
        fs = self.ds.root.fs
        path = self._path(shard)
        c0, c1 = start // self.spc, (stop - 1) // self.spc + 1
        whole = (c1 - c0) * 2 >= self.n_chunks
        try:
            cached = self._cached(shard)
            whole = whole or cached is not None
            if whole:
                blob = np.frombuffer(fs.cat_file(path) if cached is None else cached, np.uint8)
                tail = blob[-self.index_nbytes:]
            else:
                tail = np.frombuffer(fs.cat_file(path, start=-self.index_nbytes), np.uint8)
        except FileNotFoundError:
            out.fill(0)  # zarr drops all-fill shards: the rows are fill value
            return out
        if tail.size != self.index_nbytes:
            raise StoreError(f"{self.ds.url}: truncated shard file {path}")
        index = self._check(tail, "shard index", shard).view("<u8").reshape(self.n_chunks, 2)
        sel = index[c0:c1]
        if not whole:
            present = sel[:, 0] != self.EMPTY
            if not present.any():
                out.fill(0)
                return out
            lo = int(sel[present, 0].min())
            hi = int((sel[present, 0] + sel[present, 1]).max())
            blob = np.frombuffer(fs.cat_file(path, start=lo, end=hi), np.uint8)
            base = lo
        else:
            base = 0
        row_bytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        flat = out.reshape(n, -1).view(np.uint8).reshape(-1)
        tmp = None
        for c in range(c0, c1):
            off, nb = index[c]
            r0, r1 = c * self.spc, (c + 1) * self.spc
            a0, a1 = max(r0, start), min(r1, stop)
            if off == self.EMPTY:  # an all-fill chunk zarr did not store
                flat[(a0 - start) * row_bytes:(a1 - start) * row_bytes] = 0
                continue
            off = int(off) - base
            buf = blob[off:off + int(nb)]
            if buf.size != int(nb):
                raise StoreError(f"{self.ds.url}: truncated shard file {path}")
            if self.has_crc:
                buf = self._check(buf, f"chunk {c}", shard)
            try:
                if a0 == r0 and a1 == r1:
                    self.codec.decode(buf, out=flat[(r0 - start) * row_bytes:(r1 - start) * row_bytes])
                else:
                    if tmp is None:
                        tmp = np.empty(self.spc * row_bytes, np.uint8)
                    self.codec.decode(buf, out=tmp)
                    flat[(a0 - start) * row_bytes:(a1 - start) * row_bytes] = \
                        tmp[(a0 - r0) * row_bytes:(a1 - r0) * row_bytes]
            except (RuntimeError, ValueError) as e:
                raise StoreError(f"{self.ds.url}: field {self.name!r} shard {shard} chunk {c}: "
                                 f"cannot decode ({e}) in {path}") from e
        return out.astype(self.dtype.newbyteorder("="), copy=False)


def open_dataset(root: str | os.PathLike, storage_options: dict | None = None,
                 check_paths: bool = True, **read_options: Any) -> StoredDataset:
    """Open the committed part of a dataset: manifest, rejected rows, schema, field reads.

    ``read_options``: ``verify_checksums``, ``cache_dir``, ``cache_max_bytes`` (see
    :class:`StoredDataset`)."""
    return StoredDataset(root, storage_options, check_paths=check_paths, **read_options)
