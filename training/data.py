"""Data side of training: split selection by manifest filters, field normalisation, batch order.

Samples are dicts of tensors as the datasets reader yields them (HWC images stay uint8 HWC);
conversion to normalised NCHW floats happens on the training device (`Normalizer`), so
loader workers move compact uint8 and the host does no float work.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from facecorpus.core.errors import ConfigError, FacecorpusError, InputError
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldInfo:
    """A field's per-sample shape (e.g. (H, W, 3) or (H, W)) and numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def channels(self) -> int:
        return self.shape[2] if len(self.shape) == 3 else 1


@dataclass
class Split:
    """A selected subset of a dataset: a map-style torch dataset plus the fields' layout."""

    dataset: Dataset
    fields: dict[str, FieldInfo]
    source: str

    def __len__(self) -> int:
        return len(self.dataset)


# ---------------------------------------------------------------- manifest filters

_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
        ">": operator.gt, ">=": operator.ge}


def filter_expression(filters: Sequence) -> object | None:
    """A list of FilterSpec (column, op, value) -> one pyarrow compute expression (AND), or None."""
    import pyarrow.compute as pc

    expr = None
    for f in filters:
        col = pc.field(f.column)
        if f.op in _OPS:
            e = _OPS[f.op](col, f.value)
        elif f.op == "abs<=":
            e = pc.abs(col) <= f.value
        elif f.op == "in":
            e = col.isin(f.value)
        elif f.op == "not in":
            e = ~col.isin(f.value)
        else:  # pragma: no cover - the config validates op
            raise ConfigError(f"unknown filter op {f.op!r}")
        expr = e if expr is None else expr & e
    return expr


# ---------------------------------------------------------------- in-memory source


class TensorSource:
    """An in-memory dataset with the reader's interface: arrays ``{field: (N, *shape)}`` and a
    manifest table (N rows, e.g. a ``split`` column). Used for tests and the benchmark's
    reference loop."""

    def __init__(self, arrays: dict[str, np.ndarray], manifest):
        import pyarrow as pa

        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"arrays differ in length: { {k: len(a) for k, a in arrays.items()} }")
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
        self.manifest = manifest if isinstance(manifest, pa.Table) else pa.Table.from_pylist(manifest)
        if self.manifest.num_rows != n.pop():
            raise ValueError("manifest rows != array length")
        self.fields = {k: FieldInfo(tuple(a.shape[1:]), str(a.dtype)) for k, a in arrays.items()}

    def split(self, fields: Sequence[str], filters: Sequence) -> Split:
        missing = [f for f in fields if f not in self.arrays]
        if missing:
            raise InputError(f"<memory>: dataset has no field(s) {missing}; has {sorted(self.arrays)}")
        expr = filter_expression(filters)
        idx = np.arange(self.manifest.num_rows)
        if expr is not None:
            import pyarrow as pa

            t = self.manifest.append_column("__i", pa.array(idx))
            idx = t.filter(expr).column("__i").to_numpy()
        return Split(_TensorDataset({f: self.arrays[f] for f in fields}, torch.from_numpy(np.array(idx))),
                     {f: self.fields[f] for f in fields}, "<memory>")


class _TensorDataset(Dataset):
    def __init__(self, arrays: dict[str, torch.Tensor], index: torch.Tensor):
        self.arrays, self.index = arrays, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.index[i])
        out = {k: a[j] for k, a in self.arrays.items()}
        out["index"] = torch.tensor(j)
        return out

    def __getitems__(self, ii: list[int]) -> dict[str, torch.Tensor]:
        # one gather per field instead of N tensors + collate; collate_batch passes dicts through
        j = self.index[torch.as_tensor(ii)]
        out = {k: a[j] for k, a in self.arrays.items()}
        out["index"] = j
        return out


def collate_batch(items):
    """Collate a list of sample dicts, or pass through a dict already batched by __getitems__
    (values: tensors or numpy arrays; the trainer takes either)."""
    if isinstance(items, dict):
        return items
    return torch.utils.data.default_collate(items)


