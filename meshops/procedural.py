"""A procedural morphable model made by code: a **geometric test fixture, not a face model**.

It exists so that every stage can run fast unit tests without licensed data: a dome-shaped
grid surface (an ellipsoidal cap with a nose bump) with every field a real model has: UVs with
a seam, smooth identity and expression modes with standard deviations, 68 landmarks placed at
plausible face positions, jawline contour sets, an exact x-mirror symmetry map, regions and an
albedo. Nothing about it is statistically meaningful.

Layout (all exact, tests rely on it):

- Grid of ``n x n`` vertices (``n`` odd), vertex ``i * n + j`` at row ``i`` (``y`` grows with
  ``i``) and column ``j`` (``x`` grows with ``j``); the centre column ``j = n // 2`` lies at
  ``x = 0``. The mirror of vertex ``(i, j)`` is ``(i, n - 1 - j)`` and its coordinates are the
  exact x-negation (the mean and every basis satisfy it bit for bit where stated).
- Quads are split along mirrored diagonals, so the mirror image of a triangle is a triangle.
- UVs: two islands with a seam along the centre column: the subject's right half
  (``x <= 0``) maps to ``u`` in [0.05, 0.45] (``u`` growing with ``x``), the left half is
  its mirror image laid out as a copy shifted by +0.5 in ``u`` (``u`` in [0.55, 0.95],
  *decreasing* with ``x``); ``v`` in [0.05, 0.95] grows with ``y``. So the UV mirror map is
  a translation by half the image, not an image flip. Centre-column vertices carry two UVs
  (u = 0.45 and u = 0.95).
"""

from __future__ import annotations

import numpy as np
from facecorpus.meshops.model import MorphableModel, Provenance

# Mirror permutation of the Multi-PIE 68-point scheme: landmark k mirrors to MULTIPIE_MIRROR[k].
MULTIPIE_MIRROR = np.array(
    [16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,  # jaw
     26, 25, 24, 23, 22, 21, 20, 19, 18, 17,  # brows
     27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
     64, 63, 62, 61, 60, 67, 66, 65],  # inner lips
    dtype=np.int32)

# Half-widths of the cap in grid parameter space; face coordinates (X, Y) in [-1, 1]
# (X towards the subject's left, Y up) map to the parameter (X * _FACE, Y * _FACE).
_CAP = 1.0
_FACE = 0.78


def _landmarks_xy() -> np.ndarray:
    """68 Multi-PIE points in face coordinates (X right-of-viewer = subject's left, Y up)."""
    pts = np.zeros((68, 2))
    t = np.arange(17) / 16.0
    a = np.pi * t
    pts[:17, 0] = -0.92 * np.cos(a)  # 0 = subject's right, temple level
    pts[:17, 1] = 0.15 - 0.95 * np.sin(a)
    # right brow, outer -> inner
    pts[17:22] = np.c_[np.linspace(-0.72, -0.16, 5), [0.42, 0.50, 0.53, 0.52, 0.48]]
    pts[27:31] = np.c_[np.zeros(4), np.linspace(0.30, -0.10, 4)]  # nose bridge, top -> tip
    pts[31:33] = [[-0.20, -0.20], [-0.10, -0.23]]
    pts[33] = [0.0, -0.25]
    # right eye: outer corner, two upper, inner corner, two lower
    pts[36:42] = [[-0.54, 0.27], [-0.45, 0.33], [-0.33, 0.33], [-0.22, 0.27],
                  [-0.33, 0.21], [-0.45, 0.21]]
    # outer lips: right corner, upper lip to the left corner, lower lip back
    pts[48:51] = [[-0.34, -0.50], [-0.22, -0.42], [-0.10, -0.38]]
    pts[51] = [0.0, -0.40]
    pts[55:57] = [[0.22, -0.62], [0.10, -0.66]]
    pts[57] = [0.0, -0.67]
    pts[60] = [-0.26, -0.50]
    pts[61] = [-0.12, -0.46]
    pts[62] = [0.0, -0.47]
    pts[65] = [0.12, -0.56]
    pts[66] = [0.0, -0.57]
    # the remaining points are mirrors of the ones above
    for k in range(68):
        m = MULTIPIE_MIRROR[k]
        if m != k and not pts[k].any() and pts[m].any():
            pts[k] = [-pts[m, 0], pts[m, 1]]
    return pts


