"""The line cue (tasks/lines.py through tasks/skin.py): thin strands hanging from a flagged
fringe, too close to skin colour for the skin cue texel by texel, are flagged; clean skin
with a wrinkle-like shading line is not, nor is a strand that no flag links to; the cue is
off where the config or the analysis pass says so."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs.occlusion import OcclusionConfig
from facecorpus.tasks import lines, skin

T = 256
CFG = OcclusionConfig(hands=False, person=False)
BLOND = np.array([0.80, 0.66, 0.38])


@pytest.fixture(scope="module")
def face():
    """A skin-toned UV map of the procedural model (medium tone, per-texel noise like pores
    and JPEG), its visible mask, layout, and a flagged fringe band along the top of the
    forehead (what the image cues or the analysis pass hand the finish)."""
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.meshops.uv import rasterize_uv
    from scipy.ndimage import gaussian_filter

    model = procedural_model()
    rng = np.random.default_rng(7)
    vis = rasterize_uv(model.uv, model.uv_triangles, T).mask
    base = np.full((T, T, 3), 0.5) + gaussian_filter(rng.standard_normal((T, T, 1)), 8) * 0.5
    tex = skin.skin_texture(model, T, base, skin.SKIN_TONES[2], rng).astype(np.float64)
    tex *= 1 + 0.03 * rng.standard_normal((T, T, 1))
    lay = skin.skin_layout(model, T)
    rows = np.flatnonzero(lay.line_zone.any(1))
    band = lay.line_zone & (np.arange(T)[:, None] < rows[0] + 6)
    return {"model": model, "vis": vis, "y": np.where(vis[..., None], tex, 0), "lay": lay,
            "band": band, "top": rows[0] + 6}


def _strands(face, mix: float, length: int = 14, gap: int = 0):
    """A copy of the face with thin (1.5-texel, anti-aliased, slanted) blond strands every
    9 texels across the forehead, from ``gap`` rows under the band ``length`` rows down,
    mixed ``mix`` into the skin (a JPEG-diluted strand). Returns (y, strand texels)."""
    y = face["y"].copy()
    zone, top = face["lay"].line_zone, face["top"] + gap
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    cover = np.zeros((T, T))
    for x0 in range(4, T - 4, 9):
        xc = x0 + 0.15 * (yy - top)  # slanted 8.5 degrees
        c = np.clip(1.25 - np.abs(xx - xc), 0, 1) * ((yy >= top) & (yy < top + length))
        cover = np.maximum(cover, c)
    cover *= zone & face["vis"]
    a = mix * cover[..., None]
    y = (1 - a) * y + a * BLOND
    return y, cover >= 0.5


def _run(face, y, cfg=CFG, known=None, grow=True):
    known = face["band"] if known is None else known
    return skin.skin_outliers(y[None], face["vis"][None], face["lay"], cfg,
                              uv_occlusion_mask=known[None], grow=grow)[0]


def test_strands_too_close_to_skin_for_the_colour_cue_are_flagged(face):
    y, strand = _strands(face, mix=0.35)
    off = _run(face, y, CFG.model_copy(update={"lines": False}))
    on = _run(face, y)
    # the premise: texel by texel these strands pass as skin (hysteresis included)
    assert off[strand].mean() < 0.2, off[strand].mean()
    assert on[strand].mean() >= 0.8, on[strand].mean()
    # nothing far from a strand (the final one-texel dilation is the skin cue's)
    from scipy.ndimage import binary_dilation

    far = on & ~binary_dilation(strand, iterations=2) & ~face["band"]
    assert far.sum() <= 0.002 * face["vis"].sum(), far.sum()


def test_a_strand_no_flag_links_to_is_not_flagged(face):
    """The same strands 8 rows under an empty band: lines on clean skin are not occluders
    by themselves (wrinkles, a parting of light); only the link to a flag makes them one."""
    y, strand = _strands(face, mix=0.35)
    on = _run(face, y, known=np.zeros_like(face["band"]))
    assert on[strand].mean() < 0.2, on[strand].mean()


@pytest.mark.parametrize("cont", [0, 8])
def test_the_growth_is_bounded(face, cont):
    """Strands reaching 40 rows down are followed ``line_grow_px`` steps (12) and, past
    where the line cue stops, ``line_continue_px`` more (8, or none when 0), no further."""
    y, strand = _strands(face, mix=0.35, length=40)
    on = _run(face, y, CFG.model_copy(update={"line_continue_px": cont}))
    rows = np.arange(T)[:, None]
    deep = strand & (rows >= face["top"] + 12 + cont + 2 + 2)  # + slant + dilation
    assert on[strand & (rows < face["top"] + 8)].mean() >= 0.8
    assert on[deep].mean() < 0.05, on[deep].mean()
    if cont:
        # the continuation did go on: the rows just past the line cue's reach
        band = strand & (rows >= face["top"] + 12 + 4) & (rows < face["top"] + 12 + cont)
        assert on[band].mean() >= 0.8, on[band].mean()


@pytest.mark.parametrize("axis", ["across", "along"])
def test_wrinkle_like_shading_line_is_not_flagged_beyond_a_bound(face, axis):
    """Clean skin with a forehead wrinkle (1.5 texels, 20 % darker, no hue: shading) 4 rows
    under the flagged band: running across the face the orientation gate rejects it; a
    vertical one (a frown line) is a line linked to the band, and what it adds stays on it."""
    y = face["y"].copy()
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    if axis == "across":
        d = np.abs(yy - (face["top"] + 4 + 0.05 * xx))
    else:
        d = np.abs(xx - 64) + 1e3 * (yy < face["top"])
    cover = np.clip(1.25 - d, 0, 1) * face["lay"].line_zone
    y *= 1 - 0.2 * cover[..., None]
    off = _run(face, y, CFG.model_copy(update={"lines": False}))
    on = _run(face, y)
    added = on & ~off
    wrinkle = cover >= 0.5
    if axis == "across":
        assert added.sum() <= 0.0005 * face["vis"].sum(), added.sum()
    else:
        from scipy.ndimage import binary_dilation

        assert not (added & ~binary_dilation(wrinkle, iterations=2)).any()
        # 12 line steps, 8 continued past the line cue's end, the dilation
        assert added.sum() <= 3 * (12 + 8 + 2), added.sum()


def test_off_by_config_by_pass_and_at_small_uv(face):
    y, _ = _strands(face, mix=0.35)
    base = _run(face, y, CFG.model_copy(update={"lines": False}))
    assert np.array_equal(_run(face, y, CFG.model_copy(update={"line_grow_px": 0})), base)
    # the analysis pass (grow=False): seeds only, as before the cue existed
    assert np.array_equal(_run(face, y, grow=False),
                          _run(face, y, CFG.model_copy(update={"lines": False}), grow=False))


def test_line_strength_is_orientation_selective_and_unit_on_noise():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((128, 128, 1))
    s = lines.line_strength(z, 1.0, 3.0)
    # unit-L2 kernels: on white N(0, 1) the max over 12 orientations of the projected
    # responses is of order 1 (not of the kernels' size)
    assert 0.3 < np.median(s) < 2.5
    v = np.zeros((128, 128, 1))
    v[:, 64] = 3.0  # a vertical line
    h = np.zeros((128, 128, 1))
    h[64, :] = 3.0  # a horizontal one
    assert lines.line_strength(v, 1.0, 3.0, max_tilt=60)[64, 64] > 3 * np.median(s)
    # a horizontal one only through the 60-degree kernels' slant, a seventh as strong
    assert lines.line_strength(h, 1.0, 3.0, max_tilt=60)[64, 64] < 0.2 * lines.line_strength(
        h, 1.0, 3.0)[64, 64]


# ------------------------------------------------ the continuation over the brows
def _brow_band(face):
    """(T, T) bool the brow band the continuation may enter (outside the line zone), and
    per column its first row (-1 where none)."""
    lay = face["lay"]
    band = lay.line_reach & ~lay.line_zone & face["vis"]
    first = np.array([np.flatnonzero(band[:, c])[0] if band[:, c].any() else -1
                      for c in range(T)])
    return band, first


def _tips(face, mix: float, into: int, top: int = 56):
    """Strands (1.5 texels, anti-aliased) every 9 texels over the left brow's columns, hung
    from a flagged band ending at row ``top`` and reaching ``into`` rows into the brow band,
    their mix fading to 0.4 of ``mix`` over their last 8 rows (a tip: thinner, paler).
    Returns (y, strand texels, the flagged band)."""
    brow, first = _brow_band(face)
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    known = face["lay"].line_zone & (yy >= top - 6) & (yy < top)
    cover = np.zeros((T, T))
    for x0 in range(63, 110, 9):
        end = first[x0] + into
        fade = np.clip((end - yy) / 8, 0.4, 1)
        c = np.clip(1.25 - np.abs(xx - x0 - 0.1 * (yy - top)), 0, 1) * (
            (yy >= top) & (yy < end)) * fade
        cover = np.maximum(cover, c)
    cover *= face["vis"]
    a = mix * cover[..., None]
    return (1 - a) * face["y"] + a * BLOND, cover >= 0.2, known


def test_the_continuation_recovers_strand_tips_over_the_brows(face):
    """The fading ends of strands hanging into the brow band: the line cue stops at the
    line zone's edge (and where the response halves), the continuation follows them."""
    from scipy.ndimage import binary_dilation

    brow, _ = _brow_band(face)
    y, strand, known = _tips(face, mix=0.35, into=5)
    off = _run(face, y, CFG.model_copy(update={"line_continue": False}), known=known)
    on = _run(face, y, known=known)
    tips = strand & brow
    assert tips.sum() >= 20, tips.sum()
    assert off[tips].mean() <= 0.1, off[tips].mean()  # the premise
    assert on[tips].mean() >= 0.7, on[tips].mean()
    # what it adds stays on the strands (plus the one-texel dilation)
    added = on & ~off
    assert added.any()
    assert not (added & ~binary_dilation(strand, iterations=2)).any()