# ---------------------------------------------------------------- store source


class _BatchedShards(Dataset):
    """A ``ShardDataset`` whose batch fetch returns one numpy array per field (``store.read`` of
    all the batch's indices at once) instead of per-sample tensors that collate re-stacks.

    numpy, not tensors: a DataLoader worker pickles numpy arrays through its result pipe,
    while tensors go through shared memory whose file descriptors the training process must
    fetch from the worker's resource-sharer thread, one round trip per tensor; on a busy
    CPU those round trips cost ~13 ms per step (measured, 32² batches of 16)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.inner[i]

    def __getitems__(self, positions: list[int]) -> dict[str, np.ndarray]:
        idx = self.inner.indices[np.asarray(positions, dtype=np.int64)]
        out = {f: self.inner.store.read(f, idx) for f in self.inner.fields}
        out["index"] = idx
        return out


class _JoinedShards(Dataset):
    """Main-dataset rows plus, per row, the fields of the matching row of a joined dataset.

    ``positions`` maps this dataset's positions to the inner ShardDataset's (rows without a
    match are left out); ``right_index`` holds the joined dataset's global index per position.
    """

    def __init__(self, inner, positions: np.ndarray, right_store, right_fields: Sequence[str],
                 right_index: np.ndarray):
        self.inner, self.positions = inner, positions
        self.right_store, self.right_fields, self.right_index = right_store, tuple(right_fields), right_index

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[0]) for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, positions: list[int]) -> dict[str, np.ndarray]:
        pos = np.asarray(positions, dtype=np.int64)
        idx = self.inner.indices[self.positions[pos]]
        out = {f: self.inner.store.read(f, idx) for f in self.inner.fields}
        ridx = self.right_index[pos]
        out.update({f: self.right_store.read(f, ridx) for f in self.right_fields})
        out["index"] = idx
        return out


def _field_info(spec) -> FieldInfo:
    return FieldInfo(tuple(spec.shape), str(np.dtype(spec.dtype)))


def open_store_split(root: str, fields: Sequence[str], filters: Sequence, join=None) -> Split:
    """A split of a dataset written by ``facecorpus.datasets`` (read only through its reader).

    ``join`` (a JoinConfig): fields absent from ``root`` are read from ``join.data``, from the
    row whose ``join.right_on`` equals this row's ``join.left_on``.
    """
    from facecorpus.datasets.reader import ShardDataset
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(root)
    here = [f for f in fields if f in ds.schema.fields]
    there = [f for f in fields if f not in ds.schema.fields]
    right = open_dataset(join.data) if (there and join is not None) else None
    if there and (right is None or any(f not in right.schema.fields for f in there)):
        where = f"{root}" + (f" or joined {join.data}" if join is not None else "")
        raise InputError(f"{where}: dataset has no field(s) {there}; has {sorted(ds.schema.fields)}"
                         + ("" if join is not None else " (a `join:` dataset can supply them)"))
    info = {f: _field_info(ds.schema.fields[f]) for f in here}
    if right is not None:
        info.update({f: _field_info(right.schema.fields[f]) for f in there})
    try:
        dataset = ShardDataset(root, fields=tuple(here), filter=filter_expression(filters))
    except Exception as e:  # e.g. a filter naming a column the manifest lacks
        if isinstance(e, FacecorpusError):
            raise
        raise InputError(f"{root}: cannot select split ({type(e).__name__}: {e})") from e
    info = {f: info[f] for f in fields}
    if right is None:
        return Split(_BatchedShards(dataset), info, str(root))

    for tbl, col, name in ((ds.manifest, join.left_on, root), (right.manifest, join.right_on, join.data)):
        if col not in tbl.column_names:
            raise InputError(f"{name}: manifest has no join column {col!r}")
    left_key = dict(zip(ds.manifest.column("index").to_pylist(),
                        ds.manifest.column(join.left_on).to_pylist(), strict=True))
    rkeys = right.manifest.column(join.right_on).to_pylist()
    right_of = dict(zip(rkeys, right.manifest.column("index").to_pylist(), strict=True))
    if len(right_of) != len(rkeys):
        raise InputError(f"{join.data}: join column {join.right_on!r} is not unique")
    keys = [left_key[int(i)] for i in dataset.indices]
    found = np.array([k in right_of for k in keys], dtype=bool)
    if not found.all():
        log.warning("%s: %d of %d selected rows have no %s match in %s; left out", root,
                    int((~found).sum()), len(keys), join.right_on, join.data)
    positions = np.flatnonzero(found)
    ridx = np.array([right_of[keys[p]] for p in positions], dtype=np.int64)
    return Split(_JoinedShards(dataset, positions, right, there, ridx), info,
                 f"{root} + {join.data}")


def open_split(source, fields: Sequence[str], filters: Sequence, join=None) -> Split:
    if isinstance(source, TensorSource):
        return source.split(fields, filters)
    return open_store_split(str(source), fields, filters, join)


# ---------------------------------------------------------------- normalisation


class Normalizer(torch.nn.Module):
    """Maps a field between its stored form and the network's normalised NCHW float form.

    uint8 fields: x / 255 (masks: > 0). Float fields (e.g. ``uv_position`` in mm): per-channel
    ``(x - offset) / scale`` with offset/scale estimated on the training split (mean, std).

    Shape:
        to_model: (B, H, W, C) or (B, H, W) any dtype -> (B, C, H, W) float32
        to_data: (B, C, H, W) -> (B, H, W, C) float32 in stored units (uint8 fields in [0, 255])
    """

    def __init__(self, info: FieldInfo, offset: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, is_mask: bool = False):
        super().__init__()
        c = info.channels
        self.info, self.is_mask = info, is_mask
        if offset is None:
            offset = torch.zeros(c)
        if scale is None:
            scale = torch.full((c,), 255.0 if info.dtype == "uint8" else 1.0)
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32).reshape(1, c, 1, 1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(1, c, 1, 1))

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2)
        if self.is_mask:
            return (x > 0).float()
        if x.dtype.is_floating_point:  # e.g. NaN outside the UV islands must not poison the loss
            x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        return (x.float() - self.offset) / self.scale

    def to_data(self, y: torch.Tensor) -> torch.Tensor:
        return (y.float() * self.scale + self.offset).permute(0, 2, 3, 1)

    @classmethod
    def fit(cls, info: FieldInfo, samples: torch.Tensor, is_mask: bool = False) -> Normalizer:
        """Estimate a float field's offset/scale from samples (N, H, W, C)."""
        if is_mask or info.dtype in ("uint8", "bool"):
            return cls(info, is_mask=is_mask or info.dtype == "bool")
        x = samples.double().reshape(-1, info.channels)
        x = x[torch.isfinite(x).all(dim=1)]
        if len(x) == 0:
            raise InputError(f"field of dtype {info.dtype}: no finite values to normalise")
        std = x.std(dim=0).clamp_min(1e-6)
        return cls(info, x.mean(dim=0).float(), std.float())


# ---------------------------------------------------------------- batch order


class StepBatchSampler(Sampler[list[int]]):
    """Endless batches of a seeded per-epoch permutation, starting at a global step.

    The order is a pure function of (seed, epoch), and the position a pure function of the
    global step (``epoch = step // batches_per_epoch``), so a resumed run sees exactly the
    batches an uninterrupted one would. Under DDP each rank takes every ``world``-th sample of
    the epoch's permutation; incomplete batches are dropped so all ranks step together.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise InputError(f"training split has {n} samples, fewer than one batch "
                             f"({batch_size} x {world} processes)")

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of a global step."""
        return divmod(step, self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank::self.world][: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, b = self.position(self.start_step)
        while True:
            order = self.epoch_order(epoch).view(self.batches_per_epoch, self.batch_size)
            for i in range(b, self.batches_per_epoch):
                yield order[i].tolist()
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62
