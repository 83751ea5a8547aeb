"""Landmarks: detection (mediapipe or box+template fallback), the 478->68 table, alignment."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.tasks.ingest import Rejection
from facecorpus.tasks.landmarks import (
    MP478_TO_68,
    MP_FACE_OVAL,
    MULTIPIE_MIRROR,
    FaceLandmarks,
    LandmarkDetector,
    align_face,
    find_mediapipe_model,
    landmark_template,
)


@pytest.fixture(scope="module")
def template():
    from facecorpus.meshops.procedural import procedural_model

    return landmark_template(procedural_model(n=41))


def test_mp_table_structure():
    assert MP478_TO_68.shape == (68,) and len(set(MP478_TO_68.tolist())) == 68
    assert MP478_TO_68.min() >= 0 and MP478_TO_68.max() < 478
    assert set(MP478_TO_68[:17].tolist()) <= set(MP_FACE_OVAL.tolist())  # jaw from the oval
    # points on the Multi-PIE midline are mediapipe midline vertices (x = 0 in its canonical mesh)
    mp_midline = {0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 152, 168, 197, 195}
    for k in np.flatnonzero(MULTIPIE_MIRROR == np.arange(68)):
        assert MP478_TO_68[k] in mp_midline, k
    assert (MULTIPIE_MIRROR[MULTIPIE_MIRROR] == np.arange(68)).all()


def test_astronaut_face_found_and_aligned(template):
    from skimage.data import astronaut

    img = astronaut()
    det = LandmarkDetector(template)
    lm = det.detect(img, "astronaut")
    assert lm.source == det.backend and lm.source in ("mediapipe", "box_template")
    # the face of the astronaut photo is centred near (222, 125) and ~100-140 px wide
    centre = lm.points.mean(0)
    assert np.hypot(*(centre - [222, 125])) < 30, centre
    width = np.ptp(lm.points[:, 0])
    assert 70 < width < 170, width
    a = align_face(img, lm, 256)
    assert a.image.shape == (256, 256, 3) and a.image.dtype == np.uint8
    assert (a.landmarks >= 0).all() and (a.landmarks < 256).all()


def test_shared_photos_have_faces(shared, template):
    from PIL import Image

    det = LandmarkDetector(template)
    for name, approx_centre in (("official_portrait.jpg", (600, 470)),
                                ("oval_office_portrait.jpg", (440, 330))):
        img = np.asarray(Image.open(shared / "images" / name).convert("RGB"))
        lm = det.detect(img, name)
        c = lm.points.mean(0)
        assert np.hypot(*(c - approx_centre)) < 0.1 * max(img.shape), (name, c)


def test_no_face_is_a_rejection(template):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:200, 0:300]
    img = np.stack([xx / 300, yy / 200, 0.5 + 0 * xx], -1) * 255
    img = (img + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
    with pytest.raises(Rejection, match="no face") as ei:
        LandmarkDetector(template).detect(img, "gradient.png")
    assert ei.value.stage == "landmarks" and ei.value.source_uri == "gradient.png"


def test_given_landmarks_bypass_detection_and_align_exactly(template):
    # an image with one bright pixel at a known landmark position: after alignment the
    # pixel must land where the transformed landmark says (pixel-centre convention).
    img = np.zeros((300, 400, 3), np.uint8)
    pts = template * [160, 190] + [120, 60]
    px = pts[30]  # nose tip
    j, i = int(px[0]), int(px[1])
    img[i - 1:i + 2, j - 1:j + 2] = 255
    pts[30] = [j + 0.5, i + 0.5]
    det = LandmarkDetector(template, fallback="none")
    lm = det.detect(img, "x", given=pts)
    assert lm.source == "manifest"
    a = align_face(img, lm, 224)
    np.testing.assert_allclose(a.landmarks, pts @ a.affine[:, :2].T + a.affine[:, 2], atol=1e-4)
    w = a.image[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0:224, 0:224]
    cx, cy = (w * (xx + 0.5)).sum() / w.sum(), (w * (yy + 0.5)).sum() / w.sum()
    np.testing.assert_allclose([cx, cy], a.landmarks[30], atol=0.35)


def test_fallback_none_without_mediapipe_rejects(template, monkeypatch):
    # Hide any installed mediapipe model so the "no model" path runs everywhere.
    import facecorpus.tasks.landmarks as L

    monkeypatch.setattr(L, "find_mediapipe_model", lambda explicit=None: None)
    monkeypatch.setattr(L, "mediapipe_solutions_dir", lambda: None)
    from skimage.data import astronaut

    with pytest.raises(Rejection, match="no landmark model"):
        LandmarkDetector(template, fallback="none").detect(astronaut(), "a")


def test_mediapipe_on_astronaut():
    path = find_mediapipe_model()
    if path is None:
        pytest.skip("no mediapipe Tasks face_landmarker.task (no wheel ships one); set "
                    "FACECORPUS_MEDIAPIPE_MODEL to run this test")
    from skimage.data import astronaut

    lm = LandmarkDetector(None, mediapipe_model=path).detect(astronaut(), "a")
    assert isinstance(lm, FaceLandmarks) and lm.dense.shape == (478, 2)
    assert lm.source == "mediapipe_tasks"
    # eyes above the mouth, subject's right eye (36-41) on the image left
    assert lm.points[36:42, 1].mean() < lm.points[48:60, 1].mean()
    assert lm.points[36:42, 0].mean() < lm.points[42:48, 0].mean()


def test_missing_explicit_model_is_a_config_error(tmp_path):
    from facecorpus.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        LandmarkDetector(None, mediapipe_model=tmp_path / "nope.task")
