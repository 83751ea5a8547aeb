"""Stage 2 on a torch device (``fit.device``, ``fit.rasterizer``), tested on CPU tensors: the
torch rasterizer reaches the numba path's quality on synthetic faces with known truth, images
stay independent, and the config validates device and rasterizer before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks.fit import (
    fit_landmarks,
    refine_photometric,
    rotation_error_deg,
    synthetic_batch,
)

PARAMS = ("yaw", "pitch", "roll", "translation", "scale", "focal", "alpha", "beta", "sh",
          "photometric_error")


@pytest.mark.slow
@pytest.mark.parametrize("camera", ["orthographic", "perspective"])
def test_torch_rasterizer_matches_numba_quality(model, camera):
    sb = synthetic_batch(model, 4, 192, seed=3, noise_px=3.0, camera=camera)
    base = FitConfig(slide_min_yaw=90, camera=camera)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 192, base)
    albedo = np.repeat(sb.uv_texture[None], 4, 0)
    out = {}
    for r in ("numba", "torch"):
        opts = FitConfig(**{**base.model_dump(), "photometric_iters": 30,
                            "photometric_render_size": 96, "rasterizer": r,
                            "photometric_solver": "adam"})
        out[r] = refine_photometric(model, fit1, sb.image, sb.mask, albedo,
                                    sb.noisy_landmarks, opts)
    e1 = rotation_error_deg(fit1, sb.truth)
    en, et = (rotation_error_deg(out[r], sb.truth) for r in ("numba", "torch"))
    assert np.median(et) <= np.median(e1) and np.median(et) < 2.0, (e1, et)
    np.testing.assert_allclose(et, en, atol=0.1)  # degrees
    np.testing.assert_allclose(out["torch"].photometric_error, out["numba"].photometric_error,
                               rtol=0.02)
    assert all(f is None for f in out["torch"].failure)


@pytest.mark.slow
def test_torch_rasterizer_keeps_images_independent(model):
    sb = synthetic_batch(model, 3, 128, seed=4, noise_px=1.0)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, FitConfig(slide_min_yaw=90))
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    opts = FitConfig(photometric_iters=6, photometric_render_size=64, rasterizer="torch",
                     photometric_solver="adam")
    clean = refine_photometric(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks, opts)
    img = sb.image.copy()
    ys, xs = np.nonzero(sb.mask[1])
    img[1, ys[len(ys) // 2], xs[len(xs) // 2]] = np.nan  # one NaN pixel inside the face
    poisoned = refine_photometric(model, fit1, img, sb.mask, albedo, sb.noisy_landmarks, opts)
    assert poisoned.failure[1].startswith("non-finite parameters after stage 2")
    for i in (0, 2):
        assert poisoned.failure[i] is None and poisoned.converged[i]
        alone = refine_photometric(model, fit1.select([i]), sb.image[[i]], sb.mask[[i]],
                                   albedo[[i]], sb.noisy_landmarks[[i]], opts)
        for name in PARAMS:
            for other in (poisoned, clean):
                np.testing.assert_allclose(getattr(other, name)[i], getattr(alone, name)[0],
                                           rtol=1e-5, atol=1e-6, err_msg=name)


def test_device_and_rasterizer_validation():
    assert FitConfig().resolved_device() == "cpu"
    assert FitConfig().resolved_rasterizer() == "numba"  # today's path stays the default
    adam = {"photometric_solver": "adam", "photometric_iters": 40}  # the device path's solver
    assert FitConfig(rasterizer="torch", **adam).resolved_rasterizer() == "torch"
    with pytest.raises(ValueError, match="fit.device"):
        FitConfig(device="gpu")
    with pytest.raises(ValueError, match="adam only"):
        FitConfig(rasterizer="torch", photometric_solver="lm")
    if torch.cuda.is_available():
        assert FitConfig(device="cuda", **adam).resolved_rasterizer() == "torch"
        with pytest.raises(ValueError, match="CPU only"):
            FitConfig(device="cuda", rasterizer="numba", **adam)
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            FitConfig(device="cuda", **adam)
        with pytest.raises(ValueError, match="lm runs on the CPU"):  # the default solver
            FitConfig(device="cuda")
        assert FitConfig(device="auto").resolved_device() == "cpu"
        assert FitConfig(device="auto").resolved_rasterizer() == "numba"
