"""Rotate-and-render views of a pseudo-GT dataset: offset 0 is the pseudo-GT re-render bit
for bit, rotated poses are source yaw + offset, masks/holes are consistent, ineligible and
bad samples are rejected rows with reasons while the others commit, reruns recompute
nothing, a changed source shard recomputes only its shard. The source is a real pseudo-GT
run (procedural model, six rendered faces at yaw -40 .. 40)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecorpus.datasets.store import open_dataset
from facecorpus.flows import rotate_render as F
from facecorpus.tasks import pseudo_gt as pgt_stages
from facecorpus.tasks import rotate_render as rr
from PIL import Image

PGT = {"model": "procedural", "output.samples_per_shard": 3, "unwrap.uv_size": 64,
       "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
       "prior.pca_rank": 0, "workers": 1, "task_runner": "threads", "retries": 0,
       "landmarks.crop_size": 224}


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A pseudo-GT run's OUT over six procedural faces (two source shards of three)."""
    from facecorpus.flows import pseudo_gt as P
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch

    root = tmp_path_factory.mktemp("rr-src")
    sb = synthetic_batch(procedural_model(n=41), 6, 200, seed=5, yaw_max=40, fill=0.6)
    imgs = (np.clip(sb.image, 0, 1) * 255 + 0.5).astype(np.uint8)
    (root / "in").mkdir()
    for i, im in enumerate(imgs):
        (root / "in" / f"face{i}.png").write_bytes(_png(im))
    pq.write_table(pa.table({"source_uri": [f"face{i}.png" for i in range(6)],
                             "landmarks": [lm.reshape(-1).tolist() for lm in sb.landmarks]}),
                   root / "in" / "inputs.parquet")
    s = P.run_local(P.load_config(None, PGT), str(root / "in" / "inputs.parquet"),
                    root / "pgt")
    assert s["accepted"] == 6, s
    return root / "pgt"


def cfg(source, **over):
    return F.load_config(None, {"source": str(source), "workers": 1,
                                "task_runner": "threads", "retries": 0, **over})


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def shard_files(root: Path, s: int) -> dict[str, str]:
    return {k: v for k, v in files(root).items()
            if f"shard-{s:06d}" in k or f"/c/{s}/" in k or k.endswith(f"/c/{s}")}


def test_offset_zero_is_the_pseudo_gt_rerender_bit_for_bit(source):
    _, ds = rr.open_source(str(source))
    model = rr.load_model(ds, None)
    idx = ds.manifest.column("index").to_numpy()
    batch = rr.read_sources(ds, idx)
    masks = ds.read("mask", idx)[..., 0].astype(bool)
    psnr = ds.manifest.column("rerender_psnr").to_pylist()

    class St:  # what rerender_metrics reads of the pseudo-GT state
        pass

    st = St()
    st.model = model
    for i in range(len(batch)):
        res = rr.rotate_sample(model, batch, i, [0.0])
        fit = rr.source_fit(batch.rows[i], batch.id_coeffs[i], batch.exp_coeffs[i],
                            batch.image.shape[1])
        uv = batch.uv_pseudo_gt[i].astype(np.float32) / np.float32(255.0)
        ref = pgt_stages.rerender_metrics(st, fit, 0, batch.image[i], masks[i], uv)
        m = res["mask"][0]
        assert m.sum() > 1000 and np.array_equal(m, res["mask0"])
        # the pseudo-GT re-render of the stored sample, exactly (float32 bits)
        assert np.array_equal(res["render"][0][m], ref["_rerender"][m])
        assert np.array_equal(res["render0"], res["render"][0])
        # the stored view: the re-render in 8 bits on the face, the photo itself elsewhere
        want = np.where(m[..., None], (np.clip(ref["_rerender"], 0, 1) * 255 + 0.5
                                       ).astype(np.uint8), batch.image[i])
        assert np.array_equal(res["image"][0], want)
        assert not res["hole_mask"][0].any()
        # and it is the re-render the manifest measured (its metrics used the unquantised map)
        assert abs(ref["rerender_psnr"] - psnr[i]) < 0.5, (ref["rerender_psnr"], psnr[i])
        assert ref["rerender_psnr"] > 20


