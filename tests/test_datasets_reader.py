"""Torch readers: exactly-once epochs across workers and ranks, shuffling, filters, contents."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from facecorpus.datasets.reader import ShardDataset, ShardIterableDataset
from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec, StoreError
from torch.utils.data import DataLoader

SPS, SPC = 16, 4
SHARDS = {0: 16, 1: 16, 2: 16, 4: 16, 5: 9}  # a gap (shard 3 never written) and a short last shard
N = sum(SHARDS.values())


def sample_image(index: int) -> np.ndarray:
    return np.random.default_rng(index).integers(0, 256, (6, 6, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reader") / "ds")
    schema = DatasetSchema(fields={"image": FieldSpec((6, 6, 3), "uint8"),
                                   "pncc": FieldSpec((6, 6, 3), "uint8"),
                                   "depth": FieldSpec((6, 6), "float32", "mm")},
                           samples_per_shard=SPS, samples_per_chunk=SPC)
    w = DatasetWriter(root, schema)
    for s, n in SHARDS.items():
        idx = s * SPS + np.arange(n)
        img = np.stack([sample_image(int(i)) for i in idx])
        w.write_shard(s, {"image": img, "pncc": 255 - img,
                          "depth": np.broadcast_to(idx[:, None, None], (n, 6, 6)).astype(np.float32)},
                      [{"sample_id": f"x{i}", "yaw": float((i * 37) % 181 - 90),
                        "landmark_error": float(i % 10) / 100} for i in idx])
    return root


def check_item(item):
    i = int(item["index"])
    assert torch.equal(item["image"], torch.from_numpy(sample_image(i)))
    assert torch.equal(item["pncc"], 255 - item["image"])
    assert bool((item["depth"] == i).all())


def epoch_indices(loader) -> list[int]:
    out = []
    for item in loader:
        idx = item["index"]
        out.extend(idx.reshape(-1).tolist())
        for k in range(idx.numel()):
            check_item({key: v[k] if idx.ndim else v for key, v in item.items()})
    return out


def test_iterable_two_workers_exactly_once_per_epoch(root):
    ds = ShardIterableDataset(root, fields=("image", "pncc", "depth"), shuffle=True, seed=3, buffer_size=20)
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    batched = ShardIterableDataset(root, shuffle=True, seed=3, batch_size=8)
    got = list(DataLoader(batched, batch_size=None, num_workers=2))  # shared-memory batches
    assert len(got) == batched.num_batches(2)
    assert Counter(i for b in got for i in b["index"].tolist()) == Counter(
        s * SPS + r for s, n in SHARDS.items() for r in range(n))
    for b in got:
        for k in range(b["index"].shape[0]):
            check_item({key: v[k] for key, v in b.items()})
    all_idx = {s * SPS + r for s, n in SHARDS.items() for r in range(n)}
    orders = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        got = epoch_indices(loader)
        assert Counter(got) == Counter(all_idx)  # every sample exactly once
        orders.append(got)
    assert orders[0] != orders[1]  # a new epoch reshuffles
    ds.set_epoch(0)
    assert epoch_indices(loader) == orders[0]  # (seed, epoch) determines the order


def test_ranks_and_workers_partition_the_epoch(root):
    ds = ShardIterableDataset(root, shuffle=True, seed=1)
    seen = []
    for rank in range(2):
        for worker in range(3):
            plan = ds.plan(rank, 2, worker, 3)
            seen.append([int(ds._index[p]) for _, pos in plan for p in pos])
    sizes = [len(s) for s in seen]
    assert max(sizes) - min(sizes) <= 1  # balanced, so DDP ranks step together
    flat = [i for s in seen for i in s]
    assert len(flat) == N and len(set(flat)) == N
    # explicit rank/world (as under torch.distributed) + in-process iteration
    got = []
    for rank in range(2):
        r = ShardIterableDataset(root, shuffle=True, seed=1, buffer_size=7, rank=rank, world_size=2)
        assert len(r) == r.num_samples() in (N // 2, N - N // 2)
        items = list(r)
        for it in items:
            check_item(it)
        got.extend(int(it["index"]) for it in items)
    assert sorted(got) == sorted(flat)


def test_unshuffled_order_and_batched_mode(root):
    plain = [int(it["index"]) for it in ShardIterableDataset(root, shuffle=False)]
    assert plain == sorted(plain) and len(plain) == N
    threaded = ShardIterableDataset(root, shuffle=False, decode_threads=3)
    assert [int(it["index"]) for it in threaded] == plain  # decode-ahead keeps the order
    ds = ShardIterableDataset(root, shuffle=True, seed=5, batch_size=10, columns=("yaw", "sample_id"),
                              decode_threads=2)
    batches = list(DataLoader(ds, batch_size=None, num_workers=0))
    assert len(ds) == len(batches) == ds.num_batches(0)
    assert [b["index"].shape[0] for b in batches] == [10] * (N // 10) + ([N % 10] if N % 10 else [])
    assert batches[0]["image"].shape == (10, 6, 6, 3) and batches[0]["image"].dtype == torch.uint8
    assert batches[0]["yaw"].dtype == torch.float32 and isinstance(batches[0]["sample_id"], list)
    idx = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(idx) == plain and idx != plain
    for b in batches:
        assert b["sample_id"] == [f"x{i}" for i in b["index"].tolist()]
        for k in range(b["index"].shape[0]):
            check_item({key: v[k] for key, v in b.items() if key != "sample_id"})
    ds_drop = ShardIterableDataset(root, shuffle=False, batch_size=10, drop_last=True)
    assert sum(b["index"].shape[0] for b in ds_drop) == N // 10 * 10


def test_filters(root):
    expr = (pc.abs(pc.field("yaw")) <= 30) & (pc.field("landmark_error") < 0.05)
    want = sorted(s * SPS + r for s, n in SHARDS.items() for r in range(n)
                  if abs((s * SPS + r) * 37 % 181 - 90) <= 30 and (s * SPS + r) % 10 < 5)
    assert 0 < len(want) < N
    it = ShardIterableDataset(root, filter=expr, shuffle=True, columns=("yaw",))
    got = list(it)
    assert sorted(int(x["index"]) for x in got) == want
    assert all(abs(float(x["yaw"])) <= 30 for x in got)
    mp = ShardDataset(root, fields=("image",), filter=expr)
    assert mp.indices.tolist() == want
    assert [int(mp[k]["index"]) for k in range(len(mp))] == want
    with pytest.raises(StoreError, match="unknown fields"):
        ShardDataset(root, fields=("uv_texture",))


def test_map_style_with_workers(root):
    ds = ShardDataset(root, columns=("yaw",))
    assert len(ds) == N
    loader = DataLoader(ds, batch_size=7, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    got = []
    for b in loader:
        got.extend(b["index"].tolist())
        for k in range(b["index"].shape[0]):
            check_item({key: v[k] for key, v in b.items()})
    assert Counter(got) == Counter(ds.indices.tolist())
    with pytest.raises(IndexError):
        ds[N]


def test_rank_and_world_come_from_torch_distributed(root, monkeypatch):
    """With a process group initialised, the reader takes its slice from get_rank/world."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    got = {}
    for rank in range(2):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        ds = ShardIterableDataset(root, shuffle=True, seed=4)
        got[rank] = [int(it["index"]) for it in ds]
        explicit = ShardIterableDataset(root, shuffle=True, seed=4, rank=rank, world_size=2)
        monkeypatch.undo()
        assert got[rank] == [int(it["index"]) for it in explicit]
    assert not set(got[0]) & set(got[1]) and len(got[0]) + len(got[1]) == N
