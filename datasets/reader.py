"""PyTorch readers over a dataset store (see :mod:`facecorpus.datasets.store`).

- :class:`ShardDataset` — map-style; ``DataLoader(ds, batch_size=B, shuffle=True)`` calls
  ``__getitems__`` with a whole batch of positions, which are read grouped by shard and chunk.
- :class:`ShardIterableDataset` — streams whole shards (one read + decode per shard and field),
  split across DataLoader workers and DDP ranks so every selected sample is yielded exactly
  once per epoch; shard-order shuffling plus a sample shuffle buffer, both driven by
  ``(seed, epoch)`` (call :meth:`~ShardIterableDataset.set_epoch` before each epoch; with
  ``persistent_workers=True`` the workers keep the epoch they started with).

Items are dicts: each requested field as a tensor with the stored dtype and per-sample shape
(HWC ``uint8`` images stay HWC ``uint8``: callers convert), ``"index"`` (int64 global sample
index, see the store docstring) and any requested manifest ``columns`` (numeric columns as
tensors, others as Python values). With ``batch_size=`` set, the iterable dataset yields
collated batches itself (use ``DataLoader(ds, batch_size=None)``), the fastest path.

Filters are pyarrow compute expressions over manifest columns, e.g.
``(pc.abs(pc.field("yaw")) <= 60) & (pc.field("landmark_error") < 0.05)``.

Both readers hold only the URL and manifest-derived numpy arrays; zarr and file handles are
opened lazily in each process, so they survive DataLoader worker forking (and spawning).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from facecorpus.datasets.store import StoredDataset, StoreError, open_dataset


def _select(store: StoredDataset, filter: Any, fields: Sequence[str] | None,
            columns: Sequence[str]):
    fields = tuple(fields) if fields is not None else tuple(store.schema.fields)
    unknown = [f for f in fields if f not in store.schema.fields]
    if unknown:
        raise StoreError(f"{store.url}: unknown fields {unknown} (fields: {sorted(store.schema.fields)})")
    table = store.select(filter)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise StoreError(f"{store.url}: unknown manifest columns {missing}")
    cols = {}
    for c in columns:
        col = table.column(c)
        import pyarrow as pa

        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            cols[c] = col.to_numpy(zero_copy_only=False)
        else:
            cols[c] = np.asarray(col.to_pylist(), dtype=object)
    return fields, table.column("index").to_numpy().astype(np.int64), cols


def _value(v: Any) -> Any:
    return torch.from_numpy(np.asarray(v)) if isinstance(v, np.generic | np.ndarray) else v


def _take(a: np.ndarray, idx: np.ndarray, shared: bool) -> np.ndarray | torch.Tensor:
    """``a[idx]``; with ``shared``, gathered into a shared-memory torch tensor, which the
    DataLoader sends to the main process without another copy (as default_collate does)."""
    if not shared or a.dtype == object:
        return a[idx]
    t = torch.from_numpy(np.empty(0, a.dtype))
    storage = t._typed_storage()._new_shared(int(idx.size * np.prod(a.shape[1:], dtype=np.int64)))
    out = t.new(storage).view(idx.size, *a.shape[1:])
    np.take(a, idx, axis=0, out=out.numpy())
    return out


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over the manifest rows matching ``filter``.

    Args:
        root: dataset root URL or path.
        fields: fields to read (default: all).
        filter: pyarrow compute expression over manifest columns, or None.
        columns: manifest columns to include in each item.

    ``ds[i]`` is the ``i``-th selected sample in index order; :attr:`indices` maps positions to
    global sample indices.
    """

    def __init__(self, root: str | os.PathLike, fields: Sequence[str] | None = None,
                 filter: Any = None, columns: Sequence[str] = (),
                 storage_options: dict | None = None):
        self.store = open_dataset(root, storage_options)
        self.fields, self.indices, self.columns = _select(self.store, filter, fields, columns)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        pos = np.asarray(positions, dtype=np.int64)
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"position out of range for {n} samples")
        idx = self.indices[pos]
        data = {f: self.store.read(f, idx) for f in self.fields}
        out = []
        for k in range(pos.size):
            item = {f: torch.from_numpy(data[f][k]) for f in self.fields}
            item["index"] = torch.tensor(idx[k])
            for c, v in self.columns.items():
                item[c] = _value(v[pos[k]])
            out.append(item)
        return out


