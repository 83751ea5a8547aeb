"""Dataset store: round trips, commit protocol, crash safety, path safety, verify, readers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from facecorpus.datasets.store import (
    DatasetSchema,
    DatasetWriter,
    FieldSpec,
    PathEscapeError,
    ShardConflictError,
    StoreError,
    open_dataset,
)
from facecorpus.datasets.verify import verify_dataset

SPS = 16  # samples per shard
SPC = 4  # samples per chunk


def make_schema(**kw) -> DatasetSchema:
    fields = {
        "image": FieldSpec((8, 8, 3), "uint8", "srgb"),
        "depth": FieldSpec((8, 8), "float32", "mm"),
        "uv_position": FieldSpec((4, 4, 3), "float64", "mm"),
        "mask": FieldSpec((8, 8, 1), "bool"),
        "landmarks": FieldSpec((5, 2), "int16", "px"),
        "uv_sampling_map": FieldSpec((4, 4, 2), "uint16"),
    }
    return DatasetSchema(fields=fields, samples_per_shard=SPS, samples_per_chunk=SPC,
                         producer="test", config_hash="abc", **kw)


def make_shard(shard: int, n: int = SPS, seed: int | None = None):
    rng = np.random.default_rng(shard if seed is None else seed)
    arrays = {
        "image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
        # NaN, inf, -0.0 and denormals must survive bit-exactly
        "depth": rng.normal(size=(n, 8, 8)).astype(np.float32),
        "uv_position": rng.normal(size=(n, 4, 4, 3)) * 1e3,
        "mask": rng.random((n, 8, 8, 1)) > 0.5,
        "landmarks": rng.integers(-30000, 30000, (n, 5, 2), dtype=np.int16),
        "uv_sampling_map": rng.integers(0, 65536, (n, 4, 4, 2), dtype=np.uint16),
    }
    if n:
        arrays["depth"][0, 0, :4] = [np.nan, np.inf, -0.0, np.float32(1e-42)]
    if shard == 3:  # an all-zero chunk: zarr stores nothing for it
        arrays["mask"][SPC:2 * SPC] = False
    if shard == 7:  # an all-zero field: zarr stores no shard file at all
        arrays["uv_sampling_map"][:] = 0
    manifest = [{"sample_id": f"s{shard}-{i}", "source_uri": f"photos/{shard}/{i}.jpg",
                 "subject_id": f"p{i % 3}", "yaw": float(rng.uniform(-90, 90)),
                 "pitch": 0.0, "roll": 0.0, "split": "train" if i % 4 else "val",
                 "landmark_error": float(rng.uniform(0, 0.1))} for i in range(n)]
    return arrays, manifest


def write_shards(root, shards, n_last: int = SPS):
    w = DatasetWriter(root, make_schema())
    for k, s in enumerate(shards):
        n = n_last if k == len(shards) - 1 else SPS
        arrays, manifest = make_shard(s, n)
        w.write_shard(s, arrays, manifest, key=f"k{s}",
                      rejected=[{"source_uri": f"bad/{s}.jpg", "stage": "detect", "reason": "no face"}])
    return w


def shard_file(root: Path, field: str, shard: int) -> Path:
    nd = len(make_schema().fields[field].shape)
    return root.joinpath(field, "c", str(shard), *["0"] * nd)


# ----------------------------------------------------------------------------- store


@pytest.mark.parametrize("url", ["local", "file", "memory"])
def test_round_trip_bit_exact(tmp_path, url):
    root = {"local": str(tmp_path / "ds"), "file": f"file://{tmp_path}/ds",
            "memory": f"memory://rt-{os.getpid()}-{tmp_path.name}/ds"}[url]
    write_shards(root, [0, 3, 7], n_last=11)  # shard 7 is a partial last shard
    ds = open_dataset(root)
    assert len(ds) == 2 * SPS + 11
    assert ds.rejected.num_rows == 3
    assert sorted(ds.shards) == [0, 3, 7]
    m = ds.manifest
    for col, ty in [("sample_id", pa.string()), ("yaw", pa.float32()), ("shard", pa.int32()),
                    ("row", pa.int32()), ("split", pa.string()), ("index", pa.int64())]:
        assert m.schema.field(col).type == ty
    for s, n in [(0, SPS), (3, SPS), (7, 11)]:
        arrays, manifest = make_shard(s, n)
        idx = s * SPS + np.arange(n)
        assert m.filter(pc.field("shard") == s)["sample_id"].to_pylist() == [r["sample_id"] for r in manifest]
        for name, ref in arrays.items():
            got = ds.read(name, idx)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert got.tobytes() == ref.tobytes(), name  # bit-exact, NaN and -0.0 included
            whole = ds.read_shard(s, [name])[name]
            assert whole.tobytes() == ref.tobytes()
            # zarr's own decoder agrees with our direct shard decoder
            assert ds.array(name)[s * SPS: s * SPS + n].tobytes() == ref.tobytes()
        # scattered reads in arbitrary order (partial chunks, gaps, repeats)
        pick = idx[[n - 1, 0, 5, 5, 2, min(9, n - 1)]]
        for name in ("uv_position", "mask", "uv_sampling_map"):
            ref = arrays[name][pick - s * SPS]
            assert ds.read(name, pick).tobytes() == ref.tobytes()
    assert not shard_file(Path(root.replace("file://", "")), "uv_sampling_map", 7).exists() or url == "memory"
    with pytest.raises(StoreError, match="not a committed sample"):
        ds.read("image", [7 * SPS + 11])
    assert verify_dataset(root).ok


def test_zarr_and_direct_codecs_interoperate(tmp_path):
    """Shards written through zarr's own pipeline read back bit-exactly through our decoder
    (and the round-trip test checks the other direction with zarr's reader)."""
    root = tmp_path / "ds"
    w = DatasetWriter(root, make_schema())
    w._encoders = {name: False for name in w.schema.fields}  # force zarr's writer
    for s in (4, 5, 6):
        w.write_shard(s, *make_shard(s, 13 if s == 5 else SPS))
    ds = open_dataset(root)
    arrays = make_shard(5, 13)[0]
    for name, ref in arrays.items():
        assert ds.read(name, 5 * SPS + np.arange(13)).tobytes() == ref.tobytes()
        assert ds._fast[name] is not False  # the direct decoder did the read
    assert verify_dataset(root).ok
    # rewriting one shard (zarr path, then ours) touches only that shard's files
    files = sorted(p for p in root.rglob("c/*/**/*") if p.is_file())
    assert len(files) == 3 * len(make_schema().fields)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    w.write_shard(5, *make_shard(5, 9, seed=1), overwrite=True)
    DatasetWriter(root, make_schema()).write_shard(5, *make_shard(5, 7, seed=2), overwrite=True)
    for p in files:
        if p.relative_to(root).parts[2] != "5":
            assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p], p
    assert open_dataset(root).read("image", 5 * SPS + np.arange(7)).tobytes() == \
        make_shard(5, 7, seed=2)[0]["image"].tobytes()
    assert verify_dataset(root).ok


