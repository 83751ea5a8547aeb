"""The dataset layer on a real S3-compatible server (moto's, started on 127.0.0.1 by the test).

Everything goes through plain ``s3://bucket/...`` URLs with no storage options: the endpoint
and the (fake) credentials come from the standard AWS environment variables, which is how a
user points a run at a bucket. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")

from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec, open_dataset  # noqa: E402
from facecorpus.datasets.verify import verify_dataset  # noqa: E402

SPS, SPC = 8, 4
BUCKET = "facecorpus-test"


def schema() -> DatasetSchema:
    return DatasetSchema(fields={"image": FieldSpec((6, 6, 3), "uint8", "srgb"),
                                 "depth": FieldSpec((6, 6), "float32", "mm")},
                         samples_per_shard=SPS, samples_per_chunk=SPC, producer="s3-test")


def shard_data(s: int, n: int = SPS):
    """Shard ``s``: every value derived from the global sample index (checked on read)."""
    idx = s * SPS + np.arange(n)
    img = (idx[:, None, None, None] * 7 + np.arange(6 * 6 * 3).reshape(1, 6, 6, 3)) % 251
    arrays = {"image": img.astype(np.uint8),
              "depth": np.broadcast_to(idx[:, None, None], (n, 6, 6)).astype(np.float32)}
    manifest = [{"sample_id": f"s{i}", "yaw": float(i % 90), "split": "val" if i % 5 == 0 else "train"}
                for i in idx]
    return arrays, manifest


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (random port) and the AWS variables that point at it;
    the server is stopped and the variables restored afterwards."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    mp = pytest.MonkeyPatch()
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        mp.delenv(k)  # never a real profile or key
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    import s3fs

    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        mp.undo()


def fresh(s3: str) -> str:
    return f"{s3}/{uuid.uuid4().hex[:8]}/dataset"


def check_both_readers(root: str, shards: list[int]) -> None:
    import torch
    from facecorpus.datasets.reader import ShardDataset, ShardIterableDataset
    from torch.utils.data import DataLoader

    want = sorted(s * SPS + r for s in shards for r in range(SPS))
    mapped = ShardDataset(root, columns=("sample_id",))
    got = []
    for batch in DataLoader(mapped, batch_size=5, shuffle=True):
        idx = batch["index"]
        assert torch.equal(batch["depth"][:, 0, 0], idx.float())
        assert batch["sample_id"] == [f"s{i}" for i in idx.tolist()]
        got += idx.tolist()
    assert sorted(got) == want
    it = ShardIterableDataset(root, shuffle=True, seed=1, batch_size=6, buffer_size=10)
    got = []
    for batch in DataLoader(it, batch_size=None):
        idx = batch["index"]
        s, r = np.divmod(idx.numpy(), SPS)
        for k in range(idx.numel()):
            a, _ = shard_data(int(s[k]))
            assert np.array_equal(batch["image"][k].numpy(), a["image"][r[k]])
        got += idx.tolist()
    assert sorted(got) == want


def test_write_verify_read_on_s3(s3, tmp_path):
    from facecorpus.datasets.reader import ShardIterableDataset

    root = fresh(s3)
    w = DatasetWriter(root, schema())
    for s in (0, 1, 3):
        a, m = shard_data(s)
        w.write_shard(s, a, m, key=f"k{s}",
                      rejected=[{"source_uri": f"photos/{s}.jpg", "stage": "detect", "reason": "no face"}])
    rep = verify_dataset(root)
    assert rep.ok, rep.problems
    assert (rep.n_shards, rep.n_samples, rep.n_rejected) == (3, 3 * SPS, 3)
    ds = open_dataset(root)
    assert sorted(ds.shards) == [0, 1, 3] and ds.rejected.num_rows == 3
    assert ds.read_shard(3)["image"].tobytes() == shard_data(3)[0]["image"].tobytes()
    check_both_readers(root, [0, 1, 3])
    # through a local cache: the second epoch reads no shard object from the server
    it = ShardIterableDataset(root, shuffle=True, batch_size=4, cache_dir=tmp_path / "cache",
                              cache_max_bytes=1 << 20, verify_checksums=True)
    for _ in range(2):
        assert sorted(i for b in it for i in b["index"].tolist()) == [i for s in (0, 1, 3)
                                                                      for i in range(s * SPS, (s + 1) * SPS)]
    n_files = 2 * 3  # two fields x three shards
    assert (it.store.cache.misses, it.store.cache.hits) == (n_files, n_files)
    # a corrupted object is found by verify and refused by the reader
    import s3fs

    fs = s3fs.S3FileSystem()
    key = root.split("://", 1)[1] + "/image/c/1/0/0/0"
    b = bytearray(fs.cat_file(key))
    b[5] ^= 0xFF
    fs.pipe_file(key, bytes(b))
    rep = verify_dataset(root)
    assert [p for p in rep.problems if "shard 1 field 'image'" in p], rep.problems


KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_datasets_s3 import schema, shard_data
    from facecorpus.datasets.store import DatasetWriter

    class Dying(DatasetWriter):
        def _before_commit(self, shard_id):
            if shard_id == 1:  # data objects written, manifest part not yet
                os.kill(os.getpid(), signal.SIGKILL)

    w = Dying({root!r}, schema())
    for s in range(3):
        a, m = shard_data(s)
        w.write_shard(s, a, m, key=f"k{{s}}")
""")


