"""Landmarks: detection (mediapipe or box+template fallback), the 478->68 table, alignment."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.core.errors import SampleRejected
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
    with pytest.raises(SampleRejected, match="no face") as ei:
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

    with pytest.raises(SampleRejected, match="no landmark model"):
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


@pytest.mark.parametrize("bad, word", [
    ("equal", "degenerate"), ("nan", "not finite"), ("short", "values"),
    ("collinear", "degenerate"), ("text", "not numbers")])
def test_degenerate_given_landmarks_are_rejections(template, bad, word):
    from facecorpus.tasks.landmarks import crop_affine

    pts = {"equal": np.full((68, 2), 50.0, np.float32),
           "nan": np.where(np.arange(136).reshape(68, 2) == 7, np.nan, template * 100 + 20),
           "short": (template * 100)[:67],
           "collinear": np.c_[np.linspace(10, 90, 68), np.full(68, 40.0)],
           "text": [["a", "b"]] * 68}[bad]
    img = np.zeros((128, 128, 3), np.uint8)
    det = LandmarkDetector(template, fallback="none")
    with pytest.raises(SampleRejected, match=word) as ei:
        det.detect(img, "bad.png", given=pts)
    assert (ei.value.stage, ei.value.source_uri) == ("landmarks", "bad.png")
    if bad in ("equal", "collinear"):
        # detection is bypassed by a caller holding FaceLandmarks: the crop refuses too
        lm = FaceLandmarks(np.asarray(pts, np.float32), np.zeros(4, np.float32), "manifest")
        with pytest.raises(SampleRejected, match="degenerate") as ei:
            align_face(img, lm, 64, source_uri="bad.png")
        assert ei.value.source_uri == "bad.png"
        with pytest.raises(SampleRejected, match="degenerate"):
            crop_affine(lm.points, 64)


@pytest.mark.parametrize("backend", ["installed", "box_template"])
def test_detect_all_on_two_photos_side_by_side(shared, template, backend, monkeypatch):
    from PIL import Image

    if backend == "box_template":
        import facecorpus.tasks.landmarks as L

        monkeypatch.setattr(L, "find_mediapipe_model", lambda explicit=None: None)
        monkeypatch.setattr(L, "mediapipe_solutions_dir", lambda: None)

    imgs = []
    for name in ("official_portrait.jpg", "oval_office_portrait.jpg"):
        im = Image.open(shared / "images" / name).convert("RGB")
        im.thumbnail((600, 600))
        imgs.append(np.asarray(im))
    h = max(i.shape[0] for i in imgs)
    canvas = np.full((h, sum(i.shape[1] for i in imgs), 3), 255, np.uint8)
    x = 0
    for i in imgs:
        canvas[:i.shape[0], x:x + i.shape[1]] = i
        x += i.shape[1]
    det = LandmarkDetector(template)
    if backend == "box_template":
        # the cascade cannot vouch for a second face: the fallback gives its best one only
        assert det.backend == "box_template"
        (face,) = det.detect_all(canvas, "pair.png")
        np.testing.assert_array_equal(face.points, det.detect(canvas).points)
        return
    faces = det.detect_all(canvas, "pair.png")
    assert len(faces) == 2, [f.box for f in faces]
    w0 = imgs[0].shape[1]
    # largest first: the close-up portrait's face is larger and lies in the left half
    areas = [float(np.prod(f.box[2:] - f.box[:2])) for f in faces]
    assert areas[0] >= areas[1]
    assert faces[0].points[:, 0].max() < w0 < faces[1].points[:, 0].min()
    # each agrees with detecting on that photo alone
    for f, img, dx in ((faces[0], imgs[0], 0), (faces[1], imgs[1], w0)):
        alone = det.detect(img).points + [dx, 0]
        iod = float(np.hypot(*(alone[36:42].mean(0) - alone[42:48].mean(0))))
        assert np.linalg.norm(f.points - alone, axis=1).max() < 0.15 * iod
    # detect keeps the largest; a minimum size above the smaller face keeps only one
    np.testing.assert_allclose(det.detect(canvas).points, faces[0].points, atol=1e-3)
    small = float(np.max(faces[1].box[2:] - faces[1].box[:2]))
    assert len(det.detect_all(canvas, min_face_px=small + 1)) == 1
    with pytest.raises(SampleRejected, match="smaller than"):
        det.detect_all(canvas, "pair.png", min_face_px=1e4)