def test_relit_keeps_the_light_with_the_camera(source):
    """relit: de-lit at the source pose, lit by the same camera-space sh at the new one; at
    offset 0 it is the baked re-render up to per-texel vs per-vertex irradiance."""
    _, ds = rr.open_source(str(source))
    model = rr.load_model(ds, None)
    batch = rr.read_sources(ds, ds.manifest.column("index").to_numpy())
    assert batch.sh is not None and np.abs(batch.sh).sum(1).min() > 0  # stage 2 fitted light
    for i in range(len(batch)):
        baked = rr.rotate_sample(model, batch, i, [0.0, 35.0])
        relit = rr.rotate_sample(model, batch, i, [0.0, 35.0], lighting="relit")
        assert (baked["lighting"], relit["lighting"]) == ("baked", "relit")
        m = baked["mask"][0]
        d = baked["render"][0][m] - relit["render"][0][m]
        assert 10 * np.log10(1 / np.mean(d ** 2)) > 35
        assert np.array_equal(baked["mask"], relit["mask"])  # shading never moves the face
        m1 = baked["mask"][1]
        assert np.isfinite(relit["render"]).all()
        assert np.abs(baked["render"][1] - relit["render"][1])[m1].mean() > 1e-3
    # without a fitted light relit falls back to baked, and says so
    nolight = dataclasses.replace(batch, sh=np.zeros_like(batch.sh))
    r = rr.rotate_sample(model, nolight, 0, [20.0], lighting="relit")
    assert r["lighting"] == "baked"
    assert np.array_equal(r["image"], rr.rotate_sample(model, batch, 0, [20.0])["image"])


def test_offsets_are_stable_and_in_range():
    a = rr.draw_offsets(3, ["x", "y", "z"], 4, 15, 60)
    b = rr.draw_offsets(3, ["z", "x"], 4, 15, 60)
    np.testing.assert_array_equal(a[[2, 0]], b)  # a sample's draw ignores its neighbours
    assert ((np.abs(a) >= 15) & (np.abs(a) <= 60)).all()
    many = rr.draw_offsets(0, [str(i) for i in range(200)], 2, 15, 60)
    assert 0.3 < (many > 0).mean() < 0.7  # both signs
    assert not np.array_equal(a, rr.draw_offsets(4, ["x", "y", "z"], 4, 15, 60))


