"""Per-image skin-colour outliers in UV: the occluders at the edge of the face region.

The cross-fitted EM (:mod:`facecorpus.tasks.occlusion`) judges a texel against a prior built
from *other* images; at the rim of the face region (the forehead under the hairline, the jaw
and chin above the collar) few other images see the texel, so the prior has no support there
and hair strands or a white collar pass as face colour. A shard smaller than
``occlusion.min_images`` gets no EM at all. This cue needs neither: each image's own skin
colour is learnt from its **core** (cheeks, nose and chin inside the jaw line, below the
eyes, away from brows, eyes, nostrils and lips: rarely occluded, almost always seen), and
every visible texel of the rim (within ``skin_rim`` of the visible region's edge) outside
the face's non-skin parts whose colour is far from that model is an occluder. Hysteresis
then follows those flags through connected texels beyond a lower threshold, a bounded number
of texels, deeper than the rim too: a strand's skin-mixed tip and edges (#16).

As in skin detection for 3DMM fitting (Deng et al. 2019 train a Bayes skin classifier; no
skin data can be had here, so the classifier is the image's own core), colour
is compared in log chromaticity, which a white light's shading does not change, plus a loose
log-luminance term for the albedo (colour divided by the fitted SH irradiance when known).

Robust model: a Gaussian whose mean and covariance are re-estimated on the 75 % of core
texels closest to it (a cheap minimum-covariance-determinant), with a floor per axis so a
very uniform core does not make every shading error an outlier.

Shapes: N images, T x T UV texels, V model vertices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from facecorpus.configs.occlusion import OcclusionConfig

#: landmark groups (Multi-PIE 68) that are face but not skin, and their radius in
#: inter-ocular distances on the mean shape
FEATURES = {"brows": (range(17, 27), 0.20), "eyes": (range(36, 48), 0.17),
            "nostrils": (range(31, 36), 0.10), "mouth": (range(48, 68), 0.13)}
#: the core polygon: jaw points 2-14, closed along the lower eye line
CORE_POLYGON = (*range(2, 15), 46, 47, 42, 39, 40, 41)
CORE_SHRINK = 0.92  # towards the polygon's centroid: away from the jaw edge
MIN_COMPONENT = 12  # texels at UV 256^2: smaller flagged components are noise
#: the line cue's zone: above the eye line, outside these landmark groups' radii (inter-ocular
#: distances on the mean shape). Wider than FEATURES: a brow's, an eyelid's or the nose
#: bridge's contour is a line on skin; the cheeks are left out, their nasolabial folds are
#: the strongest lines of a clean face
LINE_EXCLUDE = {"brows": (range(17, 27), 0.22), "eyes": (range(36, 48), 0.30),
                "bridge": (range(27, 31), 0.25)}
_CACHE: dict = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SkinLayout:
    """``core`` (T, T) bool texels a skin model is learnt from; ``judged`` (T, T) bool texels
    that must look like skin (the layout minus brows, eyes, nostrils and lips);
    ``line_zone`` (T, T) bool judged texels where the line cue (:mod:`facecorpus.tasks.
    lines`) may flag: above the eyes (forehead, temples), away from the brows, eyes and
    the nose's bridge; ``line_reach`` (T, T) bool texels a flagged line may be continued
    into (:func:`facecorpus.tasks.lines.continue_lines`): the line zone plus the brow band
    above the eyes (the skin over the brows, where strand tips hang, and the brows)."""

    core: np.ndarray
    judged: np.ndarray
    line_zone: np.ndarray
    line_reach: np.ndarray


def _to_uv(model, flag: np.ndarray, T: int) -> np.ndarray:
    """(V,) per-vertex bool -> (T, T) bool by the UV raster's barycentric majority."""
    from facecorpus.meshops.uv import rasterize_uv

    r = rasterize_uv(model.uv, model.uv_triangles, T)
    face = r.texel_face
    inside = face >= 0
    val = np.zeros((T, T), np.float32)
    corners = flag.astype(np.float32)[np.asarray(model.triangles)[face[inside]]]  # (n, 3)
    val[inside] = (corners * r.texel_bary[inside]).sum(1)
    return inside & (val > 0.5)


