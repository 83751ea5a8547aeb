"""The pseudo-GT flow end to end: bad inputs are rejected with reasons while the flow
completes and the counts add up; a run stopped half-way resumes without recomputing
finished shards; the dataset verifies."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecorpus.flows import pseudo_gt as P
from PIL import Image

SMALL = {"model": "procedural", "output.samples_per_shard": 3, "unwrap.uv_size": 64,
         "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
         "prior.pca_rank": 0, "workers": 2, "task_runner": "threads", "retries": 0,
         "landmarks.crop_size": 224}


def _png(a) -> bytes:
    buf = io.BytesIO()
    (a if isinstance(a, Image.Image) else Image.fromarray(a)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def faces():
    """Three faces rendered from the procedural model (200 px) and their landmarks."""
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch

    sb = synthetic_batch(procedural_model(n=41), 3, 200, seed=7, yaw_max=40, fill=0.6)
    imgs = (np.clip(sb.image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return imgs, sb.landmarks


def make_inputs(folder, faces, bad=True):
    """Good faces (landmarks given in a Parquet list) plus every bad input of the issue."""
    imgs, lms = faces
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, lm) in enumerate(zip(imgs, lms, strict=True)):
        (folder / f"face{i}.png").write_bytes(_png(im))
        rows.append({"source_uri": f"face{i}.png", "landmarks": lm.reshape(-1).tolist()})
    expected = {}
    if bad:
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        jpg = io.BytesIO()
        Image.fromarray(imgs[0]).save(jpg, format="JPEG")
        files = {
            "dup.png": (_png(imgs[1]), "duplicate"),
            "notes.png": (b"this is not an image", "not an image"),
            "trunc.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], "truncated"),
            "gray.png": (_png(imgs[0][..., 0]), "grayscale"),
            "rgba.png": (_png(np.concatenate([rgb, np.full((40, 40, 1), 9, np.uint8)], -1)),
                         "alpha"),
            "deep16.png": (_png(rgb[..., 0].astype(np.uint16) * 257), "16-bit"),
            "huge.png": (_png(Image.new("1", (10000, 10000))), "too large"),
        }
        yy, xx = np.mgrid[0:120, 0:160]
        noface = np.stack([xx / 160, yy / 120, 0.4 + 0 * xx], -1)
        files["noface.png"] = (_png((noface * 255).astype(np.uint8)), "no face")
        for name, (data, word) in files.items():
            (folder / name).write_bytes(data)
            rows.append({"source_uri": name, "landmarks": None})
            expected[name] = word
    pq.write_table(pa.table({"source_uri": [r["source_uri"] for r in rows],
                             "landmarks": [r["landmarks"] for r in rows]}),
                   folder / "inputs.parquet")
    return folder / "inputs.parquet", expected


def _verify(root):
    from facecorpus.datasets.verify import verify_dataset

    rep = verify_dataset(str(root))
    assert rep.ok, rep.problems
    return rep


@pytest.mark.slow
def test_flow_with_bad_inputs_on_prefect(tmp_path, faces, prefect_harness):
    listing, expected = make_inputs(tmp_path / "in", faces)
    cfg = P.load_config(None, SMALL)
    s = P.run_pseudo_gt(cfg, str(listing), tmp_path / "out")
    n_inputs = 3 + len(expected)
    assert s["inputs"] == n_inputs and s["counts_add_up"], s
    assert s["accepted"] == 3 and s["rejected"] == len(expected)
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(tmp_path / "out" / "dataset"))
    rej = dict(zip([u.rsplit("/", 1)[-1] for u in ds.rejected.column("source_uri").to_pylist()],
                   ds.rejected.column("reason").to_pylist(), strict=True))
    assert set(rej) == set(expected)
    for name, word in expected.items():
        assert word in rej[name], (name, rej[name])
    man = ds.manifest
    for col in ("yaw", "pitch", "roll", "landmark_nme", "rerender_psnr", "converged",
                "photometric_error", "iterations"):
        assert col in man.column_names
    assert set(man.column("landmark_source").to_pylist()) == {"manifest"}
    # the fit of the clean synthetic faces is good and the pseudo-GT re-renders the photo
    assert max(man.column("landmark_nme").to_pylist()) < 0.05
    assert min(man.column("rerender_psnr").to_pylist()) > 20
    uvg = ds.read("uv_pseudo_gt", [0])
    src = ds.read("uv_source", [0])
    assert uvg.shape == (1, 64, 64, 3) and set(np.unique(src)) <= {0, 1, 2}
    _verify(tmp_path / "out" / "dataset")
    regions = np.load(tmp_path / "out" / "dataset" / "uv_regions.npz")
    assert regions["centre"].any() and regions["side_left"].any()
    # procedural layout: the subject's left (x > 0) is the right half of the UV map
    sl, sr = regions["side_left"], regions["side_right"]
    assert sl[:, 32:].sum() > 10 * sl[:, :32].sum() and sr[:, :32].sum() > 10 * sr[:, 32:].sum()
    assert (tmp_path / "out" / "sheets" / "shard-00000.png").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["histograms"]["landmark_nme"]["counts"]


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(tmp_path, faces, monkeypatch):
    listing, _ = make_inputs(tmp_path / "in", faces, bad=False)
    # a fourth input (a copy under another name: a duplicate) makes two shards of 3
    (tmp_path / "in" / "face9.png").write_bytes((tmp_path / "in" / "face0.png").read_bytes())
    t = pq.read_table(listing).to_pylist() + [{"source_uri": "face9.png", "landmarks": None}]
    pq.write_table(pa.Table.from_pylist(t), listing)
    cfg = P.load_config(None, SMALL)
    out = tmp_path / "out"
    real = P.PseudoGTJob.commit

    def crash_on_second(job, spec, output):
        if spec.id == 1:
            raise RuntimeError("killed")
        return real(job, spec, output)

    monkeypatch.setattr(P.PseudoGTJob, "commit", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        P.run_local(cfg, str(listing), out)
    monkeypatch.setattr(P.PseudoGTJob, "commit", real)
    part = out / "dataset" / "manifest"
    first = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    analyses = {p.name: p.stat().st_mtime_ns for p in (out / "_work").glob("analysis-*")}
    assert len(first) == 1 and len(analyses) == 2
    # resume through the CLI
    from facecorpus.cli import main

    args = ["run", "pseudo-gt", "--input", str(listing), "--out", str(out), "--no-prefect"]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["shards_skipped"] == 1 and s["shards_run"] == 1 and s["shards_committed"] == 2
    assert s["inputs"] == 4 and s["accepted"] == 3 and s["rejected"] == 1
    now = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}
    for name, mtime in first.items():
        assert now[name] == mtime  # the committed shard was not rewritten
    assert {p.name: p.stat().st_mtime_ns
            for p in (out / "_work").glob("analysis-*")} == analyses  # nor re-analysed
    assert main(["data", "verify", str(out / "dataset")]) == 0
    # a third run does nothing
    s3 = P.run_local(cfg, str(listing), out)
    assert s3["shards_run"] == 0 and s3["shards_skipped"] == 2


def test_config_defaults_validate():
    from facecorpus.configs import default_config_path, load_config

    cfg = load_config(default_config_path("pseudo_gt.yaml"))
    assert cfg.kind == "pseudo_gt" and cfg.landmarks.crop_size in (224, 256)
    from facecorpus.core.errors import ConfigError

    with pytest.raises(ConfigError, match="prior.texture|texture"):
        P.load_config(None, {"prior.kind": "user"})
    with pytest.raises(ConfigError, match="camera"):
        P.load_config(None, {"fit.camera": "fisheye"})
    assert os.path.basename(str(default_config_path("pseudo_gt.yaml"))) == "pseudo_gt.yaml"


def test_deployment_on_a_cron_schedule(tmp_path):
    cfg = P.load_config(None, {"model": "procedural"})
    dep = P.make_deployment(cfg, str(tmp_path / "in"), str(tmp_path / "out"), "0 3 * * *")
    assert dep.name == "pseudo-gt"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert P.PseudoGTConfig.model_validate_json(dep.parameters["cfg_json"]) == cfg
    assert dep.parameters["out"] == str(tmp_path / "out")
    from prefect.flows import load_flow_from_entrypoint

    fl = load_flow_from_entrypoint(dep.entrypoint)  # what a scheduled run imports
    assert fl.name == "pseudo-gt" and fl.fn is P.pseudo_gt_flow_fn
