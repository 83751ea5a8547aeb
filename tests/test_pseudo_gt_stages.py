"""Texture prior (robust mean, PCA with missing data, per-image fit) and the blend stage."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.tasks.blend import blend_batch
from facecorpus.tasks.fit import smooth_uv_texture
from facecorpus.tasks.prior import (
    TexturePrior,
    build_prior,
    pca_with_missing,
    robust_mean_texture,
)
from facecorpus.tasks.unwrap import psnr

S = 64


def _half_masks(n, rng):
    """Visibility masks that each cover a random ~60% band of the map."""
    yy, xx = np.mgrid[0:S, 0:S]
    masks = []
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi)
        d = np.cos(a) * (xx - S / 2) + np.sin(a) * (yy - S / 2)
        masks.append(d < rng.uniform(0, 8))
    return np.stack(masks)


def test_robust_mean_recovers_texture_despite_exposure_and_occluders():
    rng = np.random.default_rng(0)
    tex = smooth_uv_texture(S, seed=1)
    n = 9
    masks = _half_masks(n, rng)
    gains = rng.uniform(0.8, 1.2, (n, 1, 1, 1))
    vis = np.clip(tex[None] * gains, 0, 1)
    vis[0, 10:30, 10:30] = [0.0, 1.0, 0.0]  # an occluder in one image
    vis = np.where(masks[..., None], vis, 0).astype(np.float32)
    prior = robust_mean_texture(vis, masks)
    seen = masks.sum(0) >= 3
    # exposure is normalised to the median gain: compare up to one global gain per channel
    g = np.median(prior.mean[seen] / tex[seen], 0)
    assert psnr(prior.mean[seen], tex[seen] * g) > 35
    assert np.isfinite(prior.mean).all() and prior.mean.min() >= 0 and prior.mean.max() <= 1
    never = masks.sum(0) == 0
    if never.any():  # holes are filled smoothly, not left black
        assert prior.mean[never].min() > 0.05


def test_fit_to_visible_matches_gain_and_offset():
    tex = smooth_uv_texture(S, seed=2)
    prior = TexturePrior(tex)
    mask = np.zeros((1, S, S), bool)
    mask[0, :, : S // 2] = True
    img = 0.8 * tex + 0.05
    fitted = prior.fit_to_visible(np.where(mask[..., None], img[None], 0), mask)
    assert psnr(fitted[0][:, S // 2:], img[:, S // 2:]) > 40  # predicted on the unseen half


def test_pca_with_missing_finds_the_subspace():
    rng = np.random.default_rng(3)
    mean = smooth_uv_texture(S, seed=4)
    m1, m2 = smooth_uv_texture(S, seed=5) - 0.5, smooth_uv_texture(S, seed=6) - 0.5
    n = 40
    k = rng.normal(0, 1, (n, 2))
    full = mean[None] + 0.6 * (k[:, 0, None, None, None] * m1 + k[:, 1, None, None, None] * m2)
    masks = _half_masks(n, rng)
    vis = np.where(masks[..., None], full, 0).astype(np.float32)
    basis, std = pca_with_missing(vis, masks, mean, rank=2, work_size=32)
    assert basis.shape == (2, S, S, 3) and std[0] >= std[1] > 0
    B = basis.reshape(2, -1)
    np.testing.assert_allclose(B @ B.T, np.eye(2), atol=1e-5)
    # the true modes lie in the recovered span
    for m in (m1, m2):
        v = m.reshape(-1) / np.linalg.norm(m)
        assert np.linalg.norm(B @ v) > 0.97
    p = build_prior(vis, masks, pca_rank=2, pca_min_images=10)
    assert p.source == "corpus+pca" and p.basis.shape[0] == 2


@pytest.mark.slow
def test_blend_with_true_prior_and_mirror(turned_heads_unwrap):
    _, sb, u, mirror, layout = turned_heads_unwrap
    # with the true texture as prior, the visible texels come back unchanged (no seam to
    # correct); without adaptation prior texels are the prior exactly
    prior = np.repeat(sb.uv_texture[None], 2, 0)
    res = blend_batch(u.uv_visible, u.uv_visible_mask, prior, mirror, layout_mask=layout,
                      adapt=False, visible="gradient")
    assert res.uv_pseudo_gt.shape == (2, S, S, 3) and res.uv_source.dtype == np.uint8
    assert ((res.uv_source == 1) == u.uv_visible_mask).all()
    assert (res.uv_source == 2).any()  # turned heads: the far side comes from the mirror
    for i in range(2):
        vm = res.uv_source[i] == 1
        assert psnr(res.uv_pseudo_gt[i], sb.uv_texture, vm) > 35
        pm = (res.uv_source[i] == 0) & layout
        np.testing.assert_allclose(res.uv_pseudo_gt[i][pm], np.clip(prior[i][pm], 0, 1))
    assert (res.uv_pseudo_gt[:, ~layout] == 0).all()
    # a flat prior: without adaptation pass 1 pulls the visible texels towards the prior
    # (detail kept up to a smooth offset); adapting the prior keeps them (the photo) as is
    flat = np.full((S, S, 3), 0.5, np.float32)
    raw = blend_batch(u.uv_visible, u.uv_visible_mask, flat, mirror, layout_mask=layout,
                      adapt=False, visible="gradient")
    ada = blend_batch(u.uv_visible, u.uv_visible_mask, flat, mirror, layout_mask=layout,
                      visible="gradient")
    vm = u.uv_visible_mask[0]
    d = raw.uv_pseudo_gt[0] - sb.uv_texture
    assert np.abs(d[vm] - d[vm].mean(0)).mean() < 0.05
    assert psnr(ada.uv_pseudo_gt[0], u.uv_visible[0], vm) > 33
    assert psnr(ada.uv_pseudo_gt[0], u.uv_visible[0], vm) > psnr(raw.uv_pseudo_gt[0],
                                                                 u.uv_visible[0], vm) + 6


def test_analysis_work_file_round_trips_and_is_compressed():
    """Analysis.to_bytes writes its .npz at zlib level 1 (core.atomic.npz_bytes, #12):
    np.load without pickles gives back every array bit for bit (dtypes, shapes, text),
    the rejected rows too, and the masks and flat maps are deflated, not stored."""
    from facecorpus.tasks.pseudo_gt import Analysis, RejectedRow, npz_bytes

    rng = np.random.default_rng(3)
    arrays = {"image": rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8),
              "mask": np.zeros((2, 64, 64), bool),
              "uv_visible": rng.random((2, 32, 32, 3)).astype(np.float16),
              "sample_uri": np.array(["a.png", "b/ü.png"], dtype=np.str_),
              "fit_yaw": np.array([0.1, -0.2])}
    a = Analysis(arrays, [RejectedRow("c.png", "ingest", "empty file")])
    data = a.to_bytes()
    back = Analysis.from_bytes(data)
    assert back.rejected == a.rejected and set(back.arrays) == set(arrays)
    for k, v in arrays.items():
        got = back.arrays[k]
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), k
    raw = sum(v.nbytes for v in arrays.values())
    assert len(data) < raw
    flat = {"m": np.zeros((8, 256, 256), bool)}
    assert len(npz_bytes(flat)) < flat["m"].nbytes / 50