def test_identical_rewrite_is_noop_and_conflict_raises(tmp_path):
    root = tmp_path / "ds"
    w = write_shards(root, [2])
    arrays, manifest = make_shard(2)
    before = (root / "manifest" / "shard-000002.parquet").stat().st_mtime_ns
    info = w.write_shard(2, arrays, manifest, key="k2")
    assert info.written is False
    assert (root / "manifest" / "shard-000002.parquet").stat().st_mtime_ns == before
    assert w.committed_shards() == {2: "k2"} and w.is_committed(2, "k2") and not w.is_committed(2, "x")
    other, om = make_shard(2, n=5, seed=99)
    with pytest.raises(ShardConflictError, match="shard 2"):
        w.write_shard(2, other, om, key="k2")
    info = w.write_shard(2, other, om, key="k2b", overwrite=True)
    assert info.written and info.n_samples == 5
    ds = open_dataset(root)
    assert len(ds) == 5 and ds.read("landmarks", np.arange(2 * SPS, 2 * SPS + 5)).tobytes() == other["landmarks"].tobytes()
    # the shorter rewrite left no stale rows behind in the shard file
    assert not ds.array("image")[2 * SPS + 5: 3 * SPS].any()
    assert verify_dataset(root).ok


def test_schema_mismatch_and_bad_input(tmp_path):
    root = tmp_path / "ds"
    w = write_shards(root, [0])
    with pytest.raises(StoreError, match="config_hash"):
        DatasetWriter(root, DatasetSchema(fields=make_schema().fields, samples_per_shard=SPS,
                                          samples_per_chunk=SPC, producer="test", config_hash="zzz"))
    arrays, manifest = make_shard(1)
    with pytest.raises(StoreError, match="field 'image' has per-sample shape"):
        w.write_shard(1, {**arrays, "image": arrays["image"][:, :4]}, manifest)
    with pytest.raises(StoreError, match="cannot be stored losslessly"):
        w.write_shard(1, {**arrays, "landmarks": arrays["landmarks"].astype(np.float32)}, manifest)
    with pytest.raises(StoreError, match="rows for 16 samples"):
        w.write_shard(1, arrays, manifest[:3])
    with pytest.raises(StoreError, match="not unique"):
        w.write_shard(1, arrays, [{**r, "sample_id": "same"} for r in manifest])
    with pytest.raises(StoreError, match="samples_per_shard"):
        w.write_shard(1, {k: np.concatenate([v, v[:1]]) for k, v in arrays.items()}, manifest + manifest[:1])
    assert sorted(w.committed_shards()) == [0]
    # a shard whose every input was rejected still commits (inputs = accepted + rejected)
    empty = {k: v[:0] for k, v in arrays.items()}
    w.write_shard(1, empty, [], rejected=[{"source_uri": "a.jpg", "stage": "fit", "reason": "diverged"}])
    ds = open_dataset(root)
    assert sorted(ds.shards) == [0, 1] and len(ds) == SPS and ds.rejected.num_rows == 2
    assert verify_dataset(root).ok


