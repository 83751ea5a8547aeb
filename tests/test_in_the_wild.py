"""In-the-wild inputs through the pseudo-GT flow (issue #16): several faces per photo (one
sample each, counts per photo), occlusion masks in the dataset, an opaque RGBA photo."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecorpus.core.errors import SampleRejected
from facecorpus.flows import pseudo_gt as P
from facecorpus.tasks import landmarks as lm_mod
from facecorpus.tasks import pseudo_gt as stages_mod
from PIL import Image

SMALL = {"model": "procedural", "output.samples_per_shard": 8, "unwrap.uv_size": 64,
         "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
         "prior.pca_rank": 0, "workers": 1, "task_runner": "threads", "retries": 0,
         "landmarks.crop_size": 224}
IMAGES = Path(os.environ.get("FACECORPUS_ASSETS", "/nonexistent")) / "images"
MARK = (1, 2, 3)  # top-left pixel of the photo whose left face the test stage refuses


def _photo(name: str, height: int = 360) -> Image.Image:
    im = Image.open(IMAGES / name).convert("RGB")
    return im.resize((round(im.width * height / im.height), height))


def _side_by_side(a: Image.Image, b: Image.Image) -> np.ndarray:
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (128, 128, 128))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return np.asarray(out).copy()


def align_refusing_marked_left_face(image, lm, size, mask=None, source_uri=""):
    """align_face, but the left-hand face of a marked photo is refused (a later-stage
    rejection of one face while the other is accepted). Module level: picklable."""
    if tuple(image[0, 0, :3]) == MARK and lm.points[:, 0].mean() < image.shape[1] / 2:
        raise SampleRejected(source_uri, "landmarks", "refused by the test")
    return lm_mod.align_face(image, lm, size, mask=mask, source_uri=source_uri)


@pytest.mark.slow
def test_two_faces_per_photo_and_rgba(tmp_path):
    names = ["official_portrait.jpg", "oval_office_portrait.jpg"]
    if not all((IMAGES / n).exists() for n in names):
        pytest.skip("shared photos absent")
    a, b = _photo(names[0]), _photo(names[1])
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(_side_by_side(a, b)).save(inp / "two.png")
    marked = _side_by_side(b, a)  # b, the smaller face of the two (face 1), on the left
    marked[0, 0] = MARK
    Image.fromarray(marked).save(inp / "two_marked.png")
    rgba = np.concatenate([np.asarray(a), np.full((a.height, a.width, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(inp / "rgba.png")
    stages = dataclasses.replace(stages_mod.STAGES, align=align_refusing_marked_left_face)
    s = P.run_local(P.load_config(None, SMALL), str(inp), tmp_path / "out", stages=stages)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(tmp_path / "out" / "dataset"))
    man = ds.manifest.to_pylist()
    by = {}
    for r in man:
        by.setdefault(Path(r["source_uri"]).name, []).append(r)
    # both faces of the composite: two samples of one photo, distinct ids, face 0 keeps
    # the plain sha256[:16] id
    two = sorted(by["two.png"], key=lambda r: r["face_index"])
    assert [r["face_index"] for r in two] == [0, 1]
    assert two[0]["sample_id"] == two[0]["sha256"][:16]
    assert two[1]["sample_id"] == two[0]["sample_id"] + "-f1"
    # the marked photo: face 0 accepted, face 1 rejected with its face in the reason
    assert [r["face_index"] for r in by["two_marked.png"]] == [0]
    rej = ds.rejected.to_pylist()
    assert len(rej) == 1 and rej[0]["source_uri"].endswith("two_marked.png")
    assert "(face 1)" in rej[0]["reason"]
    # the opaque RGBA photo is accepted (alpha: reject only refuses real transparency)
    assert len(by["rgba.png"]) == 1
    # 3 photos = 3 accepted photos + 0 rejected photos, though 4 rows + 1 rejected row
    assert s["inputs"] == 3 and s["accepted"] == 4 and s["rejected"] == 1
    assert s["accepted_inputs"] == 3 and s["rejected_inputs"] == 0 and s["counts_add_up"]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_pasted_occluder_is_masked_and_filled(tmp_path):
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.occlusion import paste_occluder

    sb = synthetic_batch(procedural_model(n=41), 4, 200, seed=3, yaw_max=20, fill=0.6)
    img = np.clip(sb.image, 0, 1).astype(np.float64)
    paste_occluder("padding", img[0], sb.landmarks[0], np.random.default_rng(0))
    inp = tmp_path / "in"
    inp.mkdir()
    rows = []
    for i in range(len(img)):
        (inp / f"f{i}.png").write_bytes(_png((img[i] * 255 + 0.5).astype(np.uint8)))
        rows.append({"source_uri": f"f{i}.png", "landmarks": sb.landmarks[i].ravel().tolist()})
    pq.write_table(pa.Table.from_pylist(rows), inp / "inputs.parquet")
    P.run_local(P.load_config(None, SMALL), str(inp / "inputs.parquet"), tmp_path / "out")
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(tmp_path / "out" / "dataset"))
    man = ds.manifest.to_pylist()
    assert len(man) == 4
    i = next(k for k, r in enumerate(man) if r["source_uri"].endswith("f0.png"))
    occ = ds.read("uv_occlusion_mask", [i])[0, ..., 0].astype(bool)
    vis = ds.read("uv_visible_mask", [i])[0, ..., 0].astype(bool)
    assert occ.sum() > 0.05 * occ.size  # half the face behind black padding
    assert man[i]["occluded_fraction"] > 0.2
    assert not (occ & vis).any()  # occluded texels are not visible ...
    src = ds.read("uv_source", [i])[0, ..., 0]
    assert not (src[occ] == 1).any()  # ... and the pseudo-GT there is not the photo
    clean = [r["occluded_fraction"] for r in man if not r["source_uri"].endswith("f0.png")]
    assert max(clean) < man[i]["occluded_fraction"]