class ShardIterableDataset(torch.utils.data.IterableDataset):
    """Streams the selected samples shard by shard; each exactly once per epoch.

    The selected samples, in (shuffled) shard order, are cut into ``world_size * num_workers``
    contiguous slices of equal size (±1); the DataLoader worker ``w`` of rank ``r`` reads slice
    ``r * num_workers + w``. Each slice is read a shard run at a time, so ranks get equal counts
    and a shard is decoded at most twice (where a slice boundary falls inside it).

    Args:
        root: dataset root URL or path.
        fields: fields to read (default: all).
        filter: pyarrow compute expression over manifest columns, or None.
        shuffle: shuffle shard order and samples (through a buffer of ``buffer_size``).
        seed: base seed; the order depends on ``(seed, epoch)`` only.
        buffer_size: samples held for shuffling (memory: ``buffer_size`` x sample bytes).
        columns: manifest columns to include in each item.
        batch_size: if set, yield collated batches of this size (the last may be smaller
            unless ``drop_last``); use with ``DataLoader(batch_size=None)``.
        rank, world_size: override the torch.distributed rank/world (default: from the
            initialised process group, else 0/1).
        decode_threads: shards decoded ahead in threads of the reading process; with
            ``num_workers=0`` this uses several cores without the cost of sending batches
            between processes (see docs/benchmarks.md).
    """

    def __init__(self, root: str | os.PathLike, fields: Sequence[str] | None = None,
                 filter: Any = None, shuffle: bool = True, seed: int = 0, buffer_size: int = 1024,
                 columns: Sequence[str] = (), batch_size: int | None = None, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None,
                 decode_threads: int = 1, storage_options: dict | None = None):
        super().__init__()
        self.decode_threads = int(decode_threads)
        self.store = open_dataset(root, storage_options)
        self.fields, indices, self.columns = _select(self.store, filter, fields, columns)
        sps = self.store.schema.samples_per_shard
        self._index = indices  # sorted by index, so grouped by shard
        shard = indices // sps
        cuts = np.flatnonzero(np.diff(shard)) + 1
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        self._groups = [(int(shard[a]), a, b) for a, b in
                        zip(starts, np.append(starts[1:], indices.size), strict=True)] if indices.size else []
        self.shuffle, self.seed, self.buffer_size = shuffle, int(seed), max(1, int(buffer_size))
        self.batch_size, self.drop_last = batch_size, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (over all its DataLoader workers)."""
        rank, world = self._rank_world()
        total = int(self._index.size)
        return total * (rank + 1) // world - total * rank // world

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch in batched mode: each worker batches its own
        slice, so every worker may end with one short batch (dropped with ``drop_last``)."""
        if not self.batch_size:
            raise TypeError("num_batches() needs batch_size=")
        rank, world = self._rank_world()
        nw = max(1, num_workers)
        total, parts = int(self._index.size), world * nw
        out = 0
        for w in range(nw):
            g = rank * nw + w
            n = total * (g + 1) // parts - total * g // parts
            out += n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return out

    def __len__(self) -> int:
        """Items this rank yields per epoch: samples, or batches in batched mode (exact
        for ``num_workers=0``; with workers use :meth:`num_batches`)."""
        return self.num_batches(0) if self.batch_size else self.num_samples()

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return int(self.rank or 0), int(self.world_size)
        return _dist_rank_world()

    def plan(self, rank: int, world: int, worker: int, n_workers: int) -> list[tuple[int, np.ndarray]]:
        """(shard, positions into the selection) runs that one worker of one rank reads."""
        order = list(range(len(self._groups)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(order)).tolist()
        total = int(self._index.size)
        parts = world * n_workers
        gid = rank * n_workers + worker
        lo, hi = total * gid // parts, total * (gid + 1) // parts
        out, offset = [], 0
        for g in order:
            s, a, b = self._groups[g]
            n = b - a
            x0, x1 = max(lo, offset), min(hi, offset + n)
            if x0 < x1:
                out.append((s, np.arange(a + x0 - offset, a + x1 - offset)))
            offset += n
            if offset >= hi:
                break
        return out

    def _read_block(self, s: int, pos: np.ndarray) -> dict[str, np.ndarray]:
        rows = self._index[pos] - s * self.store.schema.samples_per_shard
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        block = {}
        for f in self.fields:
            a = self.store.read_rows(f, s, r0, r1)
            block[f] = a if (r1 - r0 == rows.size) else a[rows - r0]
        block["index"] = self._index[pos]
        for c, v in self.columns.items():
            block[c] = v[pos]
        return block

    def _blocks(self, plan) -> Iterator[dict[str, np.ndarray]]:
        """Decoded shard runs in plan order; with ``decode_threads > 1`` the next runs are
        decoded ahead in threads (zstd/blosc release the GIL), in this process."""
        if self.decode_threads <= 1 or len(plan) <= 1:
            for s, pos in plan:
                yield self._read_block(s, pos)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        for f in self.fields:  # open readers once, before threads race to do it
            self.store.read_rows(f, plan[0][0], 0, 0)
        todo = iter(plan)
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="shard-decode") as ex:
            futs = deque(ex.submit(self._read_block, s, pos)
                         for s, pos in itertools.islice(todo, self.decode_threads))
            while futs:
                block = futs.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    futs.append(ex.submit(self._read_block, *nxt))
                yield block

    def _shuffled(self, blocks: Iterator[dict], rng: np.random.Generator,
                  emit: int) -> Iterator[dict]:
        """Vectorised reservoir shuffle: arriving samples take ``emit`` random slots of a full
        buffer at a time and the slots' previous occupants leave as one chunk. Each sample is
        copied twice (into the buffer, out of it); chunks come out exactly ``emit`` long (the
        batch size in batched mode) until the final drain."""
        B = self.buffer_size
        E = max(1, min(emit, B))
        # batches leaving a DataLoader worker are gathered straight into shared memory
        shm = bool(self.batch_size) and torch.utils.data.get_worker_info() is not None
        buf: dict[str, np.ndarray] | None = None
        fill = 0
        pend: list[dict[str, np.ndarray]] = []
        n_pend = 0
        for block in blocks:
            k = block["index"].size
            if buf is None:
                buf = {key: np.empty((B, *v.shape[1:]), v.dtype) for key, v in block.items()}
            start = 0
            if fill < B:
                start = min(B - fill, k)
                for key, v in block.items():
                    buf[key][fill:fill + start] = v[:start]
                fill += start
            if start < k:
                pend.append({key: v[start:] for key, v in block.items()})
                n_pend += k - start
            while n_pend >= E:
                slots = rng.choice(B, size=E, replace=False)
                out = {key: _take(b, slots, shm) for key, b in buf.items()}
                j = 0
                while j < E:
                    p = pend[0]
                    m = min(p["index"].size, E - j)
                    for key, v in p.items():
                        buf[key][slots[j:j + m]] = v[:m]
                    j += m
                    if m == p["index"].size:
                        pend.pop(0)
                    else:
                        pend[0] = {key: v[m:] for key, v in p.items()}
                n_pend -= E
                yield out
        if buf is None:
            return
        rest = {key: np.concatenate([b[:fill], *(p[key] for p in pend)]) for key, b in buf.items()}
        order = rng.permutation(rest["index"].size)
        for i in range(0, order.size, E):
            yield {key: _take(v, order[i:i + E], shm) for key, v in rest.items()}

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        rank, world = self._rank_world()
        wi = torch.utils.data.get_worker_info()
        worker, n_workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        plan = self.plan(rank, world, worker, n_workers)
        blocks = self._blocks(plan)
        if not self.shuffle:
            return blocks
        rng = np.random.default_rng([self.seed, self.epoch, rank * n_workers + worker, 1])
        return self._shuffled(blocks, rng, emit=self.batch_size or 64)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size:
            yield from self._batches(self._chunks())
            return
        keys = [*self.fields, "index", *self.columns]
        for chunk in self._chunks():
            cols = {k: chunk[k] for k in keys}
            for i in range(chunk["index"].size):
                item = {f: torch.from_numpy(cols[f][i]) for f in self.fields}
                item["index"] = torch.tensor(cols["index"][i])
                for c in self.columns:
                    item[c] = _value(cols[c][i])
                yield item

    def _batches(self, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        bs = int(self.batch_size)
        pending: list[dict[str, Any]] = []
        have = 0

        def tensor(v):
            if isinstance(v, torch.Tensor):
                return v
            return torch.from_numpy(v) if v.dtype != object else v.tolist()

        def cat(parts, k):
            if len(parts) == 1:
                return parts[0][k]
            vs = [p[k] for p in parts]
            if isinstance(vs[0], torch.Tensor):
                return torch.cat(vs)
            return np.concatenate([np.asarray(v) for v in vs])

        for chunk in chunks:
            pending.append(chunk)
            have += chunk["index"].shape[0]
            while have >= bs:
                merged = {k: cat(pending, k) for k in pending[0]}
                yield {k: tensor(v[:bs]) for k, v in merged.items()}
                have -= bs
                pending = [{k: v[bs:] for k, v in merged.items()}] if have else []
        if have and not self.drop_last:
            yield {k: tensor(cat(pending, k)) for k in pending[0]}
