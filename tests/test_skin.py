"""The per-image skin-colour cue (tasks/skin.py): rim occluders (light collars, fringes) on
rendered skin-toned faces are found without any other image (a shard too small for the EM),
clean faces and their brows and lips are not flagged, and the layout is what it claims."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs.occlusion import OcclusionConfig
from facecorpus.tasks import skin

S, T = 192, 96
CFG = OcclusionConfig(hands=False, person=False)
KINDS = ("collar", "fringe", "clean")


@pytest.fixture(scope="module")
def scene():
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.renderers.render import render
    from facecorpus.tasks import occlusion as O
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.unwrap import unwrap_one

    model = procedural_model()
    N = 6
    b = synthetic_batch(model, N, S, seed=5, yaw_max=25, noise_px=0, texture_size=T)
    rng = np.random.default_rng(1)
    out = {k: [] for k in ("kind", "uv_visible", "uv_visible_mask", "truth", "shading")}
    for i in range(N):
        kind = KINDS[i % 3]
        tex = skin.skin_texture(model, T, b.uv_texture, skin.SKIN_TONES[(2 * i) % 5], rng)
        v, cam = b.truth.vertices(model, i), b.truth.camera_for(i)
        r = render(v, model.triangles, cam, outputs=("image", "mask"), uv=model.uv,
                   uv_triangles=model.uv_triangles, uv_texture=tex, sh=b.sh[i])
        img = np.where(r.mask[0][..., None], r.image[0], rng.uniform(0.2, 0.8, (S, S, 3)))
        pasted = (np.zeros((S, S), bool) if kind == "clean"
                  else skin.paste_rim(kind, img, b.landmarks[i], rng))
        u = unwrap_one(img.astype(np.float32), v, cam, model, T, erode(b.mask[i], 3))
        out["kind"].append(kind)
        out["uv_visible"].append(u.uv_visible[0])
        out["uv_visible_mask"].append(u.uv_visible_mask[0])
        out["truth"].append(O.image_mask_to_uv(pasted & b.mask[i], u.uv_sampling_map[0])
                            & u.uv_visible_mask[0])
        out["shading"].append(O.uv_irradiance(model, v, cam.rotation, b.sh[i], T))
    out = {k: (np.stack(v) if k != "kind" else v) for k, v in out.items()}
    out["model"] = model
    out["layout"] = skin.skin_layout(model, T)
    return out


@pytest.mark.parametrize("light", ["shading", "none"])
def test_rim_occluders_found_in_a_batch_too_small_for_the_em(scene, light):
    sh = scene["shading"] if light == "shading" else None
    for i, kind in enumerate(scene["kind"]):
        # one image at a time: no other image, no prior, as in a 1-photo shard
        occ = skin.skin_outliers(scene["uv_visible"][i:i + 1], scene["uv_visible_mask"][i:i + 1],
                                 scene["layout"], CFG,
                                 uv_shading=None if sh is None else sh[i:i + 1])[0]
        vis, g = scene["uv_visible_mask"][i], scene["truth"][i]
        assert not (occ & ~vis).any()
        if kind == "clean":
            assert occ.sum() / vis.sum() <= 0.01, (light, occ.sum() / vis.sum())
        else:
            assert g.sum() > 50
            recall = (occ & g).sum() / g.sum()
            false = (occ & ~g).sum() / max((vis & ~g).sum(), 1)
            assert recall >= {"fringe": 0.85, "collar": 0.6}[kind], (kind, light, recall)
            assert false <= 0.01, (kind, light, false)


def test_off_and_too_little_core_flag_nothing(scene):
    vis = scene["uv_visible_mask"][1:2]
    args = (scene["uv_visible"][1:2], vis, scene["layout"])
    assert skin.skin_outliers(*args, CFG).any()
    assert not skin.skin_outliers(*args, CFG.model_copy(update={"skin": False})).any()
    assert not skin.skin_outliers(*args, CFG.model_copy(update={"enabled": False})).any()
    # an image that sees a fifth of the core: no model of its skin is learnt
    core = np.argwhere(scene["layout"].core)
    hidden = vis.copy()
    hidden[0][tuple(core[: int(0.8 * len(core))].T)] = False
    assert not skin.skin_outliers(scene["uv_visible"][1:2], hidden, scene["layout"], CFG).any()


def test_known_occluded_texels_are_not_learnt_from(scene):
    """A core half covered by a known (image-cue) occluder of another colour: the skin model
    comes from the rest, and the rim occluder is still found."""
    i = 1  # the fringe face
    y, vis = scene["uv_visible"][i:i + 1].copy(), scene["uv_visible_mask"][i:i + 1]
    core = np.argwhere(scene["layout"].core & vis[0])
    known = np.zeros_like(vis)
    half = tuple(core[: len(core) // 2].T)
    y[0][half] = [0.1, 0.6, 0.1]  # green paint over half the core
    known[0][half] = True
    occ = skin.skin_outliers(y, vis, scene["layout"], CFG, uv_occlusion_mask=known)[0]
    g = scene["truth"][i]
    assert (occ & g).sum() / g.sum() >= 0.9


def test_layout_core_is_skin_and_features_are_excluded(scene):
    lay, model = scene["layout"], scene["model"]
    from facecorpus.meshops.uv import rasterize_uv

    inside = rasterize_uv(model.uv, model.uv_triangles, T).mask
    assert lay.core.sum() > 0.02 * inside.sum()
    assert not (lay.core & ~lay.judged).any()  # the core is skin, never a feature
    assert (inside & ~lay.judged).sum() > 0.02 * inside.sum()  # brows, eyes, lips excluded
    assert not (lay.judged & ~inside).any()
    assert skin.skin_layout(model, T) is lay  # cached


def test_uv_mask_to_image_inverts_image_mask_to_uv():
    """A UV mask moved into the image and back covers the same texels (and little more)."""
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks import occlusion as O
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.unwrap import unwrap_one

    model = procedural_model()
    b = synthetic_batch(model, 1, S, seed=2, yaw_max=20, noise_px=0, texture_size=T)
    u = unwrap_one(b.image[0], b.truth.vertices(model, 0), b.truth.camera_for(0), model, T,
                   b.mask[0])
    vis, smap = u.uv_visible_mask[0], u.uv_sampling_map[0]
    lay = skin.skin_layout(model, T)
    uv = vis & lay.core  # a compact patch
    img = skin.uv_mask_to_image(uv, smap, (S, S))
    assert img.sum() > 0 and not img[~b.mask[0]].any()
    back = O.image_mask_to_uv(img, smap) & vis
    assert (back & uv).sum() / uv.sum() >= 0.98
    assert (back & ~uv).sum() / uv.sum() <= 0.5  # the bilinear footprint's rim
    assert not skin.uv_mask_to_image(np.zeros_like(uv), smap, (S, S)).any()


def _clean(scene):
    return [i for i, k in enumerate(scene["kind"]) if k == "clean"]


def _strand_column(vis, lay, n=16):
    """(x, top): a column whose depth grows one texel a row from its top edge for n rows, it
    and its right neighbour judged (the procedural layout's halves have seams and feature
    zones elsewhere)."""
    from scipy.ndimage import binary_fill_holes, distance_transform_edt

    depth = distance_transform_edt(binary_fill_holes(vis))
    ok = vis & lay.judged
    for x in range(vis.shape[1] - 1):
        top = np.flatnonzero(vis[:, x])
        if len(top) and all(ok[top[0] + r, x] and ok[top[0] + r, x + 1]
                            and round(depth[top[0] + r, x]) == r + 1 for r in range(n)):
            return x, top[0]
    raise AssertionError("no straight column from the top edge")


def test_strand_deeper_than_the_rim_is_grown_into_and_bounded(scene):
    """A dark strand from the visible region's top edge 16 texels down: its part in the rim
    (5 texels here) seeds the cue, the hysteresis follows it ``skin_grow_px`` (6 texels at
    T 96) deeper, one dilation more, and stops there; without hysteresis the rim ends it."""
    from scipy.ndimage import binary_dilation

    lay = scene["layout"]
    for i in _clean(scene):
        y, vis = scene["uv_visible"][i].copy(), scene["uv_visible_mask"][i]
        x, top = _strand_column(vis, lay)
        strand = np.zeros_like(vis)
        strand[top:top + 16, x:x + 2] = True
        y[strand] = [0.25, 0.16, 0.10]
        cfg = CFG.model_copy(update={"skin_rim": 5 / T, "skin_grow_px": 16})
        grown = skin.skin_outliers(y[None], vis[None], lay, cfg)[0]
        flat = skin.skin_outliers(y[None], vis[None], lay,
                                  cfg.model_copy(update={"skin_grow_px": 0}))[0]
        # column x: row r of the strand is r + 1 texels deep (its twin column may be a
        # texel off, so the geodesic steps are counted on x)
        assert grown[top:top + 12, x].all(), i  # 5 rim + 6 grown + 1 dilation
        assert not grown[top + 13:, x:x + 2].any(), i  # bounded
        assert not flat[top + 7:, x:x + 2].any(), i  # the rim (+1 dilation) without it
        assert flat[top:top + 5, x].all(), i
        # the flow's analysis pass asks for seeds only
        assert np.array_equal(skin.skin_outliers(y[None], vis[None], lay, cfg, grow=False)[0],
                              flat), i
        # nothing but the strand and its one-texel edge
        assert not (grown & ~binary_dilation(strand)).any(), i


@pytest.mark.parametrize("light", ["shading", "none"])
@pytest.mark.parametrize("axis", [0, 1])
def test_clean_skin_under_a_shading_gradient_is_not_flagged(scene, light, axis):
    """A light falling off 2.3x across the face (top to bottom or side to side, unclipped)
    changes luminance, not chromaticity: nothing is flagged, and with a strand at the top
    edge the hysteresis does not leak from it into the shaded skin."""
    from scipy.ndimage import binary_dilation

    lay = scene["layout"]
    ramp = np.linspace(0.6, 1.4, T)
    g = ramp[:, None] if axis == 0 else ramp[None, :]
    for i in _clean(scene):
        vis = scene["uv_visible_mask"][i]
        y = scene["uv_visible"][i] * g[..., None]
        y = y * min(1.0, 0.98 / y[vis].max())  # an exposure that clips nothing
        sh = scene["shading"][i:i + 1] if light == "shading" else None
        occ = skin.skin_outliers(y[None], vis[None], lay, CFG, uv_shading=sh)[0]
        assert occ.sum() <= 0.002 * vis.sum(), (i, light, axis, occ.sum() / vis.sum())
        x, top = _strand_column(vis, lay, 8)
        strand = np.zeros_like(vis)
        strand[top:top + 8, x:x + 2] = True
        y[strand] = [0.25, 0.16, 0.10]
        occ = skin.skin_outliers(y[None], vis[None], lay, CFG, uv_shading=sh)[0]
        assert occ[strand].mean() >= 0.9, (i, light, axis)
        leak = occ & ~binary_dilation(strand, iterations=2)
        assert leak.sum() <= 0.002 * vis.sum(), (i, light, axis, leak.sum())


def test_grow_threshold_above_the_seed_threshold_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="skin_grow_threshold"):
        OcclusionConfig(skin_threshold=11.34, skin_grow_threshold=16.27)


def test_truncated_chi2_mean_is_scipy_stats_value():
    """_trunc_mean_chi2_3 left scipy.stats for speed (#12): the same bits as chi2.ppf /
    chi2.cdf, and the truncated mean of chi2_3 lies below its mean 3, rising with q."""
    from facecorpus.tasks.skin import _trunc_mean_chi2_3
    from scipy.stats import chi2

    qs = np.r_[np.linspace(0.05, 0.99, 95), 0.75]
    got = np.array([_trunc_mean_chi2_3(q) for q in qs])
    want = np.array([3.0 * chi2.cdf(chi2.ppf(q, 3), 5) / chi2.cdf(chi2.ppf(q, 3), 3)
                     for q in qs])
    assert np.array_equal(got, want)
    assert (got < 3).all() and (np.diff(got[:-1]) > 0).all()
