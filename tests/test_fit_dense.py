"""Dense-landmark fitting and the per-image focal estimate (#16), on the procedural model
with a correspondence built from known surface points (so its truth is known)."""

from __future__ import annotations

import numpy as np
import pytest


def _known_canonical(model, seed=0):
    """A 'canonical mesh' of 468 points on the model's front surface (the 68 shared ids on
    the landmark vertices), moved by a similarity: its embedding is known."""
    from facecorpus.meshops.geometry import face_normals
    from facecorpus.tasks.landmarks import MP478_TO_68

    rng = np.random.default_rng(seed)
    fn = face_normals(model.vertices, model.triangles)
    front = np.flatnonzero(fn[:, 2] > 0.5)
    tri = rng.choice(front, 468, replace=False)
    bary = rng.dirichlet(np.ones(3), 468)
    pts = np.einsum("dk,dkc->dc", bary, model.vertices[model.triangles[tri]])
    pts[MP478_TO_68] = model.vertices[model.landmarks]
    th = 0.3
    R = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    return pts, 0.1 * pts @ R.T + np.array([1.0, -2.0, 3.0])


@pytest.fixture(scope="module")
def dense_model(model, tmp_path_factory, monkeypatch_module):
    """The procedural model with its correspondence built from the known canonical points
    (through correspondence_for, as a user would with FACECORPUS_MP_CANONICAL)."""
    _, canon = _known_canonical(model)
    d = tmp_path_factory.mktemp("canon")
    np.save(d / "canon.npy", canon)
    monkeypatch_module.setenv("FACECORPUS_MP_CANONICAL", str(d / "canon.npy"))
    monkeypatch_module.setenv("FACECORPUS_CACHE", str(d / "cache"))
    return model


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_correspondence_recovers_known_points(model):
    from facecorpus.meshops.correspondence import build_correspondence
    from facecorpus.tasks.landmarks import MP478_TO_68

    truth, canon = _known_canonical(model)
    c = build_correspondence(model.vertices, model.triangles, model.landmarks, canon,
                             MP478_TO_68)
    assert len(c) >= 460  # points sit on the surface: nothing is dropped
    assert (c.bary >= 0).all() and np.allclose(c.bary.sum(1), 1.0)
    assert (c.triangle >= 0).all() and (c.triangle < len(model.triangles)).all()
    P = c.points(model.vertices, model.triangles)
    iod = np.linalg.norm(model.vertices[model.landmarks[36]] - model.vertices[model.landmarks[45]])
    err = np.linalg.norm(P - truth[c.point_ids], axis=1)
    assert np.median(err) < 0.01 * iod and err.max() < 0.05 * iod
    pos = {int(i): k for k, i in enumerate(c.point_ids)}
    lm_err = [np.linalg.norm(P[pos[int(i)]] - model.vertices[model.landmarks[j]])
              for j, i in enumerate(MP478_TO_68) if int(i) in pos]
    assert max(lm_err) < 1e-3 * iod
    c2 = build_correspondence(model.vertices, model.triangles, model.landmarks, canon,
                              MP478_TO_68)
    assert np.array_equal(c.triangle, c2.triangle) and np.array_equal(c.bary, c2.bary)
    # a point far from the surface is dropped
    far = canon.copy()
    far[7] += np.array([0.0, 0.0, 50.0])
    c3 = build_correspondence(model.vertices, model.triangles, model.landmarks, far,
                              MP478_TO_68)
    assert 7 not in set(c3.point_ids.tolist())


@pytest.mark.assets
def test_shipped_ict_correspondence(shared):
    from facecorpus.meshops.catalog import load_model
    from facecorpus.meshops.correspondence import correspondence_for, shipped_path
    from facecorpus.tasks.landmarks import MP478_TO_68

    m = load_model("ict")
    assert shipped_path(m.content_hash()).is_file()
    c = correspondence_for(m, MP478_TO_68, canonical_path=None)
    assert len(c) == 468 and (c.bary >= 0).all()
    P = c.points(m.vertices, m.triangles)
    pos = {int(i): k for k, i in enumerate(c.point_ids)}
    err = [np.linalg.norm(P[pos[int(i)]] - m.vertices[m.landmarks[j]])
           for j, i in enumerate(MP478_TO_68)]
    assert max(err) < 0.1  # mm


def test_dense_beats_sparse68_at_large_yaw(dense_model):
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    b = F.synthetic_landmarks(dense_model, 8, 256, seed=3, yaw_max=75)
    errs = {}
    for mode in ("sparse68", "dense"):
        r = F.fit_landmarks(dense_model, b.landmarks, 256, FitConfig(landmarks=mode),
                            dense=b.dense)
        assert all(f is None for f in r.failure), (mode, r.failure)
        errs[mode] = np.median(F.rotation_error_deg(r, b.truth))
    assert errs["dense"] <= errs["sparse68"] + 0.1, errs
    assert errs["dense"] < 4.0, errs


