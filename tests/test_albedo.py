"""De-lit albedo: on faces rendered with a known texture and known SH light, dividing the
unwrapped pseudo-GT by the SH irradiance of the fitted mesh recovers the texture, and
relighting reproduces the pseudo-GT; the face mask and the corpus albedo prior behave."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks.albedo import albedo_prior, delight, face_mask_image, relight
from facecorpus.tasks.fit import synthetic_batch
from facecorpus.tasks.masks import erode
from facecorpus.tasks.prior import robust_mean_texture
from facecorpus.tasks.unwrap import psnr, unwrap_batch

T = 256


def _light(seed: int) -> np.ndarray:
    """A coloured ambient + directional SH light (27,), irradiance ~0.5-1.5 on the face."""
    rng = np.random.default_rng(seed)
    sh = np.zeros(27, np.float32)
    for c in range(3):
        o = 9 * c
        sh[o] = rng.uniform(0.8, 1.0)
        sh[o + 1:o + 4] = rng.uniform(-0.25, 0.25, 3)
        sh[o + 4:o + 9] = rng.uniform(-0.06, 0.06, 5)
    return sh


@pytest.fixture(scope="module")
def scene(model):
    """One face (one known texture; synthetic_batch ties the texture to its seed) under
    four different known lights."""
    sh = np.stack([_light(s) for s in range(4)])
    parts = [synthetic_batch(model, 1, 256, seed=10, sh=sh[i], yaw_max=0) for i in range(4)]
    images = np.concatenate([p.image for p in parts])
    masks = np.stack([erode(p.mask[0], 1) for p in parts])
    from facecorpus.tasks.pseudo_gt import _concat_fits

    truth = _concat_fits([p.truth for p in parts])
    u = unwrap_batch(images, model, truth, T, masks)
    verts = np.stack([truth.vertices(model, i) for i in range(4)])
    rots = np.stack([truth.camera_for(i).rotation for i in range(4)])
    return parts[0].uv_texture, sh, u, verts, rots


def test_delight_recovers_the_texture_and_relights_to_the_pseudo_gt(model, scene):
    tex, sh, u, verts, rots = scene
    # the pseudo-GT equals the photo's colours on visible texels (the blend keeps them)
    pgt = u.uv_visible
    alb = delight(pgt, sh, model, verts, rots, mask=u.uv_visible_mask)
    assert alb.uv_albedo.shape == (4, T, T, 3) and alb.uv_mask.shape == (4, T, T)
    for i in range(4):
        m = alb.uv_mask[i]
        assert m.sum() > 0.9 * u.uv_visible_mask[i].sum()
        lit_psnr = psnr(pgt[i], tex, m)
        alb_psnr = psnr(alb.uv_albedo[i], tex, m)
        assert alb_psnr >= 30.0, (i, alb_psnr)
        assert alb_psnr > lit_psnr + 5.0  # the light really was in the pseudo-GT
        re = relight(alb.uv_albedo, alb.uv_irradiance)[i]
        assert np.abs(re[m] - pgt[i][m]).max() < 1e-5
    # every texel of M_uv is lit enough and unclipped; outside the layout albedo is 0
    assert (alb.uv_irradiance[alb.uv_mask] >= 0.05).all()
    assert (alb.uv_albedo >= 0).all() and (alb.uv_albedo <= 1).all()


def test_delight_clamps_dark_texels_out_of_the_mask(model, scene):
    _, sh, u, verts, rots = scene
    dark = sh.copy()
    dark[:, 0::9] = 0.0  # band 0 off: the irradiance goes negative on half the face
    alb = delight(u.uv_visible, dark, model, verts, rots, mask=u.uv_visible_mask)
    neg = (alb.uv_irradiance < 0.05).any(-1) & u.uv_visible_mask
    assert neg.any()
    assert not (alb.uv_mask & neg).any()
    assert np.isfinite(alb.uv_albedo).all() and (alb.uv_albedo >= 0).all()


def test_albedo_prior_is_the_texture_not_the_lights(model, scene):
    tex, sh, u, verts, rots = scene
    alb = delight(u.uv_visible, sh, model, verts, rots, mask=u.uv_visible_mask)
    p_alb = albedo_prior(alb.uv_albedo, alb.uv_mask)
    p_lit = robust_mean_texture(u.uv_visible, u.uv_visible_mask)
    seen = alb.uv_mask.any(0)
    assert p_alb.source == "corpus-albedo"
    assert psnr(p_alb.mean, tex, seen) >= 30.0
    assert psnr(p_alb.mean, tex, seen) > psnr(p_lit.mean, tex, seen) + 3.0


def test_face_mask_image():
    seg = np.zeros((2, 8, 8), bool)
    seg[:, 1:7, 1:7] = True
    proj = np.zeros((2, 8, 8), bool)
    proj[:, 2:8, 2:8] = True
    occ = np.zeros((2, 8, 8), bool)
    occ[1, 3:5, 3:5] = True
    m = face_mask_image(seg, proj, occ)
    assert m[0].sum() == 25 and m[1].sum() == 21
    assert not (m & ~seg).any() and not (m & ~proj).any() and not (m & occ).any()
    with pytest.raises(ValueError):
        face_mask_image(seg, proj[:, :4])


def test_delight_with_the_fitted_light(model):
    """The pipeline's own fits: stage-1 landmarks, stage-2 photometric SH (shape frozen, the
    true texture as the albedo prior, as a model with an albedo has), then de-lit."""
    from facecorpus.tasks.fit import (
        fit_landmarks,
        refine_photometric,
    )

    sh = np.stack([_light(s) for s in range(2)])
    parts = [synthetic_batch(model, 1, 256, seed=10, sh=sh[i], yaw_max=0, noise_px=0)
             for i in range(2)]
    images = np.concatenate([p.image for p in parts])
    masks = np.stack([erode(p.mask[0], 1) for p in parts])
    lms = np.concatenate([p.landmarks for p in parts])
    tex = parts[0].uv_texture
    fit = fit_landmarks(model, lms, 256, FitConfig(slide_min_yaw=90))
    fit2 = refine_photometric(model, fit, images, masks, np.stack([tex, tex]), lms,
                              FitConfig(photometric_iters=60, photometric_fit_shape=False, photometric_render_size=None))
    u = unwrap_batch(images, model, fit2, T, masks)
    verts = np.stack([fit2.vertices(model, i) for i in range(2)])
    rots = np.stack([fit2.camera_for(i).rotation for i in range(2)])
    alb = delight(u.uv_visible, fit2.sh, model, verts, rots, mask=u.uv_visible_mask)
    for i in range(2):
        m = alb.uv_mask[i]
        assert m.sum() > 0.9 * u.uv_visible_mask[i].sum()
        assert psnr(alb.uv_albedo[i], tex, m) >= 30.0
        re = relight(alb.uv_albedo, alb.uv_irradiance)[i]
        assert np.abs(re[m] - u.uv_visible[i][m]).max() < 1e-5


def _refit_cfg(**kw):
    from facecorpus.configs.pseudo_gt import AlbedoConfig

    return AlbedoConfig(enabled=True, **kw)


@pytest.fixture(scope="module")
def uv_scene(model):
    """A known light on the true mesh, in UV: target = albedo x irradiance (float, exact)."""
    from facecorpus.tasks.albedo import uv_irradiance, uv_sh_basis

    p = synthetic_batch(model, 1, 256, seed=4, yaw_max=0, sh=_light(7), texture_size=128)
    v, rot = p.truth.vertices(model, 0), p.truth.camera_for(0).rotation
    basis = uv_sh_basis(model, v, rot, 128)
    irr = uv_irradiance(model, v[None], rot[None], p.sh, 128)[0]
    u = unwrap_batch(p.image, model, p.truth, 128, p.mask)
    seen = u.uv_visible_mask[0]
    return p.uv_texture, p.sh[0], basis, irr, seen


def test_uv_sh_basis_expands_the_irradiance(uv_scene):
    _, sh, basis, irr, _ = uv_scene
    np.testing.assert_allclose(basis @ sh.reshape(3, 9).T, irr, atol=1e-5)


def test_albedo_light_solve_recovers_the_light_and_resists_occluders(uv_scene):
    from facecorpus.tasks.albedo import fit_albedo_light

    tex, _, basis, irr, seen = uv_scene
    target = tex * irr
    got = fit_albedo_light(target, tex, basis, seen, _refit_cfg())
    irr_got = basis @ got.reshape(3, 9).T
    assert np.abs(irr_got - irr)[seen].max() < 1e-3
    # an unmasked occluder (a white patch over 10% of the seen texels): the Huber
    # reweighting keeps the light close, plain least squares is pulled off
    occ = target.copy()
    ii = np.flatnonzero(seen.ravel())
    hit = np.random.default_rng(0).choice(ii, len(ii) // 10, replace=False)
    occ.reshape(-1, 3)[hit] = 0.95
    err = {}
    for iters in (0, 4):
        s = fit_albedo_light(occ, tex, basis, seen, _refit_cfg(refit_iters=iters))
        e = basis @ s.reshape(3, 9).T - irr
        clean = seen.copy()
        clean.reshape(-1)[hit] = False
        err[iters] = np.abs(e)[clean].mean()
    assert err[4] < 0.5 * err[0], err


def test_albedo_light_solve_rejects_degenerate_inputs(uv_scene):
    from facecorpus.tasks.albedo import fit_albedo_light

    tex, _, basis, irr, seen = uv_scene
    target = tex * irr
    few = np.zeros_like(seen)
    few.reshape(-1)[np.flatnonzero(seen.ravel())[:100]] = True
    with pytest.raises(ValueError, match="degenerate light solve: 100 usable texels"):
        fit_albedo_light(target, tex, basis, few, _refit_cfg())
    with pytest.raises(ValueError, match="usable texels"):  # no reflectance: nothing pins it
        fit_albedo_light(target, np.zeros_like(tex), basis, seen, _refit_cfg())
    with pytest.raises(ValueError, match="usable texels"):  # every texel saturated
        fit_albedo_light(np.ones_like(target), tex, basis, seen, _refit_cfg())
    flat = np.broadcast_to(basis[seen].mean(0), basis.shape)  # one normal: bands collapse
    with pytest.raises(ValueError, match="condition"):
        fit_albedo_light(target, tex, flat, seen, _refit_cfg())
    with pytest.raises(ValueError, match="min_irradiance on only"):  # an unlit photo
        fit_albedo_light(target * 0.01, tex, basis, seen, _refit_cfg())
    fit_albedo_light(target, tex, basis, seen, _refit_cfg())  # the same inputs, sound


def test_light_auto_refits_only_against_an_unlit_prior():
    from facecorpus.tasks.albedo import light_mode

    assert light_mode("auto", "corpus", False) == "stage2"
    assert light_mode("auto", "auto", False) == "stage2"  # no model albedo: a lit corpus mean
    for kind in ("albedo", "user", "albedo_dataset"):
        assert light_mode("auto", kind, False) == "refit"
    assert light_mode("auto", "auto", True) == "refit"
    assert light_mode("refit", "corpus", False) == "refit"  # an explicit choice stands
    assert light_mode("stage2", "albedo", True) == "stage2"
