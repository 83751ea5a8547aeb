"""Thin line-shaped occluders in UV: hair strands over the forehead, thin frames (#16).

The skin cue (:mod:`facecorpus.tasks.skin`) judges one texel's colour at a time. A thin
blond strand on brown skin, its chroma diluted by JPEG's subsampling and each texel half
strand, is within chi2 11.34 of the skin model texel by texel; what gives it away is that
its small colour difference is the *same* along a line a few texels long. This cue looks for
that: oriented second-derivative filters (the across-line second derivative of a Gaussian
of width ``line_sigma``, times a Gaussian ``line_length`` times longer along the line, at
``LINE_ANGLES`` orientations) on the per-texel residual against the image's own skin model
(whitened: each of the 3 channels is ~N(0, 1) on skin), so a line brighter, darker or of
another hue than the skin responds, and a pixel-sized speck or a blob barely does.

Guards against what is not an occluder:

- **where**: only in the line zone of :class:`facecorpus.tasks.skin.SkinLayout`: forehead,
  temples and cheeks away from brows, eyes, the nose and the mouth, whose contours are
  lines too (the zone is built from the model's landmarks on its mean shape);
- **contrast**: the response is in units of its own spread over the image's line zone
  (robust: median + MAD), so a wrinkle's or a pore's shading, which is everywhere on clean
  skin, sets the scale rather than passing it;
- **linked**: a line texel is flagged only through hysteresis from an existing flag (the
  skin cue's, the image cues', the analysis pass's): geodesically through line texels by at
  most ``line_grow_px``. A strand hangs from the hair that is already flagged; a wrinkle on
  a clean forehead touches no flag.

Past a line's end (:func:`continue_lines`, ``line_continue``): where a strand thins out the
oriented response falls to about half and the threshold stops short of it, and its tip over
the brows lies outside the line zone. A directional hysteresis follows each flagged line
along its own orientation, at a lower threshold and in the line's own colour direction,
``line_continue_px`` steps at most, into the brow band only as such a continuation (no seed
there: a brow is never flagged by itself).

Shapes: T x T UV texels.
"""

from __future__ import annotations

import threading

import numpy as np

#: filter orientations (the kernels' across-line directions), evenly over 180 degrees
LINE_ANGLES = 12
#: lowest robust spread of the strength (whitened units): photos' line zones measure
#: 0.15-0.6 (docs/benchmarks.md); a smooth rendered face would measure ~0, and every shading
#: ripple would pass a threshold in units of it
MAD_FLOOR = 0.15
_KERNELS: dict = {}
_LOCK = threading.Lock()


def kernel_radius(sigma: float, length: float) -> int:
    """Half-width in texels of the oriented kernels (3 std along the line)."""
    return int(np.ceil(3 * sigma * max(length, 1.0)))


