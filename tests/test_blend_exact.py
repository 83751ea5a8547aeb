"""The exact-visible blend (``blend.visible: exact``): the visible texels keep the photo's
values, the prior is shifted by a Poisson solve to meet them, and the rest of the two-pass
blend (mirror pass, layout, fade, solvers) is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.poisson import (
    SOURCE_MIRRORED,
    SOURCE_VISIBLE,
    poisson_residual,
    two_pass_blend,
)
from scipy import ndimage as ndi

S = 64


def _scene(seed=0):
    """A face-like covered disc, a smooth texture, a visible region on one side with an
    occluded spot, and a flip mirror map inside the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    covered = ((xx - S / 2 + 0.5) / 28.0) ** 2 + ((yy - S / 2 + 0.5) / 30.0) ** 2 < 1
    texture = ndi.gaussian_filter(rng.random((S, S, 3)), (2, 2, 0)).astype(np.float32)
    visible = covered & (xx < 40)
    visible &= ~((yy - 20) ** 2 + (xx - 28) ** 2 < 5)
    mm = -np.ones((S, S, 2), np.int32)
    r, c = np.nonzero(covered)
    ok = covered[r, S - 1 - c]
    mm[r[ok], c[ok], 0] = r[ok]
    mm[r[ok], c[ok], 1] = S - 1 - c[ok]
    return covered, texture, visible, mm


def test_exact_keeps_visible_texels_and_solves_the_prior_side():
    _, texture, visible, _ = _scene(1)
    no_mirror = -np.ones((S, S, 2), np.int32)
    xx = np.mgrid[:S, :S][1]
    prior = (texture + 0.1 + 0.002 * xx[..., None]).astype(np.float32)  # offset + a ramp
    uv_vis = np.where(visible[..., None], texture, 0).astype(np.float32)
    out, src = two_pass_blend(uv_vis, visible, prior, no_mirror, visible="exact")
    assert np.array_equal(out[visible], uv_vis[visible])  # bit-exact, not just close
    assert (src[visible] == SOURCE_VISIBLE).all()
    # pass 1 is the Poisson problem over the non-visible texels: prior gradients, photo values
    target = np.where(visible[..., None], uv_vis, prior)
    assert poisson_residual(out, target, prior, ~visible) < 1e-5
    # the prior differs from the truth by an offset and a ramp only: its gradients are the
    # truth's plus a constant, so next to the visible region the result is the truth again
    ring = ndi.binary_dilation(visible, iterations=3) & ~visible
    assert np.abs(out[ring] - texture[ring]).max() < 0.02
    # the gradient form moves the visible texels by the prior/photo mismatch instead
    grad, _ = two_pass_blend(uv_vis, visible, prior, no_mirror)
    assert np.abs(grad[visible] - texture[visible]).mean() > 0.05


def test_exact_mirror_pass_and_domain():
    covered, texture, visible, mm = _scene(2)
    prior = np.full((S, S, 3), 0.3, np.float32)
    uv_vis = np.where(visible[..., None], texture, 0).astype(np.float32)
    out, src = two_pass_blend(uv_vis, visible, prior, mm, visible="exact", domain=covered)
    _, g_src = two_pass_blend(uv_vis, visible, prior, mm)
    assert np.array_equal(src, g_src)  # where a texel comes from does not depend on the form
    assert np.array_equal(out[visible], uv_vis[visible])
    mirrored = src == SOURCE_MIRRORED
    assert mirrored.sum() > 200
    # outside the domain pass 1 is the nearest domain texel's value (no solve there), so
    # the outside does not keep the unshifted prior's 0.3
    _, (ri, ci) = ndi.distance_transform_edt(~covered, return_indices=True)
    outside = ~covered & ~mirrored[ri, ci]  # pass 2 changed those nearest texels after
    assert outside.sum() > 100
    assert np.array_equal(out[outside], out[ri[outside], ci[outside]])
    # a flat prior has zero gradients: inside the domain, away from the mirrored region,
    # the prior side becomes a membrane through the visible border's values (in their range)
    pri_side = covered & (src == 0)
    lo, hi = uv_vis[visible].min(0), uv_vis[visible].max(0)
    assert (out[pri_side] >= lo - 1e-4).all() and (out[pri_side] <= hi + 1e-4).all()
    with pytest.raises(ValueError, match="visible"):
        two_pass_blend(uv_vis, visible, prior, mm, visible="nearest")
    with pytest.raises(ValueError, match="domain"):
        two_pass_blend(uv_vis, visible, prior, mm, visible="exact", domain=covered[:10])


def test_exact_batch_equals_single_maps():
    rng = np.random.default_rng(3)
    covered, _, _, mm = _scene(3)
    vis = rng.random((3, S, S, 3)).astype(np.float32)
    masks = (rng.random((3, S, S)) < 0.5) & covered
    prior = rng.random((S, S, 3)).astype(np.float32)
    out, src = two_pass_blend(vis, masks, prior, mm, visible="exact", domain=covered)
    o1, s1 = two_pass_blend(vis[1], masks[1], prior, mm, visible="exact", domain=covered)
    assert np.array_equal(out[1], o1) and np.array_equal(src[1], s1)


