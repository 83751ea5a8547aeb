"""PyTorch readers over a dataset store (see :mod:`facecorpus.datasets.store`).

- :class:`ShardDataset` — map-style; ``DataLoader(ds, batch_size=B, shuffle=True)`` calls
  ``__getitems__`` with a whole batch of positions, which are read grouped by shard and chunk.
- :class:`ShardIterableDataset` — streams whole shards (one read + decode per shard and field),
  split across DataLoader workers and DDP ranks so every selected sample is yielded exactly
  once per epoch; shard-order shuffling plus a sample shuffle buffer, both driven by
  ``(seed, epoch)`` (call :meth:`~ShardIterableDataset.set_epoch` before each epoch; with
  ``persistent_workers=True`` the workers keep the epoch they started with). Mid-epoch
  resume: ``state = ds.state_dict(batches=k, loader=dl)`` after the training loop took ``k``
  batches, then ``ds.load_state_dict(state)`` on a new reader before building its DataLoader
  (same ranks, ``num_workers`` and batch sizes): the epoch continues with exactly the samples
  not yet delivered, in the uninterrupted order.

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
    """``a[idx]``; with ``shared`` (in a DataLoader worker), gathered into a shared-memory
    torch tensor from this worker's :class:`_ShmPool`, which the DataLoader sends to the main
    process without another copy."""
    if not shared or a.dtype == object:
        return a[idx]
    return _ShmPool.get().take(a, idx)


def _release(lease: torch.Tensor, slot: int) -> None:
    lease[slot] = 0


def _unlease(t: torch.Tensor, lease: torch.Tensor, slot: int) -> torch.Tensor:
    """Main-process side of :class:`_Leased`: the plain tensor; when its storage dies (the
    batch, and every view of it, released) the worker may refill the buffer."""
    import weakref

    weakref.finalize(t.untyped_storage(), _release, lease, slot)
    return t


class _Leased:
    """A pooled shared-memory tensor on its way to the main process (see :class:`_ShmPool`)."""

    __slots__ = ("lease", "slot", "t")

    def __init__(self, t: torch.Tensor, lease: torch.Tensor, slot: int):
        self.t, self.lease, self.slot = t, lease, slot

    def __reduce__(self):
        return _unlease, (self.t, self.lease, self.slot)


class _ShmPool:
    """Shared-memory batch buffers a DataLoader worker reuses once the main process is done.

    Filling fresh shared memory costs a page fault per 4 KiB in the worker (and the segment's
    set-up and teardown); on the 2-core dev VM that was ~60 % of the hand-off of a 112 KiB
    sample. A buffer is reused only after the main process has dropped every tensor viewing
    it: the batch travels as :class:`_Leased`, whose unpickling in the main process arms a
    finalizer on the tensor's storage that clears the buffer's flag in a shared ``lease``
    array. While every buffer is still held (a loop keeping batches), fresh memory is used,
    so reuse can never overwrite a batch somebody still reads.
    """

    SLOTS = 48
    TAKE_MODE = "clip"  # bench_read sets "raise" in its workers: the hand-off before
    _current: _ShmPool | None = None

    def __init__(self):
        self.pid = os.getpid()
        self.lease = torch.zeros(self.SLOTS, dtype=torch.int32).share_memory_()
        self.flags = self.lease.numpy()
        self.bufs: list[torch.Tensor | None] = [None] * self.SLOTS
        self.by_ptr: dict[int, int] = {}

    @classmethod
    def get(cls) -> _ShmPool:
        if cls._current is None or cls._current.pid != os.getpid():
            cls._current = cls()
        return cls._current

    def take(self, a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        shape = (idx.size, *a.shape[1:])
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * a.dtype.itemsize)
        free = np.flatnonzero(self.flags == 0)
        slot = next((int(i) for i in free if self.bufs[i] is not None and self.bufs[i].numel() >= nbytes), None)
        if slot is None and free.size:
            slot = int(next((i for i in free if self.bufs[i] is None), free[0]))
            old = self.bufs[slot]
            if old is not None:
                self.by_ptr.pop(old.untyped_storage().data_ptr(), None)
            self.bufs[slot] = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
            self.by_ptr[self.bufs[slot].untyped_storage().data_ptr()] = slot
        ttype = torch.from_numpy(np.empty(0, a.dtype)).dtype
        if slot is None:  # every buffer still held by the main process: fresh memory
            out = torch.empty(shape, dtype=ttype).share_memory_()
        else:
            self.flags[slot] = 1
            out = self.bufs[slot][:nbytes].view(ttype).view(shape)
        # mode='clip': with the default mode='raise' numpy gathers into a temporary and
        # copies that into ``out`` (a second pass over the batch); idx is in range here
        np.take(a, idx, axis=0, out=out.numpy(), mode=self.TAKE_MODE)
        return out

    def lease_out(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its pooled tensors wrapped for the trip to the main process."""
        out = {}
        for k, v in batch.items():
            slot = self.by_ptr.get(v.untyped_storage().data_ptr()) if isinstance(v, torch.Tensor) else None
            out[k] = v if slot is None else _Leased(v, self.lease, slot)
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
        verify_checksums, cache_dir, cache_max_bytes: see
            :class:`facecorpus.datasets.store.StoredDataset` (per-shard sha256 on first read;
            a size-limited local cache of a remote root's shard files).

    ``ds[i]`` is the ``i``-th selected sample in index order; :attr:`indices` maps positions to
    global sample indices.
    """

    def __init__(self, root: str | os.PathLike, fields: Sequence[str] | None = None,
                 filter: Any = None, columns: Sequence[str] = (),
                 storage_options: dict | None = None, verify_checksums: bool = False,
                 cache_dir: str | os.PathLike | None = None, cache_max_bytes: int = 10 * 2**30):
        self.store = open_dataset(root, storage_options, verify_checksums=verify_checksums,
                                  cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
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
        verify_checksums, cache_dir, cache_max_bytes: as for :class:`ShardDataset`.
    """

    def __init__(self, root: str | os.PathLike, fields: Sequence[str] | None = None,
                 filter: Any = None, shuffle: bool = True, seed: int = 0, buffer_size: int = 1024,
                 columns: Sequence[str] = (), batch_size: int | None = None, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None,
                 decode_threads: int = 1, storage_options: dict | None = None,
                 verify_checksums: bool = False, cache_dir: str | os.PathLike | None = None,
                 cache_max_bytes: int = 10 * 2**30):
        super().__init__()
        self.decode_threads = int(decode_threads)
        self.store = open_dataset(root, storage_options, verify_checksums=verify_checksums,
                                  cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
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
        self._resume: dict[str, Any] | None = None
        self._items_seen = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

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

    def _emission(self, plan, rng: np.random.Generator, emit: int) -> tuple[list[np.ndarray], list[int]]:
        """The shuffled order, computed on positions alone (no data is read).

        A vectorised reservoir shuffle: arriving samples take ``emit`` random slots of a full
        buffer of ``buffer_size`` at a time and the slots' previous occupants leave as one
        chunk; the rest is drained in random order at the end. Returns the chunks (positions
        into the selection, each ``emit`` long until the final drain) and, per chunk, how many
        plan runs must have been read before it can leave. Because the order is a pure
        function of ``(seed, epoch, rank, worker)``, a resumed epoch replays it exactly and
        reads only the shards that still hold unsent samples.
        """
        B = self.buffer_size
        E = max(1, min(emit, B))
        buf = np.empty(B, np.int64)
        fill = 0
        pend: list[np.ndarray] = []
        n_pend = 0
        chunks: list[np.ndarray] = []
        after: list[int] = []
        for k, (_, pos) in enumerate(plan):
            start = 0
            if fill < B:
                start = min(B - fill, pos.size)
                buf[fill:fill + start] = pos[:start]
                fill += start
            if start < pos.size:
                pend.append(pos[start:])
                n_pend += pos.size - start
            while n_pend >= E:
                slots = rng.choice(B, size=E, replace=False)
                chunks.append(buf[slots].copy())
                after.append(k + 1)
                incoming = np.concatenate(pend) if len(pend) > 1 else pend[0]
                buf[slots] = incoming[:E]
                pend = [incoming[E:]] if incoming.size > E else []
                n_pend -= E
        if fill:
            rest = np.concatenate([buf[:fill], *pend])
            order = rng.permutation(rest.size)
            for i in range(0, order.size, E):
                chunks.append(rest[order[i:i + E]])
                after.append(len(plan))
        return chunks, after

    def _replay(self, plan, chunks: list[np.ndarray], after: list[int],
                skip: int) -> Iterator[dict[str, np.ndarray]]:
        """The chunks of :meth:`_emission` with their data, minus the first ``skip`` samples.

        Runs are read in plan order (decoded ahead in threads with ``decode_threads``) straight
        into arena slots, where each sample waits until its chunk leaves: a stored chunk is
        decoded into a small buffer and scattered from the CPU cache, and a leaving chunk is
        gathered once, into shared memory when it leaves a DataLoader worker."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        first = 0
        while first < len(chunks) and skip >= chunks[first].size:
            skip -= chunks[first].size
            first += 1
        if first == len(chunks):
            return
        todo = [chunks[first][skip:], *chunks[first + 1:]]
        after = after[first:]
        needed = np.zeros(self._index.size, bool)
        needed[np.concatenate(todo)] = True
        runs = []
        for k, (s, pos) in enumerate(plan):
            keep = pos[needed[pos]]
            if keep.size:
                runs.append((k, s, keep))
        shm = torch.utils.data.get_worker_info() is not None and bool(self.batch_size)
        ahead = self.decode_threads if self.decode_threads > 1 and len(runs) > 1 else 0
        longest = max(r[2].size for r in runs)
        cap = self.buffer_size + max(c.size for c in todo) + (1 + ahead) * longest
        spec = self.store.schema.fields
        arena = {f: np.empty((cap, *spec[f].shape), np.dtype(spec[f].dtype)) for f in self.fields}
        arena["index"] = np.empty(cap, np.int64)
        for c, v in self.columns.items():
            arena[c] = np.empty(cap, v.dtype)
        slot_of = np.full(self._index.size, -1, np.int64)
        free = list(range(cap))
        pool = None
        if ahead:
            for f in self.fields:  # open readers once, before threads race to do it
                self.store.read_rows(f, runs[0][1], 0, 0)
            pool = ThreadPoolExecutor(ahead, thread_name_prefix="shard-decode")
        reading: deque = deque()  # (plan step, shard, positions, slots, future) in plan order
        nxt = [0]  # the next run to start

        def start() -> None:
            if nxt[0] == len(runs):
                return
            k, s, keep = runs[nxt[0]]
            nxt[0] += 1
            slots = np.array(free[-keep.size:], np.int64)
            del free[-keep.size:]
            job = (None if pool is None
                   else pool.submit(self._fill, arena, s, keep, slots))
            reading.append((k, s, keep, slots, job))

        try:
            for _ in range(ahead):
                start()
            for chunk, need in zip(todo, after, strict=True):
                while (reading[0][0] if reading else
                       runs[nxt[0]][0] if nxt[0] < len(runs) else need) < need:
                    if not reading:  # read in this thread: slots are taken only when read
                        start()
                    _, s, keep, slots, job = reading.popleft()
                    if job is None:
                        self._fill(arena, s, keep, slots)
                    else:
                        job.result()
                        start()  # keep ``ahead`` runs decoding
                    slot_of[keep] = slots
                slots = slot_of[chunk]
                out = {key: _take(v, slots, shm) for key, v in arena.items()}
                free.extend(slots.tolist())
                yield out
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self, arena: dict[str, np.ndarray], s: int, keep: np.ndarray,
              slots: np.ndarray) -> None:
        """Samples ``keep`` (positions into the selection) of shard ``s`` into arena ``slots``."""
        rows = self._index[keep] - s * self.store.schema.samples_per_shard
        for f in self.fields:
            self.store.read_rows_into(f, s, rows, arena[f], slots)
        arena["index"][slots] = self._index[keep]
        for c, v in self.columns.items():
            arena[c][slots] = v[keep]

    def _worker(self) -> tuple[int, int, int, int, int]:
        """(rank, world, this worker's slice, workers, samples of the slice to skip)."""
        rank, world = self._rank_world()
        wi = torch.utils.data.get_worker_info()
        worker, n_workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)  # 0 workers = 1
        r = self._resume
        if r is None or r["epoch"] != self.epoch:
            return rank, world, worker, n_workers, 0
        if (r["world_size"], r["rank"], r["num_workers"]) != (world, rank, n_workers):
            raise StoreError(
                f"{self.store.url}: resume state was saved by rank {r['rank']} of {r['world_size']} "
                f"with {r['num_workers']} DataLoader workers, resumed as rank {rank} of {world} with "
                f"{n_workers} workers; resume with the same ranks and num_workers")
        old = (worker + r["rotate"]) % n_workers
        return rank, world, old, n_workers, int(r["skip"][old])

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        rank, world, worker, n_workers, skip = self._worker()
        plan = self.plan(rank, world, worker, n_workers)
        if not plan:
            return iter(())
        if not self.shuffle:
            return self._blocks(self._skip_runs(plan, skip))
        rng = np.random.default_rng([self.seed, self.epoch, rank * n_workers + worker, 1])
        chunks, after = self._emission(plan, rng, emit=self.batch_size or 64)
        return self._replay(plan, chunks, after, skip)

    @staticmethod
    def _skip_runs(plan, skip: int):
        out = []
        for s, pos in plan:
            if skip >= pos.size:
                skip -= pos.size
                continue
            out.append((s, pos[skip:]))
            skip = 0
        return out

    # -- resume
    def _per_item(self, loader) -> tuple[int, bool, int]:
        """(samples per item the training loop receives, short last item dropped, workers)."""
        per, drop, nw = int(self.batch_size or 1), bool(self.drop_last), 0
        if loader is not None:
            nw = int(loader.num_workers)
            if loader.batch_size is not None:
                if self.batch_size:
                    raise StoreError("batched dataset (batch_size=) needs DataLoader(batch_size=None)")
                per, drop = int(loader.batch_size), bool(loader.drop_last)
        return per, drop, nw

    def state_dict(self, batches: int | None = None, loader=None) -> dict[str, Any]:
        """Where this rank is in the epoch, for :meth:`load_state_dict` (a small plain dict).

        Args:
            batches: items this rank's training loop has taken from ``loader`` in this epoch
                (batches; samples for per-sample items without a DataLoader). Default: the
                items this dataset yielded when iterated in this process (``num_workers=0``).
            loader: the DataLoader that iterates this dataset (its ``num_workers``,
                ``batch_size`` and ``drop_last`` say how samples became batches).

        DataLoader workers hand batches out round-robin (in order), so ``batches`` fixes how
        many samples each worker had delivered and which worker was next; a resumed loader
        gives its worker ``j`` the role of worker ``(j + next) % num_workers``, so the rest of
        the epoch comes out in the uninterrupted order.
        """
        per, drop, nw = self._per_item(loader)
        if batches is None:
            if loader is not None and nw:
                raise StoreError("state_dict(loader=...) with DataLoader workers needs batches=")
            batches = self._items_seen
        rank, world = self._rank_world()
        n_w = max(1, nw)
        base = self._resume if (self._resume and self._resume["epoch"] == self.epoch
                                and self._resume["num_workers"] == n_w) else None
        rot = base["rotate"] if base else 0
        skip = list(base["skip"]) if base else [0] * n_w
        total, parts = int(self._index.size), world * n_w
        size = [total * (rank * n_w + w + 1) // parts - total * (rank * n_w + w) // parts for w in range(n_w)]
        left = []  # items each worker of this run still has
        for j in range(n_w):
            rem = size[(j + rot) % n_w] - skip[(j + rot) % n_w]
            left.append(rem // per if drop else -(-rem // per))
        taken, j, k = [0] * n_w, 0, int(batches)
        if k > sum(left):
            raise StoreError(f"{self.store.url}: {k} batches consumed, but this rank has only "
                             f"{sum(left)} left in epoch {self.epoch}")
        while k:
            if taken[j] < left[j]:
                taken[j] += 1
                k -= 1
            j = (j + 1) % n_w
        for jj in range(n_w):
            old = (jj + rot) % n_w
            skip[old] = min(size[old], skip[old] + taken[jj] * per)
        return {"version": 1, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "buffer_size": self.buffer_size, "batch_size": self.batch_size,
                "n_selected": total, "rank": rank, "world_size": world, "num_workers": n_w,
                "rotate": (j + rot) % n_w, "skip": skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved epoch where :meth:`state_dict` left it: the next iteration of that
        epoch yields exactly the samples not yet delivered, in the uninterrupted order.

        Build the DataLoader after this call (workers copy the dataset when they start) with
        the same ``num_workers``, ranks, batch sizes, seed and selection; ``set_epoch`` to
        another epoch clears the resume."""
        want = {"seed": self.seed, "shuffle": self.shuffle, "buffer_size": self.buffer_size,
                "batch_size": self.batch_size, "n_selected": int(self._index.size)}
        bad = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in want.items() if state.get(k) != v]
        if state.get("version") != 1 or bad:
            raise StoreError(f"{self.store.url}: resume state does not fit this reader: "
                             + ("; ".join(bad) or f"version {state.get('version')!r}"))
        self._resume = {k: state[k] for k in ("epoch", "rank", "world_size", "num_workers", "rotate")}
        self._resume["skip"] = [int(x) for x in state["skip"]]
        self.epoch = int(state["epoch"])
        self._items_seen = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        count = torch.utils.data.get_worker_info() is None
        if count:
            self._items_seen = 0
        if self.batch_size:
            pool = None if count or not self.shuffle else _ShmPool.get()
            for batch in self._batches(self._chunks()):
                if count:
                    self._items_seen += 1
                yield batch if pool is None else pool.lease_out(batch)
            return
        keys = [*self.fields, "index", *self.columns]
        for chunk in self._chunks():
            cols = {k: chunk[k] for k in keys}
            for i in range(chunk["index"].size):
                item = {f: torch.from_numpy(cols[f][i]) for f in self.fields}
                item["index"] = torch.tensor(cols["index"][i])
                for c in self.columns:
                    item[c] = _value(cols[c][i])
                if count:
                    self._items_seen += 1
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