def test_focal_estimate_on_wide_angle(dense_model):
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    b = F.synthetic_landmarks(dense_model, 8, 256, seed=4, yaw_max=45, camera="perspective",
                              focal_factor=1.0, noise_rel=0.005, iid_rel=0.002)
    out = {}
    for foc in ("fixed", "estimate"):
        r = F.fit_landmarks(dense_model, b.landmarks, 256,
                            FitConfig(camera="perspective", focal=foc, landmarks="dense"),
                            dense=b.dense)
        out[foc] = (np.median(F.rotation_error_deg(r, b.truth)),
                    np.median(r.focal / b.truth.focal))
    assert abs(out["estimate"][1] - 1.0) < 0.2, out
    assert abs(out["fixed"][1] - 1.0) > 1.0, out  # 12 deg fov: 4.75x the true focal
    assert out["estimate"][0] < out["fixed"][0], out


def test_bad_dense_is_rejected_with_reason(dense_model):
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    b = F.synthetic_landmarks(dense_model, 3, 256, seed=5, yaw_max=30)
    dense = b.dense.copy()
    dense[1, 10:20] = np.nan
    r = F.fit_landmarks(dense_model, b.landmarks, 256, FitConfig(landmarks="dense"),
                        dense=dense)
    assert r.failure[1] is not None and "dense" in r.failure[1] and not r.converged[1]
    assert r.failure[0] is None and r.failure[2] is None
    alone = F.fit_landmarks(dense_model, b.landmarks[[0, 2]], 256,
                            FitConfig(landmarks="dense"), dense=b.dense[[0, 2]])
    np.testing.assert_allclose(r.yaw[[0, 2]], alone.yaw, atol=1e-4)


def test_68_point_path_unchanged_without_dense(dense_model):
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    b = F.synthetic_landmarks(dense_model, 3, 256, seed=6, yaw_max=40)
    ref = F.fit_landmarks(dense_model, b.landmarks, 256, FitConfig())
    same = F.fit_landmarks(dense_model, b.landmarks, 256, FitConfig(landmarks="dense"))
    dense = b.dense.copy()
    dense[1] = np.nan  # image 1 has manifest (68-point) landmarks only
    mixed = F.fit_landmarks(dense_model, b.landmarks, 256, FitConfig(landmarks="dense"),
                            dense=dense)
    for f in ("yaw", "pitch", "roll", "alpha", "beta", "landmark_nme"):
        np.testing.assert_array_equal(getattr(ref, f), getattr(same, f))
        np.testing.assert_allclose(getattr(mixed, f)[1], getattr(ref, f)[1], atol=1e-5)
    assert mixed.failure[1] is None


def test_dense_points_follow_the_crop():
    from facecorpus.tasks.landmarks import MP478_TO_68, FaceLandmarks, align_face

    rng = np.random.default_rng(0)
    dense = (rng.uniform(-60, 60, (478, 2)) + [200, 150]).astype(np.float32)
    lm = FaceLandmarks(points=dense[MP478_TO_68], box=np.r_[dense.min(0), dense.max(0)],
                       source="mediapipe", dense=dense)
    a = align_face(np.zeros((300, 400, 3), np.uint8), lm, 128)
    assert a.dense.shape == (478, 2)
    np.testing.assert_allclose(a.dense[MP478_TO_68], a.landmarks, atol=1e-3)
    np.testing.assert_allclose(a.dense, dense @ a.affine[:, :2].T + a.affine[:, 2], atol=1e-3)


def test_focal_prior_is_the_centre_of_the_estimate(dense_model):
    """A strong lambda_f pins fs = 1: the focal lands on the given prior (EXIF), or on the
    fov_deg focal without one."""
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    b = F.synthetic_landmarks(dense_model, 4, 256, seed=8, yaw_max=30, camera="perspective",
                              focal_factor=1.0)
    opts = FitConfig(camera="perspective", focal="estimate", landmarks="dense", lambda_f=1e4)
    prior = b.truth.focal.astype(np.float64) * 1.1
    prior[3] = np.nan  # no EXIF for this one
    r = F.fit_landmarks(dense_model, b.landmarks, 256, opts, dense=b.dense, focal_prior=prior)
    np.testing.assert_allclose(r.focal[:3], prior[:3], rtol=0.02)
    f_fov = 128 / np.tan(np.radians(12.0) / 2)
    assert abs(r.focal[3] / f_fov - 1) < 0.02
    assert all(f is None for f in r.failure)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("f35, expect", [(26, 26.0), (0, None), (5000, None), (None, None)])
def test_exif_focal_35mm(tmp_path, f35, expect, fmt):
    from facecorpus.tasks.ingest import InputRecord, exif_focal_35mm, ingest_one
    from PIL import Image

    im = Image.fromarray(np.full((300, 400, 3), 128, np.uint8))
    path = tmp_path / f"p.{fmt}"
    exif = Image.Exif()
    if f35 is not None:
        exif.get_ifd(0x8769)[0xA405] = f35
    exif[0x0112] = 6  # rotated: the focal is read from the photo as stored
    im.save(path, exif=exif)
    ing = ingest_one(InputRecord(str(path)))
    # ingest reads the focal from its one decode (#12): what the bytes alone give
    assert ing.focal_35mm == expect == exif_focal_35mm(path.read_bytes())
    assert ing.image.shape == (400, 300, 3)
    if expect:
        assert abs(ing.focal_px() - 26 * 500 / 43.27) < 1e-6
