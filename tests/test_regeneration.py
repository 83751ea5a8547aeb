"""Corpus regeneration as data teams run it: incremental reruns through the CLI, per-sample
fault isolation in one run, and content keys that change exactly when outputs would."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecorpus.cli import main
from facecorpus.flows import pseudo_gt as P
from facecorpus.tasks import pseudo_gt as stages
from PIL import Image

SMALL = {"model": "procedural", "output.samples_per_shard": 3, "unwrap.uv_size": 64,
         "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
         "prior.pca_rank": 0, "prior.kind": "corpus", "workers": 1, "task_runner": "threads",
         "retries": 0, "landmarks.crop_size": 224}


@pytest.fixture(scope="module")
def faces():
    """Twenty faces rendered from the procedural model (200 px) and their landmarks."""
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch

    sb = synthetic_batch(procedural_model(n=41), 20, 200, seed=3, yaw_max=35, fill=0.6)
    return (np.clip(sb.image, 0, 1) * 255 + 0.5).astype(np.uint8), sb.landmarks


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_listing(folder: Path, rows: list[dict]) -> Path:
    """``rows``: source_uri (relative) + landmarks (list or None) [+ anything else]."""
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    pq.write_table(pa.table(cols), folder / "inputs.parquet")
    return folder / "inputs.parquet"


def _cli(listing, out, *extra) -> dict:
    args = ["run", "pseudo-gt", "--input", str(listing), "--out", str(out), "--no-prefect"]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    assert main(args + list(extra)) == 0
    return json.loads((out / "summary.json").read_text())


def shard_files(root: Path) -> dict[int, dict[str, str]]:
    """shard id -> {relative path: sha256} of every file that belongs to that shard."""
    out: dict[int, dict[str, str]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root)
        parts = rel.parts
        if parts[0] in ("manifest", "rejected"):
            s = int(parts[1].split("-")[1].split(".")[0])
        elif len(parts) >= 3 and parts[1] == "c":
            s = int(parts[2])
        else:
            continue
        out.setdefault(s, {})[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_add_change_remove_recomputes_only_affected_shards(tmp_path, faces):
    imgs, lms = faces
    src = tmp_path / "in"
    src.mkdir()
    rows = []
    for i in range(12):  # four full shards of 3
        (src / f"face{i:02d}.png").write_bytes(_png(imgs[i]))
        rows.append({"source_uri": f"face{i:02d}.png", "landmarks": lms[i].reshape(-1).tolist()})
    listing = write_listing(src, rows)
    out = tmp_path / "out"
    s1 = _cli(listing, out)
    assert s1["shards_committed"] == 4 and s1["inputs"] == 12 and s1["counts_add_up"]
    before = shard_files(out / "dataset")
    prior_before = json.loads((out / "prior" / "current.json").read_text())

    # add 3 photos, change one (shard 0), remove one (shard 1)
    for i in range(12, 15):
        (src / f"face{i:02d}.png").write_bytes(_png(imgs[i]))
        rows.append({"source_uri": f"face{i:02d}.png", "landmarks": lms[i].reshape(-1).tolist()})
    changed = imgs[1].copy()
    changed[:8, :8] = 255 - changed[:8, :8]
    (src / "face01.png").write_bytes(_png(changed))
    rows = [r for r in rows if r["source_uri"] != "face04.png"]
    listing = write_listing(src, rows)
    s2 = _cli(listing, out)

    assert s2["shards_run_ids"] == [0, 1, 4], s2["shards_run_why"]
    why = s2["shards_run_why"]
    assert why["0"] == "changed: inputs (+0 -0 ~1)" and why["1"] == "changed: inputs (+0 -1 ~0)"
    assert why["4"] == "new"
    assert s2["shards_skipped"] == 2
    assert s2["inputs"] == 14 and s2["counts_add_up"] and s2["accepted"] + s2["rejected"] == 14
    after = shard_files(out / "dataset")
    for s in (2, 3):
        assert after[s] == before[s], f"untouched shard {s} was rewritten"
    for s in (0, 1):
        assert after[s] != before[s]
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(out / "dataset"))
    uris = [u.rsplit("/", 1)[-1] for u in ds.manifest.column("source_uri").to_pylist()]
    assert "face04.png" not in uris and {"face12.png", "face13.png", "face14.png"} <= set(uris)
    # the new photos did not change the prior, and every row says which prior it used
    assert json.loads((out / "prior" / "current.json").read_text()) == prior_before
    assert set(ds.manifest.column("prior_version").to_pylist()) == {prior_before["version"]}
    assert main(["data", "verify", str(out / "dataset")]) == 0
    # a third run does nothing; --rebuild-prior redoes every shard
    s3 = _cli(listing, out)
    assert s3["shards_run"] == 0 and shard_files(out / "dataset") == after


# --------------------------------------------------------------------------- faults
MARK = {}  # stage -> the victim's marker (filled by the test, read by the stage wrappers)


def _marked(image, stage) -> bool:
    m = MARK.get(stage)
    return m is not None and image.shape == m.shape and np.array_equal(image, m)


def ingest_raising(record, opts):
    if record.source_uri.endswith("boom_ingest.png"):
        raise OSError("disk hiccup while reading")
    return stages.STAGES.ingest(record, opts)


def align_recording(image, lm, size, mask=None):
    a = stages.STAGES.align(image, lm, size, mask=mask)
    for stage in ("fit", "unwrap", "fit2_nan", "fit2_raise"):
        if image[0, 0].tolist() == MARK.get(stage + "_pixel"):
            MARK[stage] = a.image if stage != "fit" else a.landmarks
    return a


def fit_raising(model, landmarks, size, opts):
    if any(_marked(lm, "fit") for lm in landmarks):
        raise np.linalg.LinAlgError("singular normal equations")
    return stages.STAGES.fit(model, landmarks, size, opts)


def unwrap_raising(image, *a, **k):
    if _marked(image, "unwrap"):
        raise RuntimeError("rasterizer exploded")
    return stages.STAGES.unwrap(image, *a, **k)


def refine_faulty(model, fit, images, masks, albedo, landmarks, opts):
    if any(_marked(im, "fit2_raise") for im in images):
        raise ValueError("photometric step failed")
    r = stages.STAGES.refine(model, fit, images, masks, albedo, landmarks, opts)
    for k, im in enumerate(images):
        if _marked(im, "fit2_nan"):
            r.alpha[k] = np.nan
    return r


def blend_raising(uv_visible, *a, **k):
    if len(uv_visible) == 1:  # only the shard whose one survivor is the victim
        raise MemoryError("blend ran out of memory")
    return stages.STAGES.blend(uv_visible, *a, **k)


FAULTY = dataclasses.replace(stages.STAGES, ingest=ingest_raising, align=align_recording,
                             fit=fit_raising, unwrap=unwrap_raising, refine=refine_faulty,
                             blend=blend_raising)


@pytest.mark.slow
def test_every_failure_kind_in_one_run(tmp_path, faces):
    imgs, lms = faces
    src = tmp_path / "in"
    src.mkdir()
    rows, expect = [], {}

    def add(name, img, lm="given", stage=None, word=None, **extra):
        (src / name).write_bytes(_png(img))
        rows.append({"source_uri": name, "landmarks": (lm.reshape(-1).tolist()
                     if isinstance(lm, np.ndarray) else lm), **extra})
        if stage:
            expect[name] = (stage, word)

    good = list(range(6))
    for i in good:
        add(f"good{i}.png", imgs[i], lms[i])
    add("degenerate.png", imgs[6], np.full((68, 2), 50.0), "landmarks", "")
    add("boom_ingest.png", imgs[7], lms[7], "ingest", "disk hiccup")
    victims = {"fit": 8, "unwrap": 9, "fit2_nan": 10, "fit2_raise": 11}
    for stage, i in victims.items():
        im = imgs[i].copy()
        im[0, 0] = (1, 2, 3 + i)
        MARK[stage + "_pixel"] = im[0, 0].tolist()
        add(f"victim_{stage}.png", im, lms[i], stage.split("_")[0],
            {"fit": "singular", "unwrap": "exploded", "fit2_nan": "non-finite",
             "fit2_raise": "photometric step failed"}[stage])
    add("dup_of_good0.png", imgs[0], lms[0], "ingest", "duplicate of")
    rows.append({"source_uri": "good1.png", "landmarks": lms[1].reshape(-1).tolist()})  # twice
    rows.append({"source_uri": "short.png", "landmarks": [1.0] * 10})
    expect["short.png"] = ("ingest", "10 values")
    (src / "short.png").write_bytes(_png(imgs[12]))
    rows.append({"source_uri": None, "landmarks": None})
    # the blend victim is alone in the last shard
    add("blend_alone.png", imgs[13], lms[13], "blend", "out of memory")
    listing = write_listing(src, rows)
    cfg = P.load_config(None, SMALL)
    s = P.run_local(cfg, str(listing), tmp_path / "out", stages=FAULTY)

    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(tmp_path / "out" / "dataset"))
    rej = {str(u).rsplit("/", 1)[-1]: (st, r) for u, st, r in zip(
        ds.rejected.column("source_uri").to_pylist(), ds.rejected.column("stage").to_pylist(),
        ds.rejected.column("reason").to_pylist(), strict=True)}
    for name, (stage, word) in expect.items():
        assert name in rej, (name, sorted(rej))
        assert rej[name][0] == stage and word in rej[name][1], (name, rej[name])
    assert any("no source_uri" in r for _, r in rej.values())  # the null row
    accepted = {u.rsplit("/", 1)[-1] for u in ds.manifest.column("source_uri").to_pylist()}
    assert accepted == {f"good{i}.png" for i in good}
    n_listed_inputs = len(rows) - 1  # good1.png listed twice is one input
    assert s["inputs"] == n_listed_inputs and s["counts_add_up"], s
    assert s["accepted"] + s["rejected"] == n_listed_inputs
    assert "error" in ds.rejected.column_names
    assert main(["data", "verify", str(tmp_path / "out" / "dataset")]) == 0


# --------------------------------------------------------------------------- keys
def _keys(cfg, listing, out, **kw) -> dict[int, str]:
    job = P.PseudoGTJob(cfg, str(listing), str(out), **kw)
    return {s.id: s.parts["analyse"] for s in job.plan()}


def test_keys_change_exactly_with_what_changes_the_bytes(tmp_path, faces, monkeypatch):
    imgs, lms = faces
    src = tmp_path / "in"
    src.mkdir()
    rows = []
    for i in range(4):
        (src / f"f{i}.png").write_bytes(_png(imgs[i]))
        rows.append({"source_uri": f"f{i}.png", "landmarks": lms[i].reshape(-1).tolist(),
                     "mask_uri": "m0.png" if i == 0 else None})
    mask = np.zeros(imgs[0].shape[:2], np.uint8)
    mask[40:160, 40:160] = 255
    (src / "m0.png").write_bytes(_png(mask))
    listing = write_listing(src, rows)
    cfg = P.load_config(None, {**SMALL, "output.samples_per_shard": 2})
    out = tmp_path / "out"
    base = _keys(cfg, listing, out)
    assert len(base) == 2 and base == _keys(cfg, listing, out)  # deterministic
    # the mask's bytes (same path) change shard 0 only
    mask[50:60, 50:60] = 0
    (src / "m0.png").write_bytes(_png(mask))
    k = _keys(cfg, listing, out)
    assert k[0] != base[0] and k[1] == base[1]
    mask[50:60, 50:60] = 255
    (src / "m0.png").write_bytes(_png(mask))
    assert _keys(cfg, listing, out) == base
    # runner settings change nothing
    assert _keys(cfg.model_copy(update={"workers": 7, "retries": 5}), listing, out) == base
    # the landmark backend, the package version, every model array change every key
    monkeypatch.setattr(stages, "landmark_backend", lambda lc: {"backend": "box_template"})
    assert not set(_keys(cfg, listing, out).values()) & set(base.values())
    monkeypatch.undo()
    from facecorpus.core import hashing

    monkeypatch.setattr(hashing, "package_version", lambda: "9.9.9")
    assert not set(_keys(cfg, listing, out).values()) & set(base.values())
    monkeypatch.undo()
    monkeypatch.setattr(hashing, "source_digest", lambda: "edited-stage-code")
    assert not set(_keys(cfg, listing, out).values()) & set(base.values())
    monkeypatch.undo()
    from facecorpus.meshops.procedural import procedural_model

    m = procedural_model()
    for field in ("id_std", "exp_std", "contour_right", "albedo_std", "symmetry"):
        arr = getattr(m, field).copy()
        arr.flat[0] = arr.flat[0] + 1
        m2 = dataclasses.replace(m, **{field: arr})
        assert m2.content_hash() != m.content_hash(), field
    m2 = dataclasses.replace(m, regions={**m.regions, "extra": np.arange(3)})
    assert m2.content_hash() != m.content_hash()
    # a config value of the analyse step changes every key
    assert not set(_keys(cfg.model_copy(update={"fit": cfg.fit.model_copy(
        update={"rounds": 3})}), listing, out).values()) & set(base.values())


def test_verify_reports_shards_of_different_versions(tmp_path):
    from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec
    from facecorpus.datasets.verify import verify_dataset

    w = DatasetWriter(str(tmp_path / "ds"), DatasetSchema({"x": FieldSpec((2,), "float32")},
                                                          samples_per_shard=2,
                                                          samples_per_chunk=1))
    rows = [{"sample_id": "a"}, {"sample_id": "b"}]
    x = np.zeros((2, 2), np.float32)
    w.write_shard(0, {"x": x}, rows, key="k0", made_by={"package": "0.1.0", "model": "m1"})
    rows = [{"sample_id": "c"}, {"sample_id": "d"}]
    w.write_shard(1, {"x": x}, rows, key="k1", made_by={"package": "0.2.0", "model": "m1"})
    rep = verify_dataset(str(tmp_path / "ds"))
    assert rep.ok
    assert len(rep.notes) == 1 and "different package" in rep.notes[0]
    assert "0.1.0: shards [0]" in rep.notes[0] and "0.2.0: shards [1]" in rep.notes[0]