def _kernel_ffts(H: int, W: int, sigma: float, length: float) -> np.ndarray:
    """(LINE_ANGLES, H, W // 2 + 1) complex rFFTs of the zero-mean, unit-L2 oriented
    second-derivative kernels on an H x W grid (cached): unit L2 norm makes the response of
    each channel ~N(0, 1) on white N(0, 1) input at every orientation."""
    key = (int(H), int(W), float(sigma), float(length))
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is not None:
        return hit
    r = kernel_radius(sigma, length)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    out = np.empty((LINE_ANGLES, H, W // 2 + 1), np.complex128)
    for k in range(LINE_ANGLES):
        th = np.pi * k / LINE_ANGLES
        u = xx * np.cos(th) + yy * np.sin(th)  # across the line
        v = -xx * np.sin(th) + yy * np.cos(th)  # along it
        g = np.exp(-0.5 * (u / sigma) ** 2 - 0.5 * (v / (sigma * length)) ** 2)
        # minus the second derivative across: positive on a bright ridge (a dark one is
        # negative; the caller takes the magnitude over the colour channels)
        kern = (1 - (u / sigma) ** 2) * g
        kern -= kern.mean()
        kern /= np.linalg.norm(kern)
        pad = np.zeros((H, W))
        pad[:2 * r + 1, :2 * r + 1] = kern
        pad = np.roll(pad, (-r, -r), (0, 1))  # centred at texel (0, 0): no shift
        out[k] = np.fft.rfft2(pad)
    out.flags.writeable = False
    with _LOCK:
        _KERNELS[key] = out
    return out


def fill_unknown(z: np.ndarray, known: np.ndarray, sigma: float) -> np.ndarray:
    """(T, T, C) ``z`` with the texels outside ``known`` set to the Gaussian-weighted mean of
    the known ones nearby (normalised convolution, std ``sigma`` texels; 0 where none is
    near). Why: a constant fill makes a step wherever the skin beside it is off the mean
    (the shaded rim, the hairline), and a step's side lobes look like a line."""
    from scipy.ndimage import gaussian_filter

    w = np.asarray(known, np.float64)
    num = gaussian_filter(np.asarray(z, np.float64) * w[..., None], (sigma, sigma, 0))
    den = gaussian_filter(w, sigma)[..., None]
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    return np.where(w[..., None] > 0, z, fill)


def line_strength(z: np.ndarray, sigma: float, length: float, max_tilt: float = 90.0
                  ) -> np.ndarray:
    """(H, W) the strongest oriented line response of a whitened residual.

    Args:
        z: (H, W, C) residual, ~N(0, 1) per channel on skin, 0 where nothing is known
            (outside the judged texels: the filters see skin there, no edge).
        sigma: the across-line Gaussian's std in texels; length: along / across.
        max_tilt: only lines at most this many degrees from the UV vertical (the face's
            up-down) count; 90: every orientation.

    Returns:
        (H, W) float, the max over orientations of the responses (C,) projected on the
        texel's own colour direction: ``r . zs / max(|zs|, 1)``, ``zs`` the residual
        smoothed by ``sigma / 2``. A strand may be brighter, darker or of another hue: on
        it the response has the sign of its colour, so it counts whatever the colour; the
        skin beside it, where the kernels' side lobes answer with the opposite sign and the
        texel's residual is small, does not (between parallel strands it would be a line
        too). Circular convolution: the caller's border of skin keeps the wrap harmless.
    """
    ks, resp, _ = oriented_responses(z, sigma, length, max_tilt)
    return resp.max(0) if len(ks) else np.full(z.shape[:2], -np.inf)


def allowed_angles(max_tilt: float) -> np.ndarray:
    """Indices k of the kernels whose line runs at most ``max_tilt`` degrees from the UV
    vertical (kernel k's line runs at 180 k / LINE_ANGLES degrees from it)."""
    k = np.arange(LINE_ANGLES)
    return k[np.minimum(k, LINE_ANGLES - k) * 180.0 / LINE_ANGLES <= max_tilt + 1e-9]


def oriented_responses(z: np.ndarray, sigma: float, length: float, max_tilt: float = 90.0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-orientation responses behind :func:`line_strength`.

    Returns:
        ks (K,) kernel indices within ``max_tilt``; resp (K, H, W) each kernel's response
        projected on the texel's colour direction (``r . zs / max(|zs|, 1)``); zs (C, H, W)
        the residual smoothed by ``sigma / 2`` (not normalised).
    """
    from scipy.ndimage import gaussian_filter

    H, W = z.shape[:2]
    z = np.asarray(z, np.float64)
    K = _kernel_ffts(H, W, sigma, length)
    Z = np.fft.rfft2(np.moveaxis(z, -1, 0))  # (C, H, W//2+1)
    zs = np.moveaxis(gaussian_filter(z, (sigma / 2, sigma / 2, 0)), -1, 0)
    zn = zs / np.maximum(np.sqrt((zs ** 2).sum(0)), 1.0)
    ks = allowed_angles(max_tilt)
    resp = np.empty((len(ks), H, W))
    for i, k in enumerate(ks):
        r = np.fft.irfft2(Z * K[k][None], s=(H, W))
        resp[i] = (r * zn).sum(0)
    return ks, resp, zs


def line_flags(z: np.ndarray, zone: np.ndarray, seeds: np.ndarray, *, sigma: float,
               length: float, threshold: float, grow_px: int, min_depth: int = 1,
               max_tilt: float = 90.0) -> np.ndarray:
    """(T, T) bool texels of the line zone on a line linked to ``seeds``.

    Args:
        z: (T, T, C) whitened residual against the skin model (0 where unknown).
        zone: (T, T) bool texels the cue may flag (line zone, visible, judged).
        seeds: (T, T) bool existing flags the hysteresis starts from.
        sigma, length, max_tilt: the filters (:func:`line_strength`).
        threshold: robust z-score of the strength (over ``zone``) above which a texel is on
            a line.
        grow_px: geodesic steps from the seeds through line texels (0: nothing flagged).
        min_depth: a connected piece of line texels is flagged only if it reaches this many
            steps from the seeds.

    Returns:
        (T, T) bool within ``zone``, not including ``seeds`` themselves.
    """
    from scipy.ndimage import binary_dilation, label

    zone = np.asarray(zone, bool)
    seeds = np.asarray(seeds, bool)
    out = np.zeros(zone.shape, bool)
    if grow_px <= 0 or zone.sum() < 50 or not seeds.any():
        return out
    # filter only the zone's bounding box plus the kernels' reach: the same responses
    # inside the zone (no wrap-around reaches it), a third of the work for a forehead
    rr, cc = np.nonzero(zone)
    m = kernel_radius(sigma, length) + 1
    r0, r1 = max(rr.min() - m, 0), min(rr.max() + m + 1, zone.shape[0])
    c0, c1 = max(cc.min() - m, 0), min(cc.max() + m + 1, zone.shape[1])
    s = np.full(zone.shape, -np.inf)
    s[r0:r1, c0:c1] = line_strength(z[r0:r1, c0:c1], sigma, length, max_tilt)
    v = s[zone]
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    line = zone & (s > med + threshold * max(mad, MAD_FLOOR))
    # seeds are outside the zone mostly (the hair, the fringe body): the growth leaves them,
    # then stays on line texels; ``depth`` counts its geodesic steps
    depth = np.zeros(zone.shape, np.int32)
    reached = seeds.copy()
    for step in range(1, grow_px + 1):
        nxt = binary_dilation(reached, mask=line) & ~reached
        if not nxt.any():
            break
        depth[nxt] = step
        reached |= nxt
    grown = reached & ~seeds
    # a flag's anti-aliased edge runs along it, one or two texels out, and is a line too; a
    # strand leaves its hair: keep the components that reach min_depth steps away
    lab, n = label(grown, structure=np.ones((3, 3)))
    if not n:
        return out
    far = np.zeros(n + 1, bool)
    far[np.unique(lab[depth >= min_depth])] = True
    far[0] = False
    return far[lab]


#: the continuation's steps: the 8 neighbours (row, col)
_STEPS = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)


def continue_lines(z: np.ndarray, flagged: np.ndarray, reach: np.ndarray, zone: np.ndarray,
                   seed_zone: np.ndarray, *,
                   sigma: float, length: float, seed_threshold: float, threshold: float,
                   steps: int,
                   max_tilt: float = 90.0, max_turn: int = 1, min_cos: float = 0.7,
                   step_tol: float = 30.0) -> np.ndarray:
    """(T, T) bool texels of ``reach`` that continue the flagged lines past their ends.

    A strand's end is where an oriented filter's response falls to about half (the kernel
    runs off the strand), so the line cue's threshold stops short of it, and its skin-mixed
    tip over the brows is outside the line zone anyway. A directional hysteresis follows
    it: from each flagged texel of the line zone that is on a line (its strongest response
    beyond ``seed_threshold``: a strand flagged by any cue, not a flagged blob's inside),
    step to the neighbour along the texel's own line
    orientation (the kernel of its strongest response; within ``step_tol`` degrees of the
    step's direction, so never sideways), while the response of that orientation (or one
    within ``max_turn`` kernels: strands curve) stays above the lower ``threshold`` and
    the texel's smoothed residual points the same way in colour as the line's (cosine at
    least ``min_cos``: a pale strand does not continue into a dark brow), at most ``steps``
    steps, through flagged texels too (they pass it on, they are not its result). Only flagged lines in the zone seed it: ``reach``'s brow band is entered only as
    a continuation, so a brow, however line-like, is never flagged by itself.

    Args:
        z: (T, T, C) whitened residual against the skin model, the real one over ``reach``
            and ``flagged`` too (0 where unknown).
        flagged: (T, T) bool flags (the line cue's and every other cue's): the seeds are
            those of them in ``zone`` on a line.
        reach: (T, T) bool texels the continuation may flag (the line zone and the brow band
            above the eyes, visible, not flagged).
        zone: (T, T) bool the line zone's unflagged texels: the strength's median and robust
            spread over them set the scale of the thresholds, as in :func:`line_flags`.
        seed_zone: (T, T) bool where seeds may lie (the line zone, flagged texels
            included): never in the brow band.
        sigma, length, max_tilt: the filters (:func:`line_strength`).
        seed_threshold: robust z-score a flagged texel's strongest response must exceed to
            seed (the line cue's ``line_threshold``); threshold: the lower one the followed
            orientation's response must exceed; steps: the bound on the continuation.

    Returns:
        (T, T) bool within ``reach``, not including ``flagged``.
    """
    flagged = np.asarray(flagged, bool)
    reach = np.asarray(reach, bool) & ~flagged
    zone = np.asarray(zone, bool)
    out = np.zeros(flagged.shape, bool)
    near = flagged & np.asarray(seed_zone, bool)
    if steps <= 0 or not near.any() or not reach.any() or zone.sum() < 50:
        return out
    # the box of the seeds, the reach and the zone (for the scale), plus the kernels' reach
    box = near | reach | zone
    rr, cc = np.nonzero(box)
    m = kernel_radius(sigma, length) + 1
    r0, r1 = max(rr.min() - m, 0), min(rr.max() + m + 1, box.shape[0])
    c0, c1 = max(cc.min() - m, 0), min(cc.max() + m + 1, box.shape[1])
    ks, resp, zs = oriented_responses(z[r0:r1, c0:c1], sigma, length, max_tilt)
    if not len(ks):
        return out
    sl = (slice(r0, r1), slice(c0, c1))
    # flagged texels pass the continuation on (a tip hangs below the ring of flags that the
    # skin cue's hysteresis put at the brows' edge) but are not its result
    ok, zb = (reach | flagged)[sl], zone[sl]
    strength = resp.max(0)
    v = strength[zb]
    med = float(np.median(v))
    spread = max(1.4826 * float(np.median(np.abs(v - med))), MAD_FLOOR)
    low = med + threshold * spread
    seed = near[sl] & (strength > med + seed_threshold * spread)
    if not seed.any():
        return out
    unit = zs / np.maximum(np.sqrt((zs ** 2).sum(0)), 1e-6)
    # the step (dr, dc) may follow orientation i when it runs along kernel ks[i]'s line:
    # (row, col) direction (cos th, -sin th), th = pi k / LINE_ANGLES, either way
    th = np.pi * ks / LINE_ANGLES
    along = np.stack([np.cos(th), -np.sin(th)], 1)
    step_ok = np.array([[abs(along[i] @ np.array(d)) / np.hypot(*d)
                         >= np.cos(np.radians(step_tol)) - 1e-9 for d in _STEPS]
                        for i in range(len(ks))])
    # orientations within max_turn kernels of each other (circularly, over the full 180
    # degrees; the tilt gate may leave a gap around the horizontal)
    dk = np.abs(ks[:, None] - ks[None, :])
    turn_ok = np.minimum(dk, LINE_ANGLES - dk) <= max_turn
    # sparse: the front is a few hundred texels, the box tens of thousands
    H, W = seed.shape
    reached = seed.copy()
    fr, fc = np.nonzero(seed)
    # per front texel: the index (into ks) of the orientation it follows (a seed's
    # strongest), and the colour direction of the line it continues (the seed's, carried)
    fo = resp[:, fr, fc].argmax(0)
    fcol = unit[:, fr, fc].T
    offs = np.array(_STEPS)
    for _ in range(steps):
        tr, tc, to, tv, tcol = [], [], [], [], []
        for j, (dr, dc) in enumerate(offs):
            sel = step_ok[fo, j]
            r2, c2 = fr[sel] + dr, fc[sel] + dc
            inb = (r2 >= 0) & (r2 < H) & (c2 >= 0) & (c2 < W)
            idx = np.flatnonzero(sel)[inb]
            r2, c2 = r2[inb], c2[inb]
            keep = ok[r2, c2] & ~reached[r2, c2] & (
                (fcol[idx] * unit[:, r2, c2].T).sum(1) >= min_cos)
            idx, r2, c2 = idx[keep], r2[keep], c2[keep]
            if not len(idx):
                continue
            # the best response among the orientations within max_turn of the source's
            val = np.where(turn_ok[fo[idx]], resp[:, r2, c2].T, -np.inf)
            k = val.argmax(1)
            v = val[np.arange(len(k)), k]
            good = v > low
            tr.append(r2[good]); tc.append(c2[good]); to.append(k[good]); tv.append(v[good])
            tcol.append(fcol[idx[good]])
        if not tr or not sum(len(t) for t in tr):
            break
        tr, tc, to, tv, tcol = (np.concatenate(a) for a in (tr, tc, to, tv, tcol))
        # a texel reached from two sources follows the stronger response
        order = np.argsort(-tv, kind="stable")
        flat = tr[order] * W + tc[order]
        _, first = np.unique(flat, return_index=True)
        pick = order[first]
        fr, fc, fo, fcol = tr[pick], tc[pick], to[pick], tcol[pick]
        reached[fr, fc] = True
    out[sl] = reached & reach[sl]
    return out