def skin_layout(model, T: int) -> SkinLayout:
    """The model's :class:`SkinLayout` at UV size ``T`` (cached per model content and T)."""
    key = (model.content_hash(), int(T))
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    from skimage.measure import points_in_poly

    v = np.asarray(model.vertices, np.float64)
    lm = v[np.asarray(model.landmarks)]
    iod = float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0)))
    feature = np.zeros(len(v), bool)
    for idx, radius in FEATURES.values():
        pts = lm[list(idx)]
        d = np.min(np.linalg.norm(v[:, None, :] - pts[None], axis=2), 1)
        feature |= d < radius * iod
    poly = lm[list(CORE_POLYGON), :2]
    c = poly.mean(0)
    poly = c + CORE_SHRINK * (poly - c)
    # front half only: the polygon is a frontal (x, y) outline; back-facing or deep vertices
    # (mouth bag, eyeballs' backs) must not count
    from facecorpus.meshops.geometry import vertex_normals

    nz = vertex_normals(v, np.asarray(model.triangles))[:, 2]
    core = points_in_poly(v[:, :2], poly) & ~feature & (nz > 0.3)
    line = v[:, 1] > lm[36:48, 1].mean()  # model space: y up
    reach = line.copy()
    for name, (idx, radius) in LINE_EXCLUDE.items():
        d = np.min(np.linalg.norm(v[:, None, :] - lm[list(idx)][None], axis=2), 1)
        line &= d >= radius * iod
        if name != "brows":  # a strand's tip hangs over the brows, never into the eyes
            reach &= d >= radius * iod
    judged = _to_uv(model, ~feature, T)
    line_zone = _to_uv(model, line, T) & judged
    out = SkinLayout(core=_to_uv(model, core, T), judged=judged, line_zone=line_zone,
                     line_reach=_to_uv(model, reach, T) | line_zone)
    for a in (out.core, out.judged, out.line_zone, out.line_reach):
        a.flags.writeable = False
    with _LOCK:
        _CACHE[key] = out
    return out


def _features(y: np.ndarray) -> np.ndarray:
    """(..., 3) colour -> (..., 3) [log R/G, log B/G, log G]."""
    y = np.maximum(np.asarray(y, np.float64), 1e-3)
    lg = np.log(y)
    return np.stack([lg[..., 0] - lg[..., 1], lg[..., 2] - lg[..., 1], lg[..., 1]], -1)