def test_path_columns_never_escape_root(tmp_path):
    schema = make_schema(path_columns=("asset_path",))
    w = DatasetWriter(tmp_path / "ds", schema)
    arrays, manifest = make_shard(0, 4)
    good = [{**r, "asset_path": f"assets/{i}.png"} for i, r in enumerate(manifest)]
    w.write_shard(0, arrays, good)
    ds = open_dataset(tmp_path / "ds")
    assert ds.resolve("assets/1.png").endswith("ds/assets/1.png")
    for bad in ["../outside.png", "assets/../../x.png", "/etc/passwd", "s3://bucket/x.png",
                "file:///etc/passwd", "C:\\x.png", "..\\x.png"]:
        rows = [dict(r) for r in good]
        rows[2]["asset_path"] = bad
        with pytest.raises(PathEscapeError, match=r"row 2 .*column 'asset_path'"):
            w.write_shard(1, make_shard(1, 4)[0], rows)
        with pytest.raises(PathEscapeError):
            ds.resolve(bad)
    assert sorted(w.committed_shards()) == [0]
    # an undeclared *_path column is checked too
    with pytest.raises(PathEscapeError, match=r"row 1 .*column 'mesh_path'"):
        w.write_shard(1, make_shard(1, 4)[0], [{**r, "mesh_path": ["a.obj", "/abs.obj"][i % 2]}
                                               for i, r in enumerate(make_shard(1, 4)[1])])
    # a tampered manifest part is refused on open and reported by verify
    import pyarrow.parquet as pq

    part = tmp_path / "ds" / "manifest" / "shard-000000.parquet"
    t = pq.read_table(part)
    paths = t["asset_path"].to_pylist()
    paths[3] = "../../../etc/shadow"
    pq.write_table(t.set_column(t.column_names.index("asset_path"), "asset_path", pa.array(paths)), part)
    with pytest.raises(PathEscapeError, match="row 3 .*'asset_path'"):
        open_dataset(tmp_path / "ds")
    rep = verify_dataset(tmp_path / "ds")
    assert any("row 3" in p and "asset_path" in p for p in rep.problems)


def test_verify_reports_every_problem(tmp_path):
    root = tmp_path / "ds"
    write_shards(root, [0, 1, 2])
    assert verify_dataset(root).ok
    # 1) flip bytes in the middle of shard 1's image file (inside a compressed chunk)
    f = shard_file(root, "image", 1)
    b = bytearray(f.read_bytes())
    for k in range(40, 48):
        b[k] ^= 0xFF
    f.write_bytes(bytes(b))
    # 2) corrupt the shard index of shard 2's depth file
    f = shard_file(root, "depth", 2)
    b = bytearray(f.read_bytes())
    b[-10] ^= 0x01
    f.write_bytes(bytes(b))
    # 3) orphan data: shard 5 written but never committed
    w = DatasetWriter(root, make_schema())
    w._array("mask")[5 * SPS: 6 * SPS] = make_shard(5)[0]["mask"]
    # 4) a rejected part count that disagrees with the commit record
    (root / "rejected" / "shard-000000.parquet").unlink()
    rep = verify_dataset(root)
    text = "\n".join(rep.problems)
    assert "shard 1 field 'image'" in text
    assert "shard 2 field 'depth'" in text
    assert "orphan data of uncommitted shard 5" in text
    assert "rejected/shard-000000.parquet: missing" in text
    assert len(rep.problems) == 4, text
    # the reader refuses corrupted chunks loudly instead of returning garbage
    with pytest.raises(StoreError, match="checksum mismatch"):
        open_dataset(root).read_shard(1, ["image"])


