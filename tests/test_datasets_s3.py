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
SECRET = "fc-s3-secret-" + uuid.uuid4().hex


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
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # distinctive: grepped for in what runs write
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


# --------------------------------------------------------------------------- both flows on s3
# A CLI run in a child process that SIGKILLs itself when the second commit of ``dataset``
# starts (the first shard is committed, the second's data may have landed). The child uses the
# parent's code digest: the keys must not change between the two processes because someone
# edited the working tree meanwhile (the code is the same; only the digest is computed twice).
KILLED_CLI = textwrap.dedent("""
    import os, signal, sys
    from facecorpus.core import hashing
    from facecorpus.datasets import store
    hashing._SOURCE[hashing.source_digest.__defaults__[0]] = sys.argv[1]
    dataset, seen, real = sys.argv[2], [0], store.DatasetWriter._before_commit

    def hook(self, shard_id):
        if self.url.rstrip("/").endswith("/" + dataset):
            seen[0] += 1
            if seen[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        real(self, shard_id)

    store.DatasetWriter._before_commit = hook
    from facecorpus.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def run_killed(dataset: str, args: list[str]) -> subprocess.CompletedProcess:
    from facecorpus.core import hashing

    proc = subprocess.run([sys.executable, "-c", KILLED_CLI, hashing.source_digest(), dataset,
                           *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (relative key -> bytes)."""
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    base = url.split("://", 1)[1].rstrip("/")
    return {k[len(base) + 1:]: fs.cat_file(k) for k in fs.find(base)}


def s3_json(url: str) -> dict:
    import json

    import s3fs

    return json.loads(s3fs.S3FileSystem(use_listings_cache=False).cat_file(url.split("://", 1)[1]))


def no_secret(*texts) -> None:
    for t in texts:
        b = t if isinstance(t, bytes) else str(t).encode()
        assert SECRET.encode() not in b


def data_objects(objs: dict[str, bytes], *datasets: str) -> dict[str, bytes]:
    """A dataset's own objects (arrays, manifest, rejected, schema), not run files."""
    return {k: v for k, v in objs.items() if k.split("/", 1)[0] in datasets}


def readers_give_stored_values(root: str, field: str) -> None:
    """Both torch readers deliver every committed sample once, with the stored values."""
    import torch
    from facecorpus.datasets.reader import ShardDataset, ShardIterableDataset
    from torch.utils.data import DataLoader

    ds = open_dataset(root)
    want = sorted(ds.manifest.column("index").to_pylist())
    assert want
    got = []
    for batch in DataLoader(ShardDataset(root, fields=(field,), columns=("sample_id",)),
                            batch_size=2, shuffle=True):
        idx = batch["index"].numpy()
        assert torch.equal(batch[field], torch.from_numpy(ds.read(field, idx)))
        got += idx.tolist()
    assert sorted(got) == want
    got = []
    it = ShardIterableDataset(root, fields=(field,), shuffle=True, seed=3, batch_size=3,
                              verify_checksums=True)
    for batch in DataLoader(it, batch_size=None):
        idx = batch["index"].numpy()
        assert torch.equal(batch[field], torch.from_numpy(ds.read(field, idx)))
        got += idx.tolist()
    assert sorted(got) == want


PGT_SMALL = {"model": "procedural", "output.samples_per_shard": 2, "unwrap.uv_size": 64,
             "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
             "prior.pca_rank": 0, "prior.kind": "corpus", "workers": 1,
             "task_runner": "threads", "retries": 0, "landmarks.crop_size": 224}


@pytest.mark.slow
def test_pseudo_gt_cli_writes_to_s3_resumes_and_reruns_nothing(s3, tmp_path, capfd,
                                                                monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from facecorpus.cli import main
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # a local-path slip would land here as a folder "s3:"
    sb = synthetic_batch(procedural_model(n=41), 5, 200, seed=3, yaw_max=35, fill=0.6)
    src = tmp_path / "photos"
    src.mkdir()
    rows = []
    for i, a in enumerate((np.clip(sb.image, 0, 1) * 255 + 0.5).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        (src / f"face{i}.png").write_bytes(buf.getvalue())
        rows.append({"source_uri": f"face{i}.png", "landmarks": sb.landmarks[i].reshape(-1).tolist()})
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), src / "inputs.parquet")
    out = f"{fresh(s3)}/pgt"
    args = ["run", "pseudo-gt", "--input", str(src / "inputs.parquet"), "--out", out, "--no-prefect"]
    for k, v in PGT_SMALL.items():
        args += ["--set", f"{k}={v}"]

    killed = run_killed("dataset", args)  # 3 shards of 2, 2, 1 photos; dies in shard 1's commit
    no_secret(killed.stdout, killed.stderr)
    assert sorted(open_dataset(f"{out}/dataset").shards) == [0]
    first = data_objects(objects(out), "dataset")

    assert main(args) == 0
    s = s3_json(f"{out}/summary.json")
    assert s["shards_run_ids"] == [1, 2] and s["shards_skipped"] == 1, s["shards_run_why"]
    assert s["inputs"] == 5 and s["counts_add_up"] and s["shards_committed"] == 3
    objs = objects(out)
    for k, v in first.items():  # the shard committed before the kill was not rewritten
        if "/c/0/" in k or k.endswith("shard-000000.parquet"):
            assert objs[k] == v, k
    for k in ("_work/membership.json", "prior/current.json", "_stats/shard-000002.json",
              "sheets/shard-00002.png", "dataset/uv_regions.npz"):
        assert k in objs, sorted(objs)
    assert sum(k.startswith("_work/analysis-") for k in objs) == 3
    assert s["sheets"] == [f"{out}/sheets/shard-{i:05d}.png" for i in range(3)]

    assert main(["data", "verify", f"{out}/dataset"]) == 0
    readers_give_stored_values(f"{out}/dataset", "uv_pseudo_gt")

    assert main(args) == 0  # nothing to do: every object but the summary stays as it was
    s = s3_json(f"{out}/summary.json")
    assert s["shards_run"] == 0 and s["shards_skipped"] == 3
    again = objects(out)
    assert {k: v for k, v in again.items() if k != "summary.json"} == \
        {k: v for k, v in objs.items() if k != "summary.json"}
    assert not list(tmp_path.glob("s3*"))
    captured = capfd.readouterr()
    no_secret(captured.out, captured.err, *again.values())


SYN_SMALL = {"kind": "synthesis", "model": "procedural", "seed": 11,
             "subjects": {"n_random": 10, "n_groups": 2, "texture_size": 32},
             "augment": {"n_faces": 6, "group_ratios": {"g0": 0.5, "g1": 0.5}},
             "poses": {"yaw_step": 30.0},
             "output": {"image_size": 48, "uv_size": 32, "faces_per_shard": 2}}


@pytest.mark.slow
def test_synthesis_cli_writes_to_s3_like_a_local_run(s3, tmp_path, capfd, monkeypatch):
    import yaml
    from facecorpus.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "syn.yaml"
    cfg.write_text(yaml.safe_dump(SYN_SMALL))
    out = f"{fresh(s3)}/syn"

    def args(o):
        return ["run", "synthesis", "--config", str(cfg), "--out", str(o), "--no-prefect"]

    killed = run_killed("views", args(out))  # shard 0 committed; dies in shard 1's views commit
    no_secret(killed.stdout, killed.stderr)
    assert sorted(open_dataset(f"{out}/views").shards) == [0]
    assert main(args(out)) == 0
    s = s3_json(f"{out}/summary.json")
    assert s["shards_run_ids"] == [1, 2] and s["shards_skipped"] == 1, s["shards_run_why"]
    assert s["pairs"] == 6 * 7 and s["faces"] == 6
    # the DR-encoded sources are memory-mapped from this machine's cache, not the bucket
    assert len(list((tmp_path / "cache" / "sources").glob("*/done.json"))) == 1
    assert not list(tmp_path.glob("s3*"))

    local = tmp_path / "local"
    assert main(args(local)) == 0
    objs = objects(out)
    remote = data_objects(objs, "views", "faces")
    here = {str(p.relative_to(local)): p.read_bytes() for sub in ("views", "faces")
            for p in (local / sub).rglob("*") if p.is_file()}
    assert remote == here  # killed + resumed on s3 == one local run, byte for byte
    for d in ("views", "faces"):
        assert main(["data", "verify", f"{out}/{d}"]) == 0
    readers_give_stored_values(f"{out}/views", "image")

    assert main(args(out)) == 0
    s = s3_json(f"{out}/summary.json")
    assert s["shards_run"] == 0 and s["shards_skipped"] == 3
    again = objects(out)
    assert {k: v for k, v in again.items() if k != "summary.json"} == \
        {k: v for k, v in objs.items() if k != "summary.json"}
    captured = capfd.readouterr()
    no_secret(captured.out, captured.err, *again.values())


# --------------------------------------------------------------------------- interop on s3
@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_readme_bucket_block_runs_as_written(s3, capsys):
    """duckdb (s3fs registered), polars and xarray/zarr on the bucket: the README's block."""
    import re

    pytest.importorskip("duckdb")
    pytest.importorskip("polars")
    pytest.importorskip("xarray")
    root = fresh(s3)
    w = DatasetWriter(root, schema())
    for s, n in ((0, SPS), (2, SPS), (3, 5)):  # a gap and a short last shard
        a, rows = shard_data(s, n)
        for r in rows:  # yaws over the whole range, so the filter drops some rows
            r["yaw"] = float((int(r["sample_id"][1:]) * 7 % 13 - 6) * 10)
        w.write_shard(s, a, rows, key=f"k{s}")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Object stores and interop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    block = next(b for b in blocks if "s3://" in b)
    line = 'root = "s3://my-bucket/runs/pseudo_gt/dataset"'
    assert line in block
    env: dict = {}
    exec(block.replace(line, f"root = {root!r}"), env)  # noqa: S102
    ds = open_dataset(root)
    m = ds.manifest
    yaw, split = m["yaw"].to_numpy(), np.asarray(m["split"].to_pylist())
    want = {sp: int(((np.abs(yaw) <= 30) & (split == sp)).sum()) for sp in np.unique(split)}
    assert 0 < sum(want.values()) < m.num_rows and all(want.values())
    out = capsys.readouterr().out
    for sp, n in want.items():
        assert f"('{sp}', {n})" in out  # duckdb's rows
        assert re.search(rf"│ {sp}\s+┆ {n}\s+│", out)  # polars' table
    order = env["index"].to_series().to_numpy()
    assert sorted(order.tolist()) == sorted(m["index"].to_pylist())
    assert np.array_equal(env["images"], ds.read("image", order))
    assert order.size == 2 * SPS + 5