def _smooth_field(s: np.ndarray, t: np.ndarray, rng: np.random.Generator, order: int = 3):
    """A random smooth scalar field on the parameter square: low-order cosine series."""
    out = np.zeros_like(s)
    for p in range(order + 1):
        for q in range(order + 1):
            if p + q == 0 or p + q > order:
                continue
            c = rng.normal() / (1.0 + p + q)
            out += c * np.cos(p * np.pi * (s + 1) / 2) * np.cos(q * np.pi * (t + 1) / 2)
    return out


def procedural_model(n: int = 61, n_id: int = 10, n_exp: int = 5, seed: int = 0,
                     n_albedo: int = 3) -> MorphableModel:
    """Build the procedural fixture model (see the module docstring for its exact layout).

    Args:
        n: grid vertices per side (made odd); ``n * n`` vertices, ``2 (n-1)^2`` triangles.
        n_id: identity modes K (smooth random fields, mm per unit coefficient).
        n_exp: expression modes E (localised: jaw open, smiles, brow raises, then random).
        seed: seeds the random identity modes.
        n_albedo: albedo modes A (0 for none).

    Returns:
        A validated :class:`MorphableModel` in millimetres, about 150 mm wide.
    """
    n = int(n) | 1
    if n < 21:
        raise ValueError(f"procedural_model: n must be >= 21 to place 68 landmarks, got {n}")
    c = n // 2
    rng = np.random.default_rng(seed)
    # Integer-symmetric parameters: s[n-1-j] == -s[j] exactly.
    k = (2 * np.arange(n) - (n - 1)).astype(np.float64) / (n - 1)
    s, t = np.meshgrid(k * _CAP, k * _CAP)  # (n, n): s along columns (x), t along rows (y)
    mirror_grid = np.arange(n * n).reshape(n, n)[:, ::-1]
    symmetry = mirror_grid.reshape(-1).astype(np.int32)

    def sym(f: np.ndarray, odd_x: bool) -> np.ndarray:
        """Make a per-vertex field (n, n) exactly even (or odd) under the x-mirror."""
        g = f[:, ::-1]
        return 0.5 * (f - g) if odd_x else 0.5 * (f + g)

    # Ellipsoidal cap: azimuth/elevation angles, semi-axes in mm.
    ax, ay, az = 78.0, 105.0, 85.0
    th, ph = s * 1.25, t * 1.05
    X = ax * np.sin(th) * np.cos(ph * 0.6)
    Y = ay * np.sin(ph)
    Z = az * np.cos(th) * np.cos(ph)
    # Nose: an elongated bump on the centre line, eyes slightly sunk, chin pushed out.
    fs, ft = s / _FACE, t / _FACE
    # The nose grows towards its tip (ft = -0.1) and fades into the bridge above.
    Z = Z + 22.0 * np.exp(-(fs / (0.10 + 0.08 * np.clip(0.3 - ft, 0, 1))) ** 2
                          - ((ft + 0.10) / 0.26) ** 2)
    for ex in (-0.38, 0.38):
        Z = Z - 6.0 * np.exp(-((fs - ex) / 0.14) ** 2 - ((ft - 0.27) / 0.08) ** 2)
    Z = Z + 6.0 * np.exp(-(fs / 0.3) ** 2 - ((ft + 0.85) / 0.15) ** 2)
    X, Y, Z = sym(X, True), sym(Y, False), sym(Z, False)
    Z = Z - Z.mean()
    Y = Y - Y.mean()
    mean = np.stack([X, Y, Z], -1).reshape(-1, 3)

    # Approximate outward normals of the grid for normal displacements.
    dx = np.gradient(np.stack([X, Y, Z], -1), axis=1)
    dy = np.gradient(np.stack([X, Y, Z], -1), axis=0)
    nrm = np.cross(dx, dy)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)

    def disp(field_n: np.ndarray, field_x=None, field_y=None) -> np.ndarray:
        """(n, n) normal-displacement (+ optional in-plane) field -> (V, 3), x-mirror-consistent."""
        d = field_n[..., None] * nrm
        if field_x is not None:
            d[..., 0] += field_x
        if field_y is not None:
            d[..., 1] += field_y
        return d.reshape(-1, 3)

    # Identity: smooth random fields, scaled to 1 mm max per unit coefficient.
    id_basis = np.zeros((n_id, n * n, 3))
    for m in range(n_id):
        d = disp(_smooth_field(s, t, rng), 0.3 * _smooth_field(s, t, rng),
                 0.3 * _smooth_field(s, t, rng))
        id_basis[m] = d / np.abs(d).max()
    id_std = (6.0 * 0.8 ** np.arange(n_id)).astype(np.float32)

    # Expressions: localised bumps in face coordinates; weights in [0, 1], std 1.
    def blob(cx, cy, rx, ry):
        return np.exp(-((fs - cx) / rx) ** 2 - ((ft - cy) / ry) ** 2)

    lower = 1.0 / (1.0 + np.exp((ft + 0.48) / 0.05))  # 1 below the mouth line
    templates = [
        ("jawOpen", disp(-4.0 * lower, None, -12.0 * lower * np.exp(-(fs / 0.9) ** 2))),
        ("mouthSmile_L", disp(2.0 * blob(0.34, -0.5, 0.15, 0.12),
                              4.0 * blob(0.34, -0.5, 0.15, 0.12),
                              4.0 * blob(0.34, -0.5, 0.15, 0.12))),
        ("mouthSmile_R", disp(2.0 * blob(-0.34, -0.5, 0.15, 0.12),
                              -4.0 * blob(-0.34, -0.5, 0.15, 0.12),
                              4.0 * blob(-0.34, -0.5, 0.15, 0.12))),
        ("browInnerUp_L", disp(0 * s, None, 5.0 * blob(0.2, 0.5, 0.2, 0.15))),
        ("browInnerUp_R", disp(0 * s, None, 5.0 * blob(-0.2, 0.5, 0.2, 0.15))),
        ("mouthPucker", disp(5.0 * blob(0.0, -0.52, 0.25, 0.15),
                             -3.0 * np.tanh(fs / 0.2) * blob(0.0, -0.52, 0.35, 0.15))),
    ]
    exp_names, exp_list = [], []
    for e in range(n_exp):
        if e < len(templates):
            name, d = templates[e]
        else:
            name = f"random{e:02d}"
            d = disp(3.0 * _smooth_field(s, t, rng) * blob(0.0, 0.0, 0.8, 0.8))
        exp_names.append(name)
        exp_list.append(d)
    exp_basis = np.stack(exp_list) if exp_list else np.zeros((0, n * n, 3))
    exp_std = np.ones(n_exp, np.float32)

    # Triangles: mirrored diagonals on the two halves; CCW seen from +z (outside).
    ii, jj = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    v00 = ii * n + jj
    v01, v10, v11 = v00 + 1, v00 + n, v00 + n + 1
    right = jj < c  # quads of the subject's right half (x < 0)
    tri_a = np.where(right[:, None], np.c_[v00, v01, v11], np.c_[v00, v01, v10])
    tri_b = np.where(right[:, None], np.c_[v00, v11, v10], np.c_[v01, v11, v10])
    triangles = np.concatenate([tri_a, tri_b]).astype(np.int32)

    # UVs: vertex-indexed uv for the left island (and the right half), plus a second copy
    # of the centre column for the right island: the seam.
    jgrid = np.broadcast_to(np.arange(n), (n, n))
    igrid = np.broadcast_to(np.arange(n)[:, None], (n, n))
    u = np.where(jgrid < c, 0.05 + 0.40 * jgrid / c, 0.55 + 0.40 * (2 * c - jgrid) / c)
    v = 0.05 + 0.90 * igrid / (n - 1)
    uv_main = np.stack([u, v], -1).reshape(-1, 2)
    seam_rows = np.arange(n)
    uv_seam = np.stack([np.full(n, 0.45), 0.05 + 0.90 * seam_rows / (n - 1)], -1)
    uv = np.concatenate([uv_main, uv_seam]).astype(np.float32)
    seam_lookup = np.full(n * n, -1, np.int64)
    seam_lookup[seam_rows * n + c] = n * n + seam_rows
    uv_triangles = triangles.astype(np.int64).copy()
    tri_right = np.concatenate([right, right])
    on_seam = (triangles % n == c) & tri_right[:, None]
    uv_triangles[on_seam] = seam_lookup[triangles[on_seam]]
    uv_triangles = uv_triangles.astype(np.int32)

    # Landmarks: nearest grid vertex to each face-coordinate point; mirrored points use the
    # exact mirror vertex so the landmark set is symmetric.
    pts = _landmarks_xy() * _FACE
    step = 2.0 * _CAP / (n - 1)
    col = np.clip(np.rint((pts[:, 0] + _CAP) / step), 0, n - 1).astype(np.int64)
    row = np.clip(np.rint((pts[:, 1] + _CAP) / step), 0, n - 1).astype(np.int64)
    landmarks = (row * n + col).astype(np.int32)
    for kk in range(68):
        m = MULTIPIE_MIRROR[kk]
        if pts[kk, 0] > 0 and m != kk:
            landmarks[kk] = symmetry[landmarks[m]]

    # Contour candidates: the jaw curve sampled finely, top to bottom, unique vertices.
    ta = np.linspace(0.0, 0.5, 4 * 17) * np.pi
    cx_r = -0.92 * np.cos(ta) * _FACE
    cy_r = (0.15 - 0.95 * np.sin(ta)) * _FACE
    crow = np.clip(np.rint((cy_r + _CAP) / step), 0, n - 1).astype(np.int64)
    ccol = np.clip(np.rint((cx_r + _CAP) / step), 0, n - 1).astype(np.int64)
    cand = crow * n + ccol
    _, first = np.unique(cand, return_index=True)
    contour_right = cand[np.sort(first)].astype(np.int32)
    contour_right = contour_right[(contour_right % n) < c]  # strictly the right half
    contour_left = symmetry[contour_right]

    # Regions: the whole grid, and a narrow oval inside the jawline and below the hairline.
    narrow = np.flatnonzero(((fs / 0.85) ** 2 + ((ft + 0.1) / 0.85) ** 2).reshape(-1) <= 1.0)
    regions = {"face": np.arange(n * n, dtype=np.int32), "narrow": narrow.astype(np.int32)}

    # Albedo: skin tone, darker lips and eye sockets (x-symmetric); a few smooth modes.
    base = np.array([0.78, 0.58, 0.48])
    lips = blob(0.0, -0.52, 0.32, 0.1)
    eyes = blob(-0.38, 0.27, 0.15, 0.07) + blob(0.38, 0.27, 0.15, 0.07)
    alb = (base * (1 - 0.35 * eyes[..., None])
           + lips[..., None] * (np.array([0.72, 0.35, 0.35]) - base))
    albedo_mean = np.clip(alb.reshape(-1, 3), 0.0, 1.0).astype(np.float32)
    albedo_basis = albedo_std = None
    if n_albedo > 0:
        ab = []
        for _ in range(n_albedo):
            f = sym(_smooth_field(s, t, rng), False)
            tint = rng.normal(size=3)
            ab.append((f[..., None] * tint / np.abs(tint).max()).reshape(-1, 3))
        albedo_basis = np.stack(ab).astype(np.float32)
        albedo_basis /= np.abs(albedo_basis).max(axis=(1, 2), keepdims=True)
        albedo_std = np.full(n_albedo, 0.05, np.float32)

    model = MorphableModel(
        name=f"procedural-n{n}-k{n_id}-e{n_exp}-s{seed}",
        vertices=mean.astype(np.float32),
        triangles=triangles,
        uv=uv,
        uv_triangles=uv_triangles,
        id_basis=id_basis.astype(np.float32),
        id_std=id_std,
        exp_basis=exp_basis.astype(np.float32),
        exp_std=exp_std,
        exp_names=tuple(exp_names),
        landmarks=landmarks,
        contour_right=contour_right,
        contour_left=contour_left.astype(np.int32),
        symmetry=symmetry,
        regions=regions,
        albedo_mean=albedo_mean,
        albedo_basis=albedo_basis,
        albedo_std=albedo_std,
        units="mm",
        provenance=Provenance(
            source="facecorpus.meshops.procedural.procedural_model"
                   f"(n={n}, n_id={n_id}, n_exp={n_exp}, seed={seed}, n_albedo={n_albedo})",
            license="MIT (facecorpus)",
            notes="Geometric test fixture made by code; not a face model.",
        ),
    )
    return model.validate()