def test_two_dask_workers_write_disjoint_shards(tmp_path):
    from distributed import Client, LocalCluster

    root = str(tmp_path / "ds")
    w = DatasetWriter(root, make_schema())  # arrays created once, up front

    def job(writer, s):
        from distributed import get_worker

        arrays, manifest = make_shard(s)
        return writer.write_shard(s, arrays, manifest, key=f"k{s}").shard, get_worker().address

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futs = [client.submit(job, w, s, pure=False) for s in range(6)]
        done = client.gather(futs)
    assert sorted(s for s, _ in done) == list(range(6))
    assert len({addr for _, addr in done}) == 2  # both workers wrote shards
    rep = verify_dataset(root)
    assert rep.ok, rep.problems
    assert rep.n_shards == 6 and rep.n_samples == 6 * SPS
    ds = open_dataset(root)
    for s in range(6):
        assert ds.read_shard(s, ["image"])["image"].tobytes() == make_shard(s)[0]["image"].tobytes()


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_datasets import make_schema, make_shard
    from facecorpus.datasets.store import DatasetWriter

    class Dying(DatasetWriter):
        def _before_commit(self, shard_id):
            if shard_id == 1:  # data complete, manifest not yet written
                os.kill(os.getpid(), signal.SIGKILL)

    w = Dying({root!r}, make_schema())
    for s in range(3):
        arrays, manifest = make_shard(s)
        w.write_shard(s, arrays, manifest, key=f"k{{s}}")
""")


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    root = str(tmp_path / "ds")
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=root)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert shard_file(Path(root), "image", 1).exists()  # its data did land ...
    ds = open_dataset(root)
    assert sorted(ds.shards) == [0] and len(ds) == SPS  # ... but the shard is not visible
    rep = verify_dataset(root)
    assert any("orphan data of uncommitted shard 1" in p for p in rep.problems)
    # as if killed inside the atomic puts too: temp files the rerun must clean up
    shard_file(Path(root), "image", 1).with_name(".0.1234.tmp").write_bytes(b"half")
    (Path(root) / "manifest" / ".shard-000001.parquet.5678.tmp").write_bytes(b"half")
    # rerun: shard 0 is a no-op, 1 and 2 are written
    w = DatasetWriter(root, make_schema())
    written = []
    for s in range(3):
        arrays, manifest = make_shard(s)
        written.append(w.write_shard(s, arrays, manifest, key=f"k{s}").written)
    assert written == [False, True, True]
    rep = verify_dataset(root)
    assert rep.ok, rep.problems
    assert rep.n_samples == 3 * SPS


def test_cli_inspect_and_verify(tmp_path, capsys):
    from facecorpus.cli import main
    from PIL import Image

    root = tmp_path / "ds"
    write_shards(root, [0, 1], n_last=5)
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(root), "--sheet", str(sheet), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "21 accepted, 2 rejected" in out and "detect: no face x2" in out
    for name in make_schema().fields:
        assert f"  {name} " in out
    with Image.open(sheet) as im:  # 3 samples in rows, image-like fields in columns
        assert im.size[1] > 3 * 128 and im.size[0] > 4 * 128
    assert main(["data", "verify", str(root)]) == 0
    assert "2 shards, 21 samples, 2 rejected: OK" in capsys.readouterr().out
    f = shard_file(root, "uv_position", 0)
    b = bytearray(f.read_bytes())
    b[len(b) // 3] ^= 0x55
    f.write_bytes(bytes(b))
    (root / "manifest" / ".shard-000001.parquet.dead.tmp").write_bytes(b"partial")
    shard_file(root, "depth", 1).with_name(".0.dead.tmp").write_bytes(b"partial")
    assert main(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "shard 0 field 'uv_position'" in out and "leftover temp file" in out
    assert "depth/c/1/0/.0.dead.tmp: leftover temp file" in out
    assert "FAILED (3 problems)" in out
    assert main(["data", "verify", str(tmp_path / "nope")]) == 1


@pytest.mark.parametrize("bad", [
    "%2e%2e/x.png", "assets/%2E%2E/%2e%2e/x.png", "%2e%2e%2fx.png", "..%2fx.png", "%252e%252e/x.png",
    "assets%2f..%2f..%2fx.png", "\uff0e\uff0e/x.png", "assets/\u2024\u2024/x.png", ".. /x.png",
    "assets/.../x.png", "a/\x00/b", "a\nb", "\uff0fetc/passwd", "\\\\host\\share\\x", "~/x",
])
def test_encoded_and_unicode_escape_tricks_are_refused(tmp_path, bad):
    schema = make_schema(path_columns=("asset_path",))
    w = DatasetWriter(tmp_path / "ds", schema)
    arrays, manifest = make_shard(0, 4)
    rows = [{**r, "asset_path": f"assets/{i}.png"} for i, r in enumerate(manifest)]
    rows[1]["asset_path"] = bad
    with pytest.raises(PathEscapeError, match=r"row 1 .*column 'asset_path'"):
        w.write_shard(0, arrays, rows)
    assert w.committed_shards() == {}


def test_plain_relative_paths_with_odd_but_safe_names_pass():
    from facecorpus.datasets.store import check_relative_path

    for ok in ["assets/0.png", "a/b/c.d.png", "100%.png", "x..y/z.png", ".hidden/a.png",
               "dir with space/a.png", "\u00e9t\u00e9/caf\u00e9.png", "./a.png"]:
        check_relative_path(ok, column="asset_path", row=0)
