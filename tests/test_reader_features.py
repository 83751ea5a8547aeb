"""Per-shard sha256 on first read, and the size-limited local cache of remote shard files."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pytest
from facecorpus.datasets.reader import ShardDataset, ShardIterableDataset
from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec, StoreError, open_dataset

SPS, SPC = 16, 4


def write(root, shards=range(4), overwrite=False, salt=0):
    w = DatasetWriter(root, DatasetSchema(fields={"image": FieldSpec((6, 6, 3), "uint8")},
                                          samples_per_shard=SPS, samples_per_chunk=SPC))
    for s in shards:
        rng = np.random.default_rng(100 * salt + s)
        w.write_shard(s, {"image": rng.integers(0, 256, (SPS, 6, 6, 3), dtype=np.uint8)},
                      [{"sample_id": f"x{s}-{i}"} for i in range(SPS)], key=f"k{s}-{salt}",
                      overwrite=overwrite)
    return w


def image(s, salt=0):
    return np.random.default_rng(100 * salt + s).integers(0, 256, (SPS, 6, 6, 3), dtype=np.uint8)


def test_checksum_on_first_read_catches_decodable_but_wrong_data(tmp_path):
    root = tmp_path / "ds"
    write(root)
    # shard 2's file put in place of shard 1's: valid zstd + crc32c, the wrong samples
    f1, f2 = (root / "image" / "c" / str(s) / "0" / "0" / "0" for s in (1, 2))
    shutil.copyfile(f2, f1)
    assert np.array_equal(open_dataset(root).read_shard(1)["image"], image(2))  # unnoticed by default
    ds = open_dataset(root, verify_checksums=True)
    assert np.array_equal(ds.read_rows("image", 0, 3, 9), image(0)[3:9])  # shard 0 is sound
    with pytest.raises(StoreError, match="shard 1: sha256"):
        ds.read_rows("image", 1, 0, 4)
    with pytest.raises(StoreError, match="shard 1: sha256"):
        list(ShardIterableDataset(root, shuffle=False, batch_size=8, verify_checksums=True))
    with pytest.raises(StoreError, match="shard 1: sha256"):
        ShardDataset(root, verify_checksums=True).__getitems__([SPS + 3])
    assert len(ShardDataset(root, verify_checksums=True).__getitems__([0, 2 * SPS, 3 * SPS])) == 3


def test_remote_shard_cache_is_bounded_lru_and_never_stale(tmp_path):
    root = f"memory://{uuid.uuid4().hex}/ds"  # a non-local filesystem, as an object store is
    write(root)
    cache = tmp_path / "cache"
    one = len(open_dataset(root).root.fs.cat_file(f"{root}/image/c/0/0/0/0"))
    limit = int(2.5 * one)  # room for two shard files
    ds = open_dataset(root, cache_dir=cache, cache_max_bytes=limit)
    for s in range(4):
        assert np.array_equal(ds.read_shard(s)["image"], image(s))
        assert ds.cache.size() <= limit
    assert (ds.cache.misses, ds.cache.hits) == (4, 0)
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(files) == 2
    # the two most recent (shards 2, 3) stay: hits; shard 0 was evicted: a miss
    for s in (3, 2, 0):
        assert np.array_equal(ds.read("image", s * SPS + np.arange(SPS)), image(s))
    assert (ds.cache.misses, ds.cache.hits) == (5, 2)
    # a rewritten shard is a new cache entry: the old bytes are never served
    write(root, shards=[2], overwrite=True, salt=1)
    ds2 = open_dataset(root, cache_dir=cache, cache_max_bytes=limit)
    assert np.array_equal(ds2.read_shard(2)["image"], image(2, salt=1))
    # both readers, through DataLoader-style pickling, with the cache
    got = [b["index"] for b in ShardIterableDataset(root, shuffle=True, batch_size=5, cache_dir=cache,
                                                     cache_max_bytes=limit)]
    assert sorted(np.concatenate(got).tolist()) == list(range(4 * SPS))
    # an entry evicted by another process between listing and reading is fetched again
    for p in cache.rglob("*"):
        if p.is_file():
            p.unlink()
    assert np.array_equal(ds2.read_shard(3)["image"], image(3))


@pytest.mark.parametrize("keep", ["batches", "views"])
def test_pooled_worker_buffers_never_overwrite_batches_still_held(tmp_path, keep):
    """Workers refill shared-memory buffers only once the main process dropped them: batches
    (or views into them) kept for the whole epoch still hold their own samples at the end."""
    import torch
    from torch.utils.data import DataLoader

    root = tmp_path / "ds"
    write(root, shards=range(5))
    ds = ShardIterableDataset(root, shuffle=True, seed=2, batch_size=1, buffer_size=8)
    kept = []
    # 40 batches per worker > the pool; forkserver: the suite's Prefect threads break fork
    for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="forkserver"):
        kept.append(b if keep == "batches" else {"index": b["index"].clone(), "image": b["image"][:1]})
        del b
    assert sorted(int(b["index"]) for b in kept) == list(range(5 * SPS))
    for b in kept:
        s, r = divmod(int(b["index"]), SPS)
        assert torch.equal(b["image"][0], torch.from_numpy(image(s)[r]))


def test_rows_read_into_arena_slots_equal_plain_reads(tmp_path):
    """``read_rows_into`` (the shuffle buffer's fill) gives the bytes of ``read``: any
    ascending rows, scattered slots, float fields, all-zero chunks zarr does not store, a
    shard with no file at all, and through the first-read checksum path."""
    root = tmp_path / "ds"
    w = DatasetWriter(root, DatasetSchema(fields={"image": FieldSpec((6, 6, 3), "uint8"),
                                                  "depth": FieldSpec((5,), "float32")},
                                          samples_per_shard=SPS, samples_per_chunk=SPC))
    rng = np.random.default_rng(7)
    for s in range(3):
        img = rng.integers(1, 256, (SPS, 6, 6, 3), dtype=np.uint8)
        dep = rng.normal(size=(SPS, 5)).astype(np.float32)
        if s == 1:
            img[SPC:2 * SPC] = 0  # one all-fill chunk
        if s == 2:
            img[:] = 0  # an all-fill shard: zarr writes no file for it
        w.write_shard(s, {"image": img, "depth": dep}, [{"sample_id": f"{s}-{i}"} for i in range(SPS)])
    assert not (root / "image" / "c" / "2" / "0" / "0" / "0").exists()
    for verify in (False, True):
        ds = open_dataset(root, verify_checksums=verify)
        for name in ("image", "depth"):
            for s in range(3):
                for rows in (np.arange(SPS), np.array([0, 3, 5, 6, 7, 13]), np.array([9])):
                    spec = ds.schema.fields[name]
                    arena = np.full((40, *spec.shape), 77, spec.dtype)  # stale data everywhere
                    slots = rng.permutation(40)[:rows.size]
                    ds.read_rows_into(name, s, rows, arena, slots)
                    want = ds.read(name, s * SPS + rows)
                    assert np.array_equal(arena[slots], want), (name, s, rows)
                    untouched = np.setdiff1d(np.arange(40), slots)
                    assert (arena[untouched] == 77).all()


def test_shuffled_batches_are_the_same_with_decode_threads(tmp_path):
    root = tmp_path / "ds"
    write(root, shards=range(6))
    runs = []
    for threads in (1, 3):
        it = ShardIterableDataset(root, shuffle=True, seed=5, batch_size=7, buffer_size=20,
                                  decode_threads=threads)
        runs.append([{k: v.clone() for k, v in b.items()} for b in it])
    a, b = runs
    assert len(a) == len(b) and sum(x["index"].numel() for x in a) == 6 * SPS
    for x, y in zip(a, b, strict=True):
        assert x["index"].tolist() == y["index"].tolist()
        assert np.array_equal(x["image"].numpy(), y["image"].numpy())
    idx = np.concatenate([x["index"].numpy() for x in a])
    assert sorted(idx.tolist()) == list(range(6 * SPS))
    got = np.concatenate([x["image"].numpy() for x in a])
    want = np.concatenate([image(s) for s in range(6)])
    assert np.array_equal(got, want[idx])