@pytest.mark.slow
def test_killed_writer_resumes_on_s3(s3):
    root = fresh(s3)
    proc = subprocess.run([sys.executable, "-c", KILL.format(tests=str(Path(__file__).parent), root=root)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ds = open_dataset(root)
    assert sorted(ds.shards) == [0]  # shard 1's data landed but it is not committed
    rep = verify_dataset(root)
    assert any("orphan data of uncommitted shard 1" in p for p in rep.problems), rep.problems
    w = DatasetWriter(root, schema())
    written = [w.write_shard(s, *shard_data(s), key=f"k{s}").written for s in range(3)]
    assert written == [False, True, True]
    rep = verify_dataset(root)
    assert rep.ok, rep.problems
    assert rep.n_samples == 3 * SPS


@pytest.mark.slow
def test_two_dask_worker_processes_write_disjoint_shards_to_s3(s3):
    from distributed import Client, LocalCluster

    root = fresh(s3)
    w = DatasetWriter(root, schema())  # arrays created once, in the driver
    w.write_shard(6, *shard_data(6), key="k6")
    assert list(w.committed_shards()) == [6]  # the driver has listed manifest/ before the workers write

    def job(writer, s):  # pickled by value: the workers need not import this test module
        import os

        import numpy as np

        idx = s * writer.schema.samples_per_shard + np.arange(writer.schema.samples_per_shard)
        img = (idx[:, None, None, None] * 7 + np.arange(108).reshape(1, 6, 6, 3)) % 251
        arrays = {"image": img.astype(np.uint8),
                  "depth": np.broadcast_to(idx[:, None, None], (idx.size, 6, 6)).astype(np.float32)}
        rows = [{"sample_id": f"s{i}", "yaw": float(i % 90)} for i in idx]
        return writer.write_shard(s, arrays, rows, key=f"k{s}").shard, os.getpid()

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        done = client.gather([client.submit(job, w, s, pure=False) for s in range(6)])
    assert sorted(s for s, _ in done) == list(range(6))
    assert len({pid for _, pid in done}) == 2 and os.getpid() not in {pid for _, pid in done}
    # the driver sees the workers' commits (no stale object-store listing)
    assert sorted(w.committed_shards()) == list(range(7))
    assert w.is_committed(3, "k3")
    rep = verify_dataset(root)
    assert rep.ok, rep.problems
    assert (rep.n_shards, rep.n_samples) == (7, 7 * SPS)
    check_both_readers(root, list(range(7)))