def _robust_gaussian(f: np.ndarray, floor: np.ndarray, keep: float = 0.75, iters: int = 3
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and covariance (3, 3) of the ``keep`` share of rows of f (n, 3) nearest the
    estimate, re-estimated ``iters`` times from a median / MAD start; ``floor`` (3,) std."""
    mu = np.median(f, 0)
    mad = 1.4826 * np.median(np.abs(f - mu), 0)
    cov = np.diag(np.maximum(mad, floor) ** 2)
    # the covariance of a normal's nearest 75 % is shrunk by F5(t) / F3(t) (t its chi2_3
    # quantile): undo it, or every texel beyond the core would look like an outlier
    corr = 3.0 / _trunc_mean_chi2_3(keep)
    for _ in range(iters):
        d2 = _mahalanobis2(f, mu, cov)
        sel = d2 <= np.quantile(d2, keep)
        g = f[sel]
        mu = g.mean(0)
        cov = np.cov(g.T) * corr + np.diag(floor ** 2)
    return mu, cov


def _trunc_mean_chi2_3(q: float) -> float:
    # scipy.stats.chi2's own ppf and cdf (2 gammaincinv(k/2, q), chdtr), from scipy.special:
    # importing scipy.stats cost ~0.35 CPU-s per process for this one number (#12)
    from scipy.special import chdtr, gammaincinv

    t = 2.0 * gammaincinv(1.5, q)
    # E[X | X <= t] for X ~ chi2_3: 3 * F_5(t) / F_3(t)
    return float(3.0 * chdtr(5, t) / chdtr(3, t))


def _mahalanobis2(f: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = f - mu
    return np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)


def skin_outliers(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, layout: SkinLayout,
                  cfg: OcclusionConfig, *, uv_shading: np.ndarray | None = None,
                  uv_occlusion_mask: np.ndarray | None = None, grow: bool = True) -> np.ndarray:
    """Visible texels whose colour is far from the image's own core skin colour.

    Args:
        uv_visible: (N, T, T, 3) float colours in [0, 1]; uv_visible_mask: (N, T, T) bool.
        layout: :func:`skin_layout` of the model at this T.
        cfg: ``occlusion`` config (``skin``, ``skin_threshold``, ``skin_min_core``,
            ``skin_floor``, ``skin_rim``, ``skin_grow_threshold``, ``skin_grow_px``;
            ``lines``, ``line_sigma``, ``line_length``, ``line_threshold``,
            ``line_grow_px``; ``line_continue``, ``line_continue_threshold``,
            ``line_continue_px``).
        uv_shading: (N, T, T, 3) SH irradiance per texel, or None: colours are divided by it
            first (an albedo), which lets the luminance term stay tight.
        uv_occlusion_mask: (N, T, T) bool texels already known occluded: not learnt from
            (still judged, so they may be in the result).
        grow: False: no hysteresis and no line cue whatever ``skin_grow_px`` and ``lines``
            say (the flow's analysis pass, before stage 2's light).

    Returns:
        (N, T, T) bool, True = occluded (within ``uv_visible_mask & layout.judged``, and
        the brow band of ``layout.line_reach`` where a line is continued into it): texels
        at most ``skin_rim`` T from the visible region's edge beyond ``skin_threshold`` in
        components of at least MIN_COMPONENT texels, grown through texels beyond
        ``skin_grow_threshold`` by at most ``skin_grow_px`` texels, plus (``lines``) the
        line zone's texels on a line reached from those flags or ``uv_occlusion_mask`` by
        at most ``line_grow_px`` (:func:`facecorpus.tasks.lines.line_flags`), plus
        (``line_continue``) those lines followed past their ends by at most
        ``line_continue_px`` (:func:`facecorpus.tasks.lines.continue_lines`), then by one;
        all False for an image that sees less than ``skin_min_core`` of the core.
    """
    from scipy.ndimage import binary_dilation, binary_fill_holes, distance_transform_edt, label

    vis = np.asarray(uv_visible_mask, bool)
    out = np.zeros(vis.shape, bool)
    if not (cfg.enabled and cfg.skin):
        return out
    lum_floor = cfg.skin_floor[1] if uv_shading is not None else 2 * cfg.skin_floor[1]
    floor = np.array([cfg.skin_floor[0], cfg.skin_floor[0], lum_floor])
    scale = vis.shape[-1] / 256  # MIN_COMPONENT and skin_grow_px are texels at UV 256^2
    steps = round(cfg.skin_grow_px * scale) if grow else 0
    # a strand narrower than half a texel is a colour mix the skin cue judges, not a line:
    # at line_sigma 0.8 the line cue runs from UV 160^2 up
    line_steps = (round(cfg.line_grow_px * scale)
                  if grow and cfg.lines and cfg.line_sigma * scale >= 0.5 else 0)
    for i in range(len(vis)):
        learn = vis[i] if uv_occlusion_mask is None else vis[i] & ~uv_occlusion_mask[i]
        core = learn & layout.core
        if core.sum() < cfg.skin_min_core * layout.core.sum():
            continue
        y = np.asarray(uv_visible[i], np.float64)
        if uv_shading is not None:
            y = y / np.maximum(np.asarray(uv_shading[i], np.float64), 0.05)
        f = _features(y)
        mu, cov = _robust_gaussian(f[core], floor)
        # texels already known occluded are not learnt from but still judged: in the finish
        # the analysis pass's flags come back through image space on another fit's UV map,
        # and a strand cut by them into pieces would fall under MIN_COMPONENT, its tips
        # beyond the dilation's reach
        skinlike = vis[i] & layout.judged
        # seeds only in the rim: inside, the cross-fitted EM has support and judges texture,
        # not colour (freckles, stubble, make-up are face there)
        # the outer edge: eye and mouth holes do not make a rim
        rim = (distance_transform_edt(binary_fill_holes(vis[i]))
               <= cfg.skin_rim * vis.shape[-1])
        d2 = np.zeros(vis.shape[1:])
        d2[skinlike] = _mahalanobis2(f[skinlike], mu, cov)
        occ = skinlike & rim & (d2 > cfg.skin_threshold)
        # specks are noise, but a hair strand is thin and long: drop small components (an
        # opening would erase the strands too)
        lab, n = label(occ)
        if n:
            size = np.bincount(lab.ravel())
            size[0] = 0
            occ = size[lab] >= max(4, round(MIN_COMPONENT * scale ** 2))
        if steps and occ.any():
            # hysteresis (as in Canny's edges): a strand's tip and its skin-mixed edge texels
            # are less far from skin than its body, and reach deeper than the rim; connected
            # to a confident flag, a lower threshold is evidence enough. Geodesic steps bound
            # how far it goes; brows, eyes, nostrils and lips stay out (not skinlike)
            occ = binary_dilation(occ, iterations=steps,
                                  mask=skinlike & (d2 > cfg.skin_grow_threshold)) | occ
        tips = None
        if line_steps:
            line, tips = _line_cue(f, mu, cov, layout, vis[i], skinlike, occ,
                                   None if uv_occlusion_mask is None else uv_occlusion_mask[i],
                                   cfg, scale, line_steps)
            occ = occ | line | tips
        # an occluder's soft edge is a texel wider; beyond the rim only around deep flags;
        # outside the judged texels (the brows) only beside a line's continuation
        allowed = skinlike if tips is None or not tips.any() else (
            skinlike | (vis[i] & layout.line_reach & binary_dilation(tips, iterations=1)))
        occ = binary_dilation(occ, iterations=1) & allowed & (
            rim | binary_dilation(occ & ~rim, iterations=1))
        out[i] = occ
    return out


def _line_cue(f, mu, cov, layout, vis, skinlike, occ, known, cfg, scale, steps):
    """(line, tips): (T, T) bool line-zone texels on thin lines linked to ``occ`` or
    ``known`` flags, and (``line_continue``) the texels continuing those lines past their
    ends into the line zone and the brow band."""
    from facecorpus.tasks.lines import continue_lines, fill_unknown, line_flags

    flags = occ if known is None else occ | known
    # the residual whitened by the skin model: each channel ~N(0, 1) on this face's skin,
    # clipped so one saturated texel does not make a line of its own. Flagged texels are
    # filled from the skin around them: an occluder's edge is a step, and a step's side
    # lobe beside a flag would be a "line" linked to it
    ok = skinlike & ~flags
    whiten = np.linalg.inv(np.linalg.cholesky(cov)).T
    z = np.zeros(f.shape)
    z[ok] = np.clip((f[ok] - mu) @ whiten, -6.0, 6.0)
    zf = fill_unknown(z, ok, 3.0 * scale)
    line = line_flags(zf, ok & layout.line_zone, flags,
                      sigma=cfg.line_sigma * scale, length=cfg.line_length,
                      threshold=cfg.line_threshold, grow_px=steps,
                      min_depth=max(2, round(cfg.line_min_depth * scale)),
                      max_tilt=cfg.line_max_tilt)
    tips = np.zeros_like(line)
    cont = round(cfg.line_continue_px * scale) if cfg.line_continue else 0
    if cont:
        # the real residual this time over the brow band (the line cue saw it filled from
        # the skin around it: a tip over the brows is judged by its colour there) and over
        # the flags (a strand flagged by any cue has a line's orientation to follow)
        reach = vis & layout.line_reach & ~flags & ~line
        real = ok | reach | (vis & (flags | line) & (skinlike | layout.line_reach))
        new = real & ~ok  # z already holds the whitened residual on ok
        z[new] = np.clip((f[new] - mu) @ whiten, -6.0, 6.0)
        tips = continue_lines(fill_unknown(z, real, 3.0 * scale), real & (flags | line),
                              reach, ok & layout.line_zone, layout.line_zone,
                              sigma=cfg.line_sigma * scale,
                              length=cfg.line_length, seed_threshold=cfg.line_threshold,
                              threshold=cfg.line_continue_threshold, steps=cont,
                              max_tilt=cfg.line_max_tilt)
    return line, tips


def uv_mask_to_image(uv_mask: np.ndarray, uv_sampling_map: np.ndarray,
                     shape: tuple[int, int]) -> np.ndarray:
    """The image pixels a UV mask's texels were sampled from (the inverse of
    ``occlusion.image_mask_to_uv``): each set texel marks the pixel its sample centre falls
    in, and a 1-px closing fills the gaps between texel footprints.

    Args:
        uv_mask: (T, T) bool; uv_sampling_map: (T, T, 2) ``grid_sample`` coordinates
            (align_corners=False); shape: (H, W) of the image.

    Returns:
        (H, W) bool.
    """
    from scipy.ndimage import binary_closing

    H, W = shape
    out = np.zeros((H, W), bool)
    smap = np.asarray(uv_sampling_map, np.float32)[np.asarray(uv_mask, bool)]
    if not len(smap):
        return out
    x = np.floor((smap[:, 0] + 1) * 0.5 * W).astype(np.int64)
    y = np.floor((smap[:, 1] + 1) * 0.5 * H).astype(np.int64)
    ok = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    out[y[ok], x[ok]] = True
    return binary_closing(out, iterations=1) | out


# ------------------------------------------------ synthetic truth (tests, benchmarks)
#: skin albedos from light to dark (linear-ish RGB in [0, 1])
SKIN_TONES = ((0.86, 0.68, 0.58), (0.78, 0.58, 0.46), (0.64, 0.45, 0.33), (0.48, 0.32, 0.23),
              (0.34, 0.22, 0.16))


def skin_texture(model, T: int, base: np.ndarray, tone, rng) -> np.ndarray:
    """(T, T, 3) a skin-like albedo: ``tone`` modulated by the smooth texture's luminance
    (+-10 %) and a little chroma noise, with darker brows and redder lips painted at the
    model's landmarks (smaller than the skin cue's exclusion zones, as real features are)."""
    lum = base.mean(-1, keepdims=True)
    tex = np.asarray(tone) * (1 + 0.2 * (lum - lum.mean())) * (
        1 + 0.03 * rng.standard_normal(3))
    v = np.asarray(model.vertices, np.float64)
    lm = v[np.asarray(model.landmarks)]
    iod = float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0)))
    for idx, r, col in ((range(17, 27), 0.08, (0.25, 0.18, 0.13)),
                        (range(48, 60), 0.07, (0.70, 0.35, 0.33))):
        d = np.min(np.linalg.norm(v[:, None] - lm[list(idx)][None], axis=2), 1)
        zone = _to_uv(model, d < r * iod, T)
        tex[zone] = 0.5 * tex[zone] + 0.5 * np.asarray(col)
    return np.clip(tex, 0.02, 0.98).astype(np.float32)


RIM_KINDS = ("collar", "fringe", "strands")


def paste_rim(kind: str, img: np.ndarray, lm: np.ndarray, rng) -> np.ndarray:
    """The tests' and benchmark's rim occluders (known truth on rendered faces): occluders at
    the face region's rim, where few other images see the texels: a light shirt collar over
    the chin and jaw bottom, a blond or brown fringe over the hairline, or (``strands``) 40
    thin anti-aliased blond or brown strands whose tips hang 0.05-0.2 face widths above the
    brows, as ``scripts/hard_cases.py`` draws them on photos (the tips reach deeper than the
    solid fringe, and the strands' edges mix with the skin). In place on (H, W, 3) ``img``;
    returns the (H, W) bool pasted pixels (``strands``: those at least a quarter strand)."""
    from skimage.draw import polygon

    H, W = img.shape[:2]
    m = np.zeros((H, W), bool)
    face_h = lm[8, 1] - lm[17:27, 1].mean()
    if kind == "collar":
        jaw = lm[3:14].astype(np.float64)
        up = jaw - [0, 0.06 * face_h]
        down = jaw + [0, 0.25 * face_h]
        pts = np.concatenate([up, down[::-1]])
        rr, cc = polygon(pts[:, 1], pts[:, 0], (H, W))
        m[rr, cc] = True
        img[m] = np.array([0.93, 0.93, 0.9]) * (0.85 + 0.1 * rng.random())
    elif kind == "fringe":
        brow = lm[17:27].astype(np.float64)
        lo = brow - [0, 0.18 * face_h]
        hi = brow - [0, 0.6 * face_h]
        lo[:, 1] += 0.06 * face_h * np.sin(np.arange(10) * 1.7 + rng.random() * 6)
        pts = np.concatenate([lo, hi[::-1]])
        rr, cc = polygon(pts[:, 1], pts[:, 0], (H, W))
        m[rr, cc] = True
        col = ((0.86, 0.72, 0.45), (0.35, 0.22, 0.12))[int(rng.random() < 0.5)]
        strands = 0.85 + 0.15 * np.sin(np.arange(W) / 2.0)[None, :].repeat(H, 0)[m]
        img[m] = np.asarray(col) * strands[:, None]
    elif kind == "strands":
        from PIL import Image, ImageDraw

        k = 4  # supersampling: the strands' edges are partial pixels, as in a photo
        fw = float(np.ptp(lm[:, 0]))
        brow_y = float(lm[17:27, 1].min())
        col = np.asarray(((0.78, 0.63, 0.35), (0.24, 0.16, 0.10))[int(rng.random() < 0.5)])
        alpha = np.zeros((H, W))
        paint = np.zeros((H, W, 3))
        for x in np.linspace(lm[17, 0] - 0.05 * fw, lm[26, 0] + 0.05 * fw, 40):
            canvas = Image.new("L", (W * k, H * k))
            y0, y1 = brow_y - 0.5 * fw, brow_y - (0.05 + 0.15 * rng.random()) * fw
            t = np.linspace(0, 1, 12)
            pts = [(k * (x + 0.03 * fw * np.sin(3 * u + x)), k * (y0 + (y1 - y0) * u)) for u in t]
            ImageDraw.Draw(canvas).line(pts, fill=255, width=max(1, round(k * 0.02 * fw)))
            a = np.asarray(canvas, np.float64).reshape(H, k, W, k).mean((1, 3)) / 255
            shade = col * (0.8 + 0.3 * rng.random())
            paint = paint * (1 - a[..., None]) + shade * a[..., None]  # premultiplied "over"
            alpha = alpha + a * (1 - alpha)
        img[:] = img * (1 - alpha[..., None]) + paint
        m = alpha >= 0.25
    else:
        raise ValueError(kind)
    return m
