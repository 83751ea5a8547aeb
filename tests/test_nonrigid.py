"""Non-rigid refinement on synthetic faces deformed off the model space by a smooth known
field: the landmark error drops, the recovered corrective field correlates with the truth,
the mesh stays smooth (no flipped triangles), and the texture unwrapped with the refined
mesh is closer to the truth than with the 3DMM fit alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from facecorpus.configs.fit import FitConfig
from facecorpus.configs.nonrigid import NonrigidConfig
from facecorpus.meshops.laplacian import flipped_fraction, stiffness
from facecorpus.tasks.fit import fit_landmarks, smooth_uv_texture
from facecorpus.tasks.nonrigid import refine_nonrigid
from facecorpus.tasks.unwrap import psnr, unwrap_one

S = T = 256
AMBIENT = np.zeros(27, np.float32)
AMBIENT[0::9] = 2 / np.sqrt(np.pi)  # irradiance exactly 1: the image is the texture
CFG = NonrigidConfig(slide_min_yaw=90)  # landmarks are fixed vertices, hidden or not
FIT = FitConfig(camera="perspective", fov_deg=40, slide_min_yaw=90, n_id=0)


def smooth_field(vertices: np.ndarray, rng) -> np.ndarray:
    """(V, 3) mm: low-frequency waves over the face, 2-4 mm (none of the model's modes)."""
    v = vertices.astype(np.float64)
    c, ext = v.mean(0), np.ptp(v, 0)
    ph = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([4 * np.sin(1.4 * np.pi * (v[:, 1] - c[1]) / ext[1] + ph[0]),
                     3 * np.sin(1.4 * np.pi * (v[:, 0] - c[0]) / ext[0] + ph[1]),
                     2 * np.sin(1.0 * np.pi * (v[:, 1] - c[1]) / ext[1] + ph[2])], 1)


def make_scene(model, n=4, seed=0):
    """Mean identity + a smooth field, perspective (40 deg), rendered with a known texture;
    landmarks are the exact projections of the deformed landmark vertices."""
    from facecorpus.renderers.cameras import framing_camera
    from facecorpus.renderers.render import render
    from facecorpus.tasks.masks import erode

    rng = np.random.default_rng(seed)
    tex = smooth_uv_texture(T, 3)
    out = {"image": [], "mask": [], "landmarks": [], "field": [], "vertices": []}
    yaws = np.linspace(-20, 20, n)
    for i in range(n):
        D = smooth_field(model.vertices, rng)
        vd = (model.vertices + D).astype(np.float32)
        cam = framing_camera(vd, S, S, yaw=yaws[i], pitch=rng.uniform(-10, 10),
                             kind="perspective", fov_deg=40, fill=0.75)
        r = render(vd, model.triangles, cam, outputs=("image", "mask"), uv=model.uv,
                   uv_triangles=model.uv_triangles, uv_texture=tex, sh=AMBIENT)
        out["image"].append(r.image[0])
        out["mask"].append(erode(r.mask[0], 1))
        out["landmarks"].append(cam.project(vd[model.landmarks])[:, :2])
        out["field"].append(D)
        out["vertices"].append(vd)
    out = {k: np.stack(v) for k, v in out.items()}
    out["texture"] = tex
    return out


@pytest.fixture(scope="module")
def model():
    from facecorpus.meshops.procedural import procedural_model

    return procedural_model()


@pytest.fixture(scope="module")
def solved(model):
    sc = make_scene(model)
    fit = fit_landmarks(model, sc["landmarks"], S, FIT)
    return sc, fit, refine_nonrigid(model, fit, sc["landmarks"], S, CFG)


def _procrustes_rmse(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance (mm) of (V, 3) ``a`` to ``b`` after the best similarity transform."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    U, s, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt))
    R = U @ np.diag([1, 1, d]) @ Vt
    k = (s * [1, 1, d]).sum() / (b**2).sum()
    return float(np.sqrt(((a - k * b @ R) ** 2).sum(1).mean()))


def test_config_defaults_are_the_published_weights():
    c = NonrigidConfig()
    assert (c.iterations, c.w_c, c.w_r, c.lambda_d, c.lambda_f, c.lambda_q) == (
        5, 25.0, 10.0, 4.0, 5.0, 5.0)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        NonrigidConfig(w_cc=1.0)


def test_landmark_error_drops_and_the_shape_gets_closer(model, solved):
    sc, fit, nr = solved
    assert all(f is None for f in nr.failure)
    assert (nr.landmark_rmse_after < 0.8 * nr.landmark_rmse_before).all(), (
        nr.landmark_rmse_before, nr.landmark_rmse_after)
    for i in range(len(nr)):
        before = _procrustes_rmse(sc["vertices"][i], fit.vertices(model, i))
        after = _procrustes_rmse(sc["vertices"][i], nr.vertices[i])
        assert after < before, (i, before, after)
    # the camera record reproduces the reported error
    for i in range(len(nr)):
        uv = nr.camera_for(i).project(nr.vertices[i][model.landmarks])[:, :2]
        rmse = np.sqrt(((uv - sc["landmarks"][i]) ** 2).sum(-1).mean())
        assert rmse == pytest.approx(nr.landmark_rmse_after[i], rel=1e-3, abs=1e-3)
    assert (nr.focal > 0).all() and np.isfinite(nr.translation).all()
    # the FitResult view carries the same camera
    f2 = nr.as_fit_result(fit)
    for i in range(len(nr)):
        a = f2.camera_for(i).project(nr.vertices[i])
        b = nr.camera_for(i).project(nr.vertices[i])
        np.testing.assert_allclose(a, b, atol=1e-3)
        np.testing.assert_allclose(f2.vertices(model, i) + nr.vertex_offsets[i],
                                   nr.vertices[i], atol=1e-3)


def test_recovered_field_correlates_with_the_truth(solved):
    sc, _, nr = solved
    d = nr.vertex_offsets.astype(np.float64)
    D = sc["field"]
    d = d - d.mean(1, keepdims=True)  # a global shift is the camera's, not the field's
    D = D - D.mean(1, keepdims=True)
    pooled = np.corrcoef(d.ravel(), D.ravel())[0, 1]
    per = [np.corrcoef(d[i].ravel(), D[i].ravel())[0, 1] for i in range(len(d))]
    assert pooled > 0.5, (pooled, per)
    assert min(per) > 0.0, per
    # the amplitude is recovered in part, not a vanishing correction
    assert np.abs(d).max() > 1.0


def test_laplacian_keeps_the_mesh_smooth(model, solved):
    _, _, nr = solved
    C = stiffness(model.vertices, model.triangles, "uniform")
    deg = np.asarray(C.diagonal())
    for i in range(len(nr)):
        assert flipped_fraction(nr.vertices[i], model.vertices, model.triangles) == 0.0
        d = nr.vertex_offsets[i].astype(np.float64)
        rough = np.linalg.norm((C @ d) / deg[:, None], axis=1).mean()
        # a smooth field changes little from a vertex to its neighbours' mean; the same
        # values scattered over the vertices (same amplitude, no smoothness) change a lot
        shuffled = d[np.random.default_rng(i).permutation(len(d))]
        rough_s = np.linalg.norm((C @ shuffled) / deg[:, None], axis=1).mean()
        assert rough < 0.05 * rough_s, (rough, rough_s)


def test_unwrap_with_the_refined_mesh_is_closer_to_the_truth(model, solved):
    sc, fit, nr = solved
    gains = []
    for i in range(len(nr)):
        u0 = unwrap_one(sc["image"][i], fit.vertices(model, i), fit.camera_for(i), model, T,
                        sc["mask"][i])
        u1 = unwrap_one(sc["image"][i], nr.vertices[i], nr.camera_for(i), model, T,
                        sc["mask"][i])
        both = u0.uv_visible_mask[0] & u1.uv_visible_mask[0]
        assert both.mean() > 0.3
        p0 = psnr(u0.uv_visible[0], sc["texture"], both)
        p1 = psnr(u1.uv_visible[0], sc["texture"], both)
        gains.append(p1 - p0)
    assert np.mean(gains) > 1.0, gains
    assert min(gains) > -0.5, gains


def test_images_are_independent_and_bad_ones_fail_alone(model, solved):
    sc, fit, nr = solved
    lm = sc["landmarks"].copy()
    lm[1] = np.nan
    bad_fit = dataclasses.replace(fit, failure=np.array([None, "x", None, None], object))
    out = refine_nonrigid(model, bad_fit, lm, S, CFG)
    assert out.failure[1] is not None and "stage-1" in out.failure[1]
    assert np.abs(out.vertex_offsets[1]).max() == 0
    for i in (0, 2, 3):
        assert out.failure[i] is None
        np.testing.assert_allclose(out.vertices[i], nr.vertices[i], atol=1e-5)
    lm2 = sc["landmarks"].copy()
    lm2[2] = np.nan
    out2 = refine_nonrigid(model, fit, lm2, S, CFG)
    assert out2.failure[2] == "landmarks are not finite"
    solo = refine_nonrigid(model, fit.select([3]), sc["landmarks"][3:], S, CFG)
    np.testing.assert_allclose(solo.vertices[0], nr.vertices[3], atol=1e-5)


def test_ict_facekit(ict_archive):
    from facecorpus.meshops import ict

    m = ict.build_ict_facekit(ict_archive, "face", cache=True)
    assert m.n_vertices == 9409
    sc = make_scene(m, n=2, seed=1)
    # with all 53 blendshapes the fit absorbs most of the field (ICT's blendshapes are
    # local); without them the field is off the model space and must be recovered
    for opts in (FIT, FIT.model_copy(update={"n_exp": 0})):
        fit = fit_landmarks(m, sc["landmarks"], S, opts)
        nr = refine_nonrigid(m, fit, sc["landmarks"], S, CFG)
        assert all(f is None for f in nr.failure)
        assert nr.vertices.shape == (2, 9409, 3)
        assert (nr.landmark_rmse_after < nr.landmark_rmse_before).all()
        for i in range(2):
            # some ICT blendshape mixes flip a few sliver triangles by themselves (the 3DMM
            # fit's too); the corrective field must not flip any of the mesh it corrects
            base = m.shape(fit.alpha[i], nr.beta[i])
            assert flipped_fraction(nr.vertices[i], base, m.triangles) == 0.0
            assert flipped_fraction(m.vertices + nr.vertex_offsets[i], m.vertices,
                                    m.triangles) == 0.0
            before = _procrustes_rmse(sc["vertices"][i], fit.vertices(m, i))
            after = _procrustes_rmse(sc["vertices"][i], nr.vertices[i])
            if opts.n_exp == 0:
                assert after < before, (before, after)
            else:
                assert after < 1.05 * before, (before, after)


def test_sliding_contour_follows_the_silhouette(model):
    """Default config (contour landmarks slide beyond 20 deg yaw): on a head turned 40 deg,
    jaw landmarks placed on the projected silhouette re-attach to contour vertices and the
    refinement still lowers the error."""
    sc = make_scene(model, n=2, seed=3)
    lm = sc["landmarks"].copy()
    from facecorpus.renderers.cameras import framing_camera

    for i, yaw in enumerate((-40.0, 40.0)):
        vd = sc["vertices"][i]
        cam = framing_camera(vd, S, S, yaw=yaw, kind="perspective", fov_deg=40, fill=0.75)
        lm[i] = cam.project(vd[model.landmarks])[:, :2]
        side = np.arange(0, 8) if yaw < 0 else np.arange(9, 17)
        cand = model.contour_right if yaw < 0 else model.contour_left
        uvc = cam.project(vd[cand])[:, :2]
        # the true silhouette point: the candidate nearest each fixed-vertex projection
        lm[i, side] = uvc[np.linalg.norm(lm[i, side, None] - uvc[None], axis=-1).argmin(1)]
    fit = fit_landmarks(model, lm, S, FIT.model_copy(update={"slide_min_yaw": 20}))
    nr = refine_nonrigid(model, fit, lm, S, NonrigidConfig())
    assert all(f is None for f in nr.failure)
    assert (nr.landmark_rmse_after < nr.landmark_rmse_before).all()
    for i, yaw in enumerate((-40.0, 40.0)):
        side = np.arange(0, 8) if yaw < 0 else np.arange(9, 17)
        cand = model.contour_right if yaw < 0 else model.contour_left
        assert np.isin(nr.landmark_vertices[i, side], cand).all()
