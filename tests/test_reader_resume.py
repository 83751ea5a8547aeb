"""Mid-epoch resume of ShardIterableDataset: state_dict() after k batches, load_state_dict()
in a fresh reader and DataLoader, and the rest of the epoch is exactly the uninterrupted rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.datasets.reader import ShardIterableDataset
from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec, StoreError
from torch.utils.data import DataLoader

SPS, SPC = 16, 4
SHARDS = {0: 16, 1: 16, 2: 11, 4: 16, 5: 16, 6: 7}
N = sum(SHARDS.values())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume") / "ds")
    w = DatasetWriter(root, DatasetSchema(fields={"image": FieldSpec((4, 4, 3), "uint8")},
                                          samples_per_shard=SPS, samples_per_chunk=SPC))
    for s, n in SHARDS.items():
        idx = s * SPS + np.arange(n)
        w.write_shard(s, {"image": (idx[:, None, None, None] % 251 + np.zeros((1, 4, 4, 3))).astype(np.uint8)},
                      [{"sample_id": f"x{i}"} for i in idx])
    return root


def make(root, rank, batched=True):
    return ShardIterableDataset(root, shuffle=True, seed=5, buffer_size=12, rank=rank, world_size=2,
                                batch_size=5 if batched else None)


def loader(ds, workers, batched=True):
    # forkserver, as the trainer does: forking a pytest process that earlier tests left with
    # Prefect/zarr threads can kill the workers
    return DataLoader(ds, batch_size=None if batched else 3, num_workers=workers,
                      multiprocessing_context="forkserver" if workers else None)


def batches(dl, limit=None) -> list[list[int]]:
    out = []
    for b in dl:
        idx = b["index"]
        assert torch.equal(b["image"][:, 0, 0, 0], (idx % 251).to(torch.uint8))  # data travels with its index
        out.append(idx.tolist())
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("batched", [True, False])
def test_resume_two_workers_two_ranks_same_order_exactly_once(root, batched):
    full, everything = {}, []
    for rank in (0, 1):
        ds = make(root, rank, batched)
        ds.set_epoch(3)
        full[rank] = batches(loader(ds, 2, batched))
        everything += [i for b in full[rank] for i in b]
    assert sorted(everything) == sorted(s * SPS + r for s, n in SHARDS.items() for r in range(n))
    n_batches = len(full[0])
    # k = 0, mid-epoch (odd, so worker 1 is next), and late: one worker already exhausted
    for k in (0, 3, n_batches - 1):
        union = []
        for rank in (0, 1):
            ds = make(root, rank, batched)
            ds.set_epoch(3)
            dl = loader(ds, 2, batched)
            head = batches(dl, k) if k else []
            state = ds.state_dict(batches=k, loader=dl)
            fresh = make(root, rank, batched)
            fresh.load_state_dict(state)
            tail = batches(loader(fresh, 2, batched))
            assert head + tail == full[rank], (rank, k)
            union += [i for b in head + tail for i in b]
        assert sorted(union) == sorted(everything) and len(union) == N


def test_resume_twice_and_without_workers(root):
    ds = make(root, 0)
    ds.set_epoch(1)
    full = batches(loader(ds, 2))
    ds = make(root, 0)
    ds.set_epoch(1)
    got = batches(loader(ds, 2), 2)
    state = ds.state_dict(batches=2, loader=loader(ds, 2))
    ds = make(root, 0)
    ds.load_state_dict(state)
    dl = loader(ds, 2)
    got += batches(dl, 3)
    state = ds.state_dict(batches=3, loader=dl)  # a resumed run saved again
    ds = make(root, 0)
    ds.load_state_dict(state)
    got += batches(loader(ds, 2))
    assert got == full
    # in-process iteration counts its own items
    ds = make(root, 1, batched=False)
    ds.set_epoch(2)
    items = [int(x["index"]) for x in ds]
    ds = make(root, 1, batched=False)
    ds.set_epoch(2)
    it = iter(ds)
    head = [int(next(it)["index"]) for _ in range(17)]
    state = ds.state_dict()
    ds = make(root, 1, batched=False)
    ds.load_state_dict(state)
    assert head + [int(x["index"]) for x in ds] == items
    ds.set_epoch(3)  # another epoch: the resume no longer applies
    assert len([x for x in ds]) == len(items)


def test_resume_refuses_a_different_setup(root):
    ds = make(root, 0)
    dl = loader(ds, 2)
    batches(dl, 2)
    state = ds.state_dict(batches=2, loader=dl)
    other = ShardIterableDataset(root, shuffle=True, seed=6, buffer_size=12, rank=0, world_size=2, batch_size=5)
    with pytest.raises(StoreError, match="seed"):
        other.load_state_dict(state)
    fresh = make(root, 0)
    fresh.load_state_dict(state)
    with pytest.raises(StoreError, match="same ranks and num_workers"):
        batches(loader(fresh, 0))
    with pytest.raises(StoreError, match="batches consumed"):
        make(root, 0).state_dict(batches=10_000, loader=dl)