def test_a_brow_band_alone_is_not_flagged(face):
    """Dark brow hairs (short strokes 30 degrees off vertical: line-like to the filters)
    under a flagged band and no strand: nothing enters the brow band; pale strands ending
    just above such a brow go no further into it than a bound (the colour gate: a pale
    strand does not continue into dark hairs)."""
    brow, first = _brow_band(face)
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    hairs = np.zeros((T, T))
    for x0 in range(58, 114, 3):
        r0 = first[x0]
        d = np.abs(xx - x0 - 0.58 * (yy - r0))
        hairs = np.maximum(hairs, np.clip(1.25 - d, 0, 1) * ((yy >= r0 + 1) & (yy < r0 + 9)))
    hairs *= brow
    dark = np.array([0.22, 0.15, 0.10])
    _, strand, known = _tips(face, mix=0.35, into=-1)
    for with_strands in (False, True):
        y = _tips(face, mix=0.35, into=-1)[0] if with_strands else face["y"]
        y = (1 - 0.7 * hairs[..., None]) * y + 0.7 * hairs[..., None] * dark
        on = _run(face, y, known=known)
        off = _run(face, y, CFG.model_copy(update={"line_continue": False}), known=known)
        added = (on & ~off & brow & (hairs > 0.2)).sum()
        if not with_strands:
            assert not (on & brow).any(), (on & brow).sum()
            # a flag right above the brows (a fringe down to them) seeds nothing either:
            # only a flagged line does, and the brow hairs are never one
            yy = np.arange(T)[:, None]
            low = face["lay"].line_zone & (yy >= first[None, :] - 6) & (first[None, :] > 0)
            on = _run(face, y, known=low)
            off = _run(face, y, CFG.model_copy(update={"line_continue": False}), known=low)
            assert not (on & ~off & brow).any(), (on & ~off & brow).sum()
        else:
            # 6 strands: at most the dilation's texel and a step or two each
            assert added <= 6 * 4, added
