"""Per-image fitting: an image's stage-1 and stage-2 results do not depend on its batch-mates
(garbage, degenerate or NaN inputs included), ``converged`` means what FitResult says, and
every failure is reported per image."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks.fit import (
    fit_failures,
    fit_landmarks,
    refine_photometric,
    synthetic_batch,
    validate_landmarks,
)

PARAMS = ("yaw", "pitch", "roll", "translation", "scale", "focal", "alpha", "beta")


@pytest.fixture(scope="module")
def faces(model):
    return synthetic_batch(model, 6, 256, seed=7, noise_px=1.0)


def assert_same_fit(a, i, b, j, rtol=1e-4):
    """Row i of fit a equals row j of fit b: parameters within rtol (relative to the size of
    each array, so near-zero coefficients are compared on the array's scale), flags and
    iteration counts exactly."""
    for name in PARAMS + ("landmark_rmse",):
        x = np.asarray(getattr(a, name)[i], np.float64)
        y = np.asarray(getattr(b, name)[j], np.float64)
        scale = max(np.abs(x).max(initial=0.0), 1e-3)
        assert np.abs(x - y).max(initial=0.0) <= rtol * scale, (name, x, y)
    assert a.converged[i] == b.converged[j]
    assert a.iterations[i] == b.iterations[j]
    assert a.failure[i] == b.failure[j]
    np.testing.assert_array_equal(a.landmark_vertices[i], b.landmark_vertices[j])


@pytest.mark.parametrize("slide_min_yaw", [20.0, 90.0])
def test_fit_does_not_depend_on_batch_mates(model, faces, slide_min_yaw):
    rng = np.random.default_rng(1)
    garbage = rng.uniform(0, 256, (1, 68, 2))
    opts = FitConfig(slide_min_yaw=slide_min_yaw)
    lm = faces.noisy_landmarks
    mixed = np.concatenate([garbage, lm[[0]], lm[1:]])  # outlier first, then real faces
    batch = fit_landmarks(model, mixed, 256, opts)
    assert not batch.converged[0]  # the outlier really is one
    for i in (0, 3, 5):
        alone = fit_landmarks(model, lm[[i]], 256, opts)
        assert_same_fit(alone, 0, batch, i + 1)
        with_outlier = fit_landmarks(model, np.concatenate([lm[[i]], garbage]), 256, opts)
        assert_same_fit(alone, 0, with_outlier, 0)


def test_converged_means_something(model, faces):
    fit = fit_landmarks(model, faces.noisy_landmarks, 256, FitConfig(slide_min_yaw=90))
    assert fit.converged.all(), (fit.converged, fit.landmark_nme, fit.iterations)
    assert all(f is None for f in fit.failure)
    assert fit.iterations.min() > 0

    garbage = np.random.default_rng(2).uniform(0, 256, (3, 68, 2))
    bad = fit_landmarks(model, garbage, 256)
    assert not bad.converged.any()
    assert all("inter-ocular" in f for f in bad.failure), bad.failure
    # every image stops on its own: in one batch, clean faces and garbage take their own
    # iteration counts (the ones they take alone)
    both = fit_landmarks(model, np.concatenate([faces.noisy_landmarks[:2], garbage]), 256)
    alone = [fit_landmarks(model, x[None], 256).iterations[0]
             for x in np.concatenate([faces.noisy_landmarks[:2], garbage])]
    assert both.iterations.tolist() == alone and len(set(alone)) > 1, alone

    # a budget too small to finish is not convergence, even on clean faces
    short = fit_landmarks(model, faces.noisy_landmarks, 256,
                          FitConfig(slide_min_yaw=90, rounds=1, iters_per_round=1))
    assert not short.converged.any()


def test_degenerate_landmarks_fail_alone(model, faces):
    lm = faces.noisy_landmarks.astype(np.float64)
    equal = np.full((68, 2), 100.0)
    nan = lm[1].copy()
    nan[30] = np.nan
    line = np.c_[np.linspace(50, 200, 68), np.full(68, 128.0)]  # collinear: no vertical extent
    reasons = [validate_landmarks(x, 256) for x in (equal, nan, line, lm[0], lm[2])]
    assert "degenerate" in reasons[0] and "not finite" in reasons[1]
    assert "degenerate" in reasons[2] and reasons[3] is None and reasons[4] is None
    assert "68 x 2" in validate_landmarks(np.zeros((5, 2)), 256)

    batch = fit_landmarks(model, np.stack([equal, lm[0], nan, line, lm[2]]), 256,
                          FitConfig(slide_min_yaw=90))
    assert list(batch.failure[[0, 2, 3]]) == [reasons[0], reasons[1], reasons[2]]
    assert not batch.converged[[0, 2, 3]].any()
    for name in PARAMS:  # failed images keep a finite stand-in, never NaN
        assert np.isfinite(getattr(batch, name)).all(), name
    good = fit_landmarks(model, lm[[0, 2]], 256, FitConfig(slide_min_yaw=90))
    assert_same_fit(good, 0, batch, 1)
    assert_same_fit(good, 1, batch, 4)
    assert good.converged.all()


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_stage2_nan_is_reported_for_that_image_only(model, solver):
    sb = synthetic_batch(model, 3, 128, seed=4, noise_px=1.0)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, FitConfig(slide_min_yaw=90))
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    opts = FitConfig(photometric_iters=6, photometric_render_size=64,
                     photometric_solver=solver)
    clean = refine_photometric(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks, opts)
    assert all(f is None for f in clean.failure) and clean.converged.all()

    img = sb.image.copy()
    ys, xs = np.nonzero(sb.mask[1])
    img[1, ys[len(ys) // 2], xs[len(xs) // 2]] = np.nan  # one NaN pixel inside the face
    poisoned = refine_photometric(model, fit1, img, sb.mask, albedo, sb.noisy_landmarks, opts)
    assert poisoned.failure[1].startswith("non-finite parameters after stage 2")
    assert not poisoned.converged[1] and np.isnan(poisoned.alpha[1]).all()
    for i in (0, 2):
        assert poisoned.failure[i] is None and poisoned.converged[i]
        for name in PARAMS + ("sh", "photometric_error"):
            np.testing.assert_allclose(getattr(poisoned, name)[i], getattr(clean, name)[i],
                                       rtol=1e-5, atol=1e-6, err_msg=name)
    # nothing non-finite leaves stage 2 unflagged
    assert [f is None for f in fit_failures(poisoned)] == [f is None for f in poisoned.failure]


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["adam", "lm"])
def test_stage2_rechecks_landmark_error(model, solver):
    """A stage-2 result whose landmarks drifted is caught by the recomputed NME."""
    sb = synthetic_batch(model, 2, 128, seed=5, noise_px=1.0)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, FitConfig(slide_min_yaw=90))
    albedo = np.repeat(sb.uv_texture[None], 2, 0)
    far = sb.noisy_landmarks.copy()
    far[1] += 40.0  # stage 2 anchored to landmarks 40 px away: its fit cannot match them
    out = refine_photometric(model, fit1, sb.image, sb.mask, albedo, far,
                             FitConfig(photometric_iters=2, photometric_render_size=64, max_nme=0.2,
                                       photometric_solver=solver))
    assert out.failure[0] is None and out.converged[0]
    assert "inter-ocular" in out.failure[1] and not out.converged[1]
    assert out.landmark_nme[1] > 0.2