def test_flow_views_rejections_rerun_and_changed_source(source, tmp_path):
    from facecorpus.cli import main

    source = shutil.copytree(source, tmp_path / "src")  # changed in place below
    src_man = open_dataset(str(source / "dataset")).manifest
    src = {r["sample_id"]: r for r in src_man.to_pylist()}
    yaws = {k: r["yaw"] for k, r in src.items()}
    n_ok = sum(abs(y) < 30 for y in yaws.values())
    assert 0 < n_ok < 6, yaws  # the faces span both sides of max_abs_yaw
    out = tmp_path / "rot"
    assert main(["run", "rotate-render", "--source", str(source), "--out", str(out),
                 "--no-prefect"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["inputs"] == 6 and s["counts_add_up"], s
    assert s["accepted"] == n_ok and s["views"] == 2 * n_ok
    assert s["rejected_by_stage"] == {"eligibility": 6 - n_ok}
    ds = open_dataset(str(out / "views"))
    man = ds.manifest.to_pylist()
    for r in ds.rejected.to_pylist():
        assert abs(yaws[r["source_sample_id"]]) >= 30 and "max_abs_yaw 30" in r["reason"]
    idx = ds.manifest.column("index").to_numpy()
    img, mask, hole = (ds.read(k, idx) for k in ("image", "mask", "hole_mask"))
    photos = open_dataset(str(source / "dataset"))
    model = rr.load_model(photos, None)
    for k, r in enumerate(man):
        s0 = src[r["source_sample_id"]]
        # the manifest's yaw/pitch/roll columns are float32 (the store's required type)
        assert r["yaw"] == np.float32(s0["yaw"] + r["yaw_offset"]) and r["source_yaw"] == s0["yaw"]
        assert 15 <= abs(r["yaw_offset"]) <= 60
        assert (r["pitch"], r["roll"], r["split"], r["subject_id"]) == (
            s0["pitch"], s0["roll"], s0["split"], s0["subject_id"])
        m, h = mask[k, ..., 0].astype(bool), hole[k, ..., 0].astype(bool)
        assert set(np.unique(mask[k])) <= {0, 1} and m.sum() >= 64 and r["mask_px"] == m.sum()
        assert not (m & h).any() and h.sum() == r["hole_px"] > 0  # a turned face uncovers
        # the image is at the pose its row says: the fitted mesh rendered with the row's
        # camera covers the same pixels (the row's angles are float32)
        fit = rr.source_fit(r, *(photos.read(f, [s0["index"]])[0]
                                 for f in ("id_coeffs", "exp_coeffs")), m.shape[0])
        _, m_row = rr.render_view(model, fit.vertices(model, 0), fit.camera_for(0),
                                  np.zeros((8, 8, 3), np.float32))
        assert (m & m_row).sum() / (m | m_row).sum() > 0.995
        f0 = rr.source_fit(s0, fit.alpha[0], fit.beta[0], m.shape[0])
        _, m_src = rr.render_view(model, f0.vertices(model, 0), f0.camera_for(0),
                                  np.zeros((8, 8, 3), np.float32))
        assert (m & m_src).sum() / (m | m_src).sum() < 0.98  # ... and not at the source's
        photo = photos.read("image", [s0["index"]])[0]
        # the photo untouched away from the rotated face and the holes; the face is new
        away = ~m & ~h
        assert away.sum() > 0.05 * m.size and np.array_equal(img[k][away], photo[away])
        assert np.abs(img[k].astype(int) - photo).max(-1)[m].mean() > 1
        assert np.abs(img[k].astype(int) - photo).max(-1)[h].mean() > 1  # holes were filled
    # sheet of originals and rotations
    sheet = Image.open(out / "sheets" / "shard-00000.png")
    assert sheet.size[0] == 5 * 130 + 2
    # rerun: nothing recomputed, every file byte-identical
    before = files(out / "views")
    s2 = F.run_local(cfg(source), out)
    assert s2["shards_run"] == 0 and s2["shards_skipped"] == 2
    assert files(out / "views") == before
    # a bad source sample (non-finite coefficients) in shard 1: rejected with its reason,
    # the other samples of that shard commit, shard 0 is not touched
    # (in place, same path, same process: the cached source state must not be reused)
    bad_src = source / "dataset"
    sds = open_dataset(str(bad_src))
    shard1 = [r for r in sds.manifest.to_pylist() if r["shard"] == 1]
    victim = next(r for r in shard1 if abs(r["yaw"]) < 30)
    _rewrite_with_nan(bad_src, 1, victim["row"])
    s3 = F.run_local(cfg(bad_src), out)
    assert s3["shards_run"] == 1 and s3["shards_run_ids"] == [1], s3
    assert s3["counts_add_up"] and s3["rejected_by_stage"].get("rotate") == 1
    rej = open_dataset(str(out / "views")).rejected.to_pylist()
    bad = [r for r in rej if r["stage"] == "rotate"]
    assert bad[0]["source_sample_id"] == victim["sample_id"]
    assert "non-finite fitted shape" in bad[0]["reason"]
    views1 = [r for r in open_dataset(str(out / "views")).manifest.to_pylist()
              if r["shard"] == 1]
    others = {r["sample_id"] for r in shard1 if abs(r["yaw"]) < 30} - {victim["sample_id"]}
    assert {r["source_sample_id"] for r in views1} == others
    assert {k: v for k, v in files(out / "views").items() if "/c/0" in k or "-000000" in k} \
        == {k: v for k, v in before.items() if "/c/0" in k or "-000000" in k}


def _rewrite_with_nan(root: Path, shard: int, row: int) -> None:
    """Recommit one shard of a copied pseudo-GT dataset with one sample's id_coeffs NaN."""
    from facecorpus.datasets.store import DatasetWriter, read_schema

    ds = open_dataset(str(root))
    arrays = ds.read_shard(shard)
    arrays["id_coeffs"] = arrays["id_coeffs"].copy()
    arrays["id_coeffs"][row] = np.nan
    rows = [r for r in ds.manifest.to_pylist() if r["shard"] == shard]
    for r in rows:
        for c in ("shard", "row", "index"):
            r.pop(c)
    rej = [r for r in ds.rejected.to_pylist() if r.get("shard") == shard]
    DatasetWriter(str(root), read_schema(str(root))).write_shard(
        shard, arrays, rows, key=ds.shards[shard].key + "-edited", rejected=rej or None,
        overwrite=True)


@pytest.mark.slow
def test_prefect_flow_matches_local_run(source, tmp_path, prefect_harness):
    a, b = tmp_path / "local", tmp_path / "prefect"
    F.run_local(cfg(source, views_per_sample=1, samples_per_shard=2), a)
    s = F.run_rotate_render(cfg(source, views_per_sample=1, samples_per_shard=2), b)
    assert s["shards_run"] == 3 and s["counts_add_up"]
    assert files(a / "views") == files(b / "views")


def test_config_is_checked_before_work(source, tmp_path):
    from facecorpus.core.errors import ConfigError

    with pytest.raises(ConfigError, match="yaw_offset_range"):
        cfg(source, yaw_offset_range=[50, 20])
    with pytest.raises(ConfigError, match="not a dataset|not a pseudo-GT"):
        F.RotateRenderJob(cfg(tmp_path), tmp_path / "o")
    from facecorpus.meshops.procedural import procedural_model

    other = procedural_model(n=21).save(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="another model"):
        F.RotateRenderJob(cfg(source, model=str(other)), tmp_path / "o")