def test_blend_batch_exact_on_an_unwrapped_face(turned_heads_unwrap):
    """The stage on a real unwrap (procedural model, turned heads): visible texels keep
    ``uv_visible``; prior texels are the gradient path's adapted prior (same equations)."""
    from facecorpus.tasks.blend import blend_batch

    _, _, u, mirror, layout = turned_heads_unwrap
    flat = np.full((S, S, 3), 0.5, np.float32)  # far from the texture: a large mismatch
    ex = blend_batch(u.uv_visible, u.uv_visible_mask, flat, mirror, layout_mask=layout,
                     visible="exact")
    gr = blend_batch(u.uv_visible, u.uv_visible_mask, flat, mirror, layout_mask=layout,
                     visible="gradient")
    assert np.array_equal(ex.uv_source, gr.uv_source)
    vm = u.uv_visible_mask
    assert np.array_equal(ex.uv_pseudo_gt[vm], np.clip(u.uv_visible[vm], 0, 1))
    assert (ex.uv_pseudo_gt[:, ~layout] == 0).all()
    pm = (ex.uv_source == 0) & layout[None]
    assert pm.any() and np.abs(ex.uv_pseudo_gt[pm] - gr.uv_pseudo_gt[pm]).max() < 2e-3
    # no seam: across the visible border the step is no larger than inside the texture
    for i in range(2):
        v = vm[i]
        edge = v & ndi.binary_dilation(~v & layout, iterations=1)
        out_ring = ndi.binary_dilation(v, iterations=1) & ~v & layout
        step = abs(ex.uv_pseudo_gt[i][out_ring].mean(0) - ex.uv_pseudo_gt[i][edge].mean(0))
        assert step.max() < 0.05
    with pytest.raises(ValueError, match="visible"):
        blend_batch(u.uv_visible, vm, flat, mirror, visible="both")


def test_exact_with_the_torch_solver():
    from facecorpus.meshops.poisson_torch import poisson_blend_torch

    covered, texture, visible, mm = _scene(4)
    prior = (texture[::-1] * 0.8 + 0.1).astype(np.float32)
    uv_vis = np.where(visible[..., None], texture, 0).astype(np.float32)
    a, sa = two_pass_blend(uv_vis, visible, prior, mm, visible="exact", domain=covered)
    b, sb = two_pass_blend(uv_vis, visible, prior, mm, visible="exact", domain=covered,
                           solver=poisson_blend_torch)
    assert np.array_equal(sa, sb) and np.array_equal(b[visible], uv_vis[visible])
    assert np.abs(a - b).max() < 2e-3


def test_blend_visible_config():
    from facecorpus.configs import load_config, parse_set
    from facecorpus.core.errors import ConfigError

    assert load_config(None, "pseudo_gt", None).blend.visible in ("gradient", "exact")
    cfg = load_config(None, "pseudo_gt", parse_set(["blend.visible=exact"]))
    assert cfg.blend.visible == "exact"
    with pytest.raises(ConfigError):
        load_config(None, "pseudo_gt", parse_set(["blend.visible=photo"]))


def test_trim_edge_peels_rings_per_map():
    from facecorpus.tasks.masks import trim_edge

    m = np.zeros((2, 12, 12), bool)
    m[0, 2:10, 2:10] = True
    m[1, :, :6] = True  # touches the map border: that counts as an edge too
    t1 = trim_edge(m, 1)
    assert t1[0].sum() == 36 and t1[0, 3:9, 3:9].all()
    assert t1[1].sum() == 10 * 4 and t1[1, 1:11, 1:5].all()
    assert trim_edge(m, 2)[0].sum() == 16
    assert trim_edge(m, 0) is m


def test_edge_trim_keeps_a_dark_edge_texel_out_of_the_fill():
    """A dark texel on the visible region's edge (a grazing-angle or mask-edge sample): kept,
    it is Dirichlet data the exact fill spreads from; trimmed, it is filled like a hidden
    texel and the map stays near the texture there."""
    from facecorpus.tasks.blend import blend_batch

    covered, texture, visible, _ = _scene(5)
    no_mirror = -np.ones((S, S, 2), np.int32)
    uv_vis = np.where(visible[..., None], texture, 0).astype(np.float32)
    edge = visible & ndi.binary_dilation(~visible & covered)
    r, c = S // 2 + 5, 39  # on the border between the visible side and the hidden one
    assert edge[r, c]
    uv_vis[r, c] = 0.0
    kept = blend_batch(uv_vis[None], visible[None], texture, no_mirror, layout_mask=covered,
                       edge_trim=0)
    trim = blend_batch(uv_vis[None], visible[None], texture, no_mirror, layout_mask=covered,
                       edge_trim=1)
    ring = visible & ~ndi.binary_erosion(visible, ndi.generate_binary_structure(2, 1),
                                         border_value=0)
    assert (trim.uv_source[0][ring] != SOURCE_VISIBLE).all()
    assert (trim.uv_source[0][visible & ~ring] == SOURCE_VISIBLE).all()
    assert np.array_equal(trim.uv_pseudo_gt[0][visible & ~ring], uv_vis[visible & ~ring])
    near = np.zeros((S, S), bool)
    near[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = True
    near &= covered & ~visible  # the hidden side next to the speck
    assert near.any()
    err_kept = np.abs(kept.uv_pseudo_gt[0][near] - texture[near]).mean()
    err_trim = np.abs(trim.uv_pseudo_gt[0][near] - texture[near]).mean()
    assert err_kept > 0.03 and err_trim < err_kept / 3
    assert abs(trim.uv_pseudo_gt[0][r, c] - texture[r, c]).max() < 0.05
