"""Stage-1 fitting on synthetic ground truth: faces rendered from the model with known
coefficients (yaw within +-60 degrees), landmarks = exact projections + 1 px noise."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks.fit import (
    fit_landmarks,
    init_pose,
    project_landmarks,
    rotation_error_deg,
    synthetic_batch,
)


@pytest.mark.slow
@pytest.mark.parametrize("camera", ["orthographic", "perspective"])
def test_landmark_fit_recovers_pose(model, camera):
    sb = synthetic_batch(model, 8, 256, seed=3, camera=camera, noise_px=1.0)
    assert np.abs(sb.truth.yaw).max() > 55  # the batch really spans +-60 degrees
    # synthetic landmarks are fixed-vertex projections: no sliding correspondences
    fit = fit_landmarks(model, sb.noisy_landmarks, 256,
                        FitConfig(camera=camera, slide_min_yaw=90))
    err = rotation_error_deg(fit, sb.truth)
    assert np.median(err) < 3.0, err
    assert np.abs(fit.yaw - sb.truth.yaw).max() < 6.0, (fit.yaw, sb.truth.yaw)
    # fitted model landmarks against the *noise-free* projections
    rmse = np.sqrt(((project_landmarks(model, fit) - sb.landmarks) ** 2).sum(-1).mean(-1))
    assert np.median(rmse) < 2.0 and rmse.max() < 3.0, rmse
    assert (fit.landmark_nme < 0.1).all() and fit.converged.mean() >= 0.5
    assert (fit.iterations > 0).all()


def test_closed_form_init_is_exact_without_noise(model):
    sb = synthetic_batch(model, 3, 200, seed=5, noise_px=0.0)
    # with the mean shape the affine init is exact: use a neutral face
    from facecorpus.renderers.cameras import framing_camera

    cam = framing_camera(model.vertices, 200, 200, yaw=35, pitch=-10, roll=5)
    lm = cam.project(model.vertices[model.landmarks])[None, :, :2]
    angles, _, s, _ = init_pose(model, lm, 200, "orthographic")
    np.testing.assert_allclose(np.rad2deg(angles[0]), [35, -10, 5], atol=1e-4)
    np.testing.assert_allclose(s[0], cam.scale, rtol=1e-5)
    assert sb.image.shape == (3, 200, 200, 3)


def test_diverged_fit_is_flagged(model):
    rng = np.random.default_rng(0)
    garbage = rng.uniform(0, 256, (2, 68, 2)).astype(np.float32)
    fit = fit_landmarks(model, garbage, 256, FitConfig(rounds=1, iters_per_round=20))
    assert not fit.converged.any() and (fit.landmark_nme > 0.2).all()


@pytest.mark.slow
@pytest.mark.assets
def test_landmark_fit_ict(shared, monkeypatch):
    """The same must-show on the real ICT-FaceKit model (100 identity, 53 expression modes)."""
    monkeypatch.setenv("FACECORPUS_ASSETS", str(shared))
    from facecorpus.meshops.ict import load_ict_facekit

    ict = load_ict_facekit()
    sb = synthetic_batch(ict, 7, 256, seed=1, noise_px=1.0)
    fit = fit_landmarks(ict, sb.noisy_landmarks, 256, FitConfig(slide_min_yaw=90))
    err = rotation_error_deg(fit, sb.truth)
    rmse = np.sqrt(((project_landmarks(ict, fit) - sb.landmarks) ** 2).sum(-1).mean(-1))
    assert np.median(err) < 3.0, err
    assert np.median(rmse) < 2.0, rmse


def test_sliding_jaw_follows_the_silhouette(model):
    """Far-side jaw landmarks placed on the projected contour candidates nearest the image
    silhouette (what a detector marks): sliding correspondences fit them, fixed ones cannot."""
    from facecorpus.renderers.cameras import framing_camera

    v = model.vertices
    cam = framing_camera(v, 256, 256, yaw=50)
    lm = cam.project(v[model.landmarks])[:, :2].copy()
    cand = cam.project(v[model.contour_left])[:, :2]  # yaw > 0 hides the subject's left
    # silhouette: for each far-side landmark row, the candidate farthest to the image right
    for k in range(9, 17):
        near = np.abs(cand[:, 1] - lm[k, 1]) < 6
        if near.any():
            lm[k] = cand[near][cand[near, 0].argmax()]
    fits = {s: fit_landmarks(model, lm[None], 256, FitConfig(slide_min_yaw=s))
            for s in (20.0, 90.0)}
    assert fits[20.0].landmark_rmse[0] < fits[90.0].landmark_rmse[0]
    assert abs(fits[20.0].yaw[0] - 50) < abs(fits[90.0].yaw[0] - 50) + 0.5


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_photometric_refinement_improves_fit(model, solver):
    from facecorpus.tasks.fit import refine_photometric

    sb = synthetic_batch(model, 3, 192, seed=3, noise_px=3.0)  # noisier landmarks
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 192, FitConfig(slide_min_yaw=90))
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    before = refine_photometric(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks,
                                FitConfig(photometric_iters=0, photometric_render_size=96))
    fit2 = refine_photometric(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks,
                              FitConfig(photometric_iters=30, photometric_render_size=96,
                                        photometric_solver=solver))
    assert (fit2.photometric_error < 0.5 * before.photometric_error).all()
    e1, e2 = rotation_error_deg(fit1, sb.truth), rotation_error_deg(fit2, sb.truth)
    assert np.median(e2) <= np.median(e1) and np.median(e2) < 2.0, (e1, e2)
    assert fit2.sh.shape == (3, 27)


def test_adam_matches_torch():
    """Stage 2's own Adam takes torch.optim.Adam's steps (groups with their own learning
    rate, a parameter whose gradient is None skipped), on a non-convex problem."""
    import torch
    from facecorpus.tasks.fit import _Adam

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g), torch.randn(4, 27, generator=g),
            torch.randn(5, generator=g)]
    paths = []
    for make in (torch.optim.Adam, _Adam):
        ps = [p.clone().requires_grad_(True) for p in init]
        opt = make([{"params": [ps[0]], "lr": 0.01}, {"params": [ps[1], ps[2]], "lr": 0.05}])
        for step in range(30):
            opt.zero_grad()
            loss = (torch.sin(3 * ps[0]) * ps[0]).sum() + (ps[1] ** 4 - ps[1]).sum()
            if step % 3:
                loss = loss + (ps[2] ** 2).sum()  # ps[2] has no gradient every third step
            loss.backward()
            opt.step()
        paths.append([p.detach() for p in ps])
    for a, b, p0 in zip(*paths, init):
        assert (a - p0).abs().max() > 0.05  # the parameters really moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
