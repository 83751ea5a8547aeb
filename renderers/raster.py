"""The CPU rasterizer: screen vertices + triangles -> :class:`Fragments` (numba, cached).

One z-buffer pass per image, no gradient: the differentiable path
(:mod:`facecorpus.renderers.diff`) recomputes barycentrics from these fragments in torch.

Rules (tests pin them):

- A pixel is covered by a triangle when its centre (j + 0.5, i + 0.5) lies inside it. Vertex
  positions are snapped to 1/256 pixel and edge functions evaluated in exact integer
  arithmetic, with the **top-left fill rule**: a centre exactly on an edge belongs to the
  triangle for which that edge is a top or a left edge. Triangles sharing an edge therefore
  neither overlap nor leave cracks.
- Nearest wins: the smallest depth (screen vertex ``[..., 2]``) is kept.
- Both windings are drawn unless ``cull_backfaces``; front faces are counter-clockwise as
  seen from the camera (the MorphableModel convention), i.e. clockwise in the y-down image.
- ``perspective_correct=True`` (perspective cameras): depth is the view-space distance ``w``;
  barycentrics and depth are interpolated hyperbolically (linear in 1/w). Triangles with a
  vertex at depth <= 0 are dropped (no near-plane clipping). ``False`` (orthographic, UV
  layouts): everything is interpolated linearly in screen space.
- Triangles with a non-finite coordinate or extending beyond +-2^20 pixels are dropped.

Parallelism: ``prange`` over (image, horizontal band) pairs; each band owns its rows of the
output, so threads never write the same pixel. ``NUMBA_NUM_THREADS`` /
``numba.set_num_threads`` choose the thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

_SUB = 256.0  # sub-pixel grid: 8 bits
_LIMIT = float(1 << 20)


@dataclass(frozen=True, eq=False)
class Fragments:
    """Per-pixel result of one raster pass.

    Attributes:
        pix_to_face: (N, H, W) int32 face index, -1 for background.
        bary: (N, H, W, 3) float32 perspective-correct barycentrics (0 on background),
            computed from the unsnapped vertex positions: on pixels whose centre lies within
            1/512 px of an edge they can be slightly negative.
        zbuf: (N, H, W) float32 depth of the nearest surface, +inf on background.
    """

    pix_to_face: np.ndarray
    bary: np.ndarray
    zbuf: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(N, H, W) bool: pixels covered by some triangle."""
        return self.pix_to_face >= 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.pix_to_face.shape  # type: ignore[return-value]

    def __getitem__(self, idx) -> Fragments:
        """Select images: ``fragments[i:i+1]`` keeps the batch axis."""
        return Fragments(self.pix_to_face[idx], self.bary[idx], self.zbuf[idx])


@njit(cache=True, nogil=True, error_model="numpy")
def _snap(sv, persp, XY, ZW, ok):
    """Per vertex: fixed-point position (1/256 px), the depth term interpolated linearly on
    screen (1/depth for perspective, depth otherwise) and whether it can be drawn at all."""
    N, V, _ = sv.shape
    for n in range(N):  # O(V): serial (a parallel launch costs more than it saves)
        for v in range(V):
            x = sv[n, v, 0]
            y = sv[n, v, 1]
            z = sv[n, v, 2]
            good = (abs(x) <= _LIMIT and abs(y) <= _LIMIT and np.isfinite(z)
                    and (z > 0.0 or not persp))  # comparisons are False for NaN
            ok[n, v] = good
            if good:
                XY[n, v, 0] = np.int32(np.floor(x * _SUB + 0.5))
                XY[n, v, 1] = np.int32(np.floor(y * _SUB + 0.5))
                ZW[n, v] = 1.0 / np.float64(z) if persp else np.float64(z)
            else:
                XY[n, v, 0] = 0
                XY[n, v, 1] = 0
                ZW[n, v] = 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _raster_band(XY, ZW, ok, tris, n, r0, r1, W, cull, persp, p2f, key):
    """Visibility only: face id and a depth key per pixel (smaller is nearer: depth, or
    -1/depth for perspective, so no division per pixel). Barycentrics are resolved later,
    once per pixel, in :func:`_resolve`."""
    for i in range(r0, r1):
        for j in range(W):
            p2f[n, i, j] = -1
            key[n, i, j] = np.inf
    # unsigned indices below: numba then skips the negative-index wrap-around test on every
    # gather and pixel access (~7% of this pass); all of them are known to be in range
    xy = XY[n]
    okn = ok[n]
    kn = key[n]
    pn = p2f[n]
    # invalid vertices are rare: skip the three validity loads per triangle when there are none
    n_ok = 0
    for v in range(okn.size):  # no early exit: this loop vectorizes
        n_ok += okn[v]
    all_ok = n_ok == okn.size
    F = tris.shape[0]
    for f in range(F):
        a = np.uint32(tris[f, 0])
        b = np.uint32(tris[f, 1])
        c = np.uint32(tris[f, 2])
        if not all_ok and not (okn[a] and okn[b] and okn[c]):
            continue
        Y0 = np.int64(xy[a, 1])
        Y1 = np.int64(xy[b, 1])
        Y2 = np.int64(xy[c, 1])
        # Pixel-centre rows inside the triangle's box: centre of row k is k * 256 + 128.
        # Reject on rows (bands) first, then columns: most triangles are tiny or elsewhere.
        i0 = max(-((128 - min(Y0, min(Y1, Y2))) >> 8), r0)  # ceil((ymin - 128) / 256)
        i1 = min((max(Y0, max(Y1, Y2)) - 128) >> 8, r1 - 1)
        if i0 > i1:
            continue
        X0 = np.int64(xy[a, 0])
        X1 = np.int64(xy[b, 0])
        X2 = np.int64(xy[c, 0])
        j0 = max(-((128 - min(X0, min(X1, X2))) >> 8), 0)
        j1 = min((max(X0, max(X1, X2)) - 128) >> 8, W - 1)
        if j0 > j1:
            continue
        area = (X1 - X0) * (Y2 - Y0) - (X2 - X0) * (Y1 - Y0)
        if area == 0:
            continue
        w0 = ZW[n, a]
        w1 = ZW[n, b]
        w2 = ZW[n, c]
        # area > 0 means clockwise as seen by the camera (y-down image): a back face
        if area > 0:
            if cull:
                continue
            # swap corners 1 and 2 so that the edge functions below are positive inside
            X1, X2 = X2, X1
            Y1, Y2 = Y2, Y1
            w1, w2 = w2, w1
        else:
            area = -area
        # Corners 0 -> 1 -> 2 now run counter-clockwise on screen (y down); with
        # E_ab(p) = (p.x - a.x)(b.y - a.y) - (p.y - a.y)(b.x - a.x), inside is E >= 0.
        # Top-left rule for this orientation: edge a->b is "left" if b.y > a.y (going
        # down) and "top" if horizontal going left (b.x < a.x); ties count only there.
        dy12 = Y2 - Y1
        dx12 = X2 - X1
        dy20 = Y0 - Y2
        dx20 = X0 - X2
        dy01 = Y1 - Y0
        dx01 = X1 - X0
        bias0 = 0 if (dy12 > 0 or (dy12 == 0 and dx12 < 0)) else -1
        bias1 = 0 if (dy20 > 0 or (dy20 == 0 and dx20 < 0)) else -1
        bias2 = 0 if (dy01 > 0 or (dy01 == 0 and dx01 < 0)) else -1
        # the depth-key plane is set up lazily: about half of the tiny triangles that reach
        # this point cover no pixel centre, and the division is the costly part
        have = False
        k0 = 0.0
        k1 = 0.0
        k2 = 0.0
        px0 = np.int64(j0) * 256 + 128
        py = np.int64(i0) * 256 + 128
        if i0 == i1 and j0 == j1:  # one candidate pixel: the common case for dense meshes
            e0 = (px0 - X1) * dy12 - (py - Y1) * dx12 + bias0
            e1 = (px0 - X2) * dy20 - (py - Y2) * dx20 + bias1
            e2 = (px0 - X0) * dy01 - (py - Y0) * dx01 + bias2
            # branch-free select: whether a tiny triangle covers its one candidate pixel is
            # unpredictable, so compute the depth key anyway and store conditionally
            z = (((e0 - bias0) * w0 + (e1 - bias1) * w1 + (e2 - bias2) * w2)
                 * ((-1.0 if persp else 1.0) / np.float64(area)))
            ui = np.uint32(i0)
            uj = np.uint32(j0)
            old = kn[ui, uj]
            take = ((e0 | e1 | e2) >= 0) & (z < old)
            kn[ui, uj] = z if take else old
            pn[ui, uj] = f if take else pn[ui, uj]
            continue
        for i in range(i0, i1 + 1):
            e0 = (px0 - X1) * dy12 - (py - Y1) * dx12
            e1 = (px0 - X2) * dy20 - (py - Y2) * dx20
            e2 = (px0 - X0) * dy01 - (py - Y0) * dx01
            for j in range(j0, j1 + 1):
                if e0 + bias0 >= 0 and e1 + bias1 >= 0 and e2 + bias2 >= 0:
                    if not have:
                        inv = (-1.0 if persp else 1.0) / np.float64(area)  # nearer = larger 1/w
                        k0 = w0 * inv
                        k1 = w1 * inv
                        k2 = w2 * inv
                        have = True
                    z = e0 * k0 + e1 * k1 + e2 * k2
                    ui = np.uint32(i)
                    uj = np.uint32(j)
                    if z < kn[ui, uj]:
                        kn[ui, uj] = z
                        pn[ui, uj] = f
                e0 += 256 * dy12
                e1 += 256 * dy20
                e2 += 256 * dy01
            py += 256


@njit(cache=True, nogil=True, error_model="numpy")
def _resolve_row(sv, tris, persp, n, i, p2f, bary, zbuf, attr, out):
    """Barycentrics and depth of the winning face at each pixel centre of one row, from the
    unsnapped float positions (so they match the torch path and the reference to float
    precision; the 1/256 snapping only decides coverage). With ``attr`` (Na, V, C), C > 0, it
    also interpolates those per-vertex attributes into ``out`` while the weights are in
    registers, exactly as :func:`~.interpolate.interpolate` does (float32 weights and
    arithmetic), so the bary array need not be read back."""
    W = p2f.shape[2]
    C = attr.shape[2]
    na = n if attr.shape[0] > 1 else 0
    cy = i + 0.5
    svn = sv[n]
    pn = p2f[n, i]
    bn = bary[n, i]
    zn = zbuf[n, i]
    for j in range(W):
        uj = np.uint32(j)
        f = pn[uj]
        if f < 0:
            bn[uj, 0] = 0.0
            bn[uj, 1] = 0.0
            bn[uj, 2] = 0.0
            zn[uj] = np.inf
            for c in range(C):
                out[n, i, uj, c] = 0.0
            continue
        # unsigned: no negative-index wrap-around tests (f >= 0 here, tris in range)
        uf = np.uint32(f)
        a = np.uint32(tris[uf, 0])
        b = np.uint32(tris[uf, 1])
        c = np.uint32(tris[uf, 2])
        x0 = np.float64(svn[a, 0])
        y0 = np.float64(svn[a, 1])
        x1 = np.float64(svn[b, 0])
        y1 = np.float64(svn[b, 1])
        x2 = np.float64(svn[c, 0])
        y2 = np.float64(svn[c, 1])
        cx = j + 0.5
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) > 1e-12:
            inv = 1.0 / area
            l0 = ((x1 - cx) * (y2 - cy) - (x2 - cx) * (y1 - cy)) * inv
            l1 = ((x2 - cx) * (y0 - cy) - (x0 - cx) * (y2 - cy)) * inv
            l2 = 1.0 - l0 - l1
        else:  # collinear in float, not after snapping: no meaningful weights, use the centroid
            l0 = 1.0 / 3.0
            l1 = 1.0 / 3.0
            l2 = 1.0 / 3.0
        z0 = np.float64(svn[a, 2])
        z1 = np.float64(svn[b, 2])
        z2 = np.float64(svn[c, 2])
        if persp:
            q0 = l0 / z0
            q1 = l1 / z1
            q2 = l2 / z2
            z = 1.0 / (q0 + q1 + q2)
            l0 = q0 * z
            l1 = q1 * z
            l2 = q2 * z
        else:
            z = l0 * z0 + l1 * z1 + l2 * z2
        b0 = np.float32(l0)
        b1 = np.float32(l1)
        b2 = np.float32(l2)
        bn[uj, 0] = b0
        bn[uj, 1] = b1
        bn[uj, 2] = b2
        zn[uj] = z
        if C == 3:  # PNCC, colours: unrolled
            out[n, i, uj, 0] = b0 * attr[na, a, 0] + b1 * attr[na, b, 0] + b2 * attr[na, c, 0]
            out[n, i, uj, 1] = b0 * attr[na, a, 1] + b1 * attr[na, b, 1] + b2 * attr[na, c, 1]
            out[n, i, uj, 2] = b0 * attr[na, a, 2] + b1 * attr[na, b, 2] + b2 * attr[na, c, 2]
            continue
        for k in range(C):
            out[n, i, uj, k] = (b0 * attr[na, a, k] + b1 * attr[na, b, k]
                                + b2 * attr[na, c, k])


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _raster_batch(sv, XY, ZW, ok, tris, H, W, n_bands, cull, persp, p2f, bary, zbuf, attr,
                  out):
    N = sv.shape[0]
    rows = (H + n_bands - 1) // n_bands
    for k in prange(N * n_bands):
        n = k // n_bands
        b = k % n_bands
        r0 = b * rows
        r1 = min(H, r0 + rows)
        if r0 < r1:
            _raster_band(XY, ZW, ok, tris, n, r0, r1, W, cull, persp, p2f, zbuf)
            for i in range(r0, r1):
                _resolve_row(sv, tris, persp, n, i, p2f, bary, zbuf, attr, out)


@njit(cache=True, nogil=True, error_model="numpy")
def index_range(idx):  # pragma: no cover - compiled
    """(min, max) of an int32 index array in one pass (numpy needs two)."""
    flat = idx.ravel()
    lo = np.int64(flat[0]) if flat.size else 0
    hi = lo
    for k in range(flat.size):
        x = np.int64(flat[k])
        lo = min(lo, x)
        hi = max(hi, x)
    return lo, hi


def _check_inputs(screen_vertices, triangles, height, width):
    sv = np.asarray(screen_vertices)
    if sv.ndim == 2:
        raise ValueError("screen_vertices must be (N, V, 3); add a batch axis with [None]")
    if sv.ndim != 3 or sv.shape[-1] != 3:
        raise ValueError(f"screen_vertices must be (N, V, 3), got {sv.shape}")
    tris = np.asarray(triangles)
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"triangles must be (F, 3) integers, got {tris.shape} {tris.dtype}")
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    V = sv.shape[1]
    if tris.dtype != np.int32 and tris.size and (tris.min() < 0 or tris.max() >= V):
        raise ValueError(f"triangle indices out of range [0, {V})")
    tris = np.ascontiguousarray(tris, dtype=np.int32)
    # read-only inputs (cached, shared arrays) would compile a second jitted signature
    tris = tris if tris.flags.writeable else tris.copy()
    if tris.size:
        lo, hi = index_range(tris)  # one pass instead of numpy's min() and max()
        if lo < 0 or hi >= V:
            raise ValueError(f"triangle indices out of range [0, {V})")
    sv = np.ascontiguousarray(sv, dtype=np.float32)
    return sv if sv.flags.writeable else sv.copy(), tris


def rasterize(screen_vertices, triangles, height: int, width: int, *,
              cull_backfaces: bool = False, perspective_correct: bool = True,
              n_bands: int | None = None) -> Fragments:
    """Rasterize triangles into a z-buffer.

    Args:
        screen_vertices: (N, V, 3) ``[x_px, y_px, depth]`` (see
            :mod:`facecorpus.renderers.cameras`); converted to float32.
        triangles: (F, 3) vertex indices, shared by all images.
        height, width: image size in pixels.
        cull_backfaces: drop triangles that are clockwise as seen from the camera.
        perspective_correct: depth is view-space distance; interpolate in 1/depth (perspective
            cameras). ``False`` for orthographic cameras and UV layouts.
        n_bands: horizontal bands per image (the unit of parallel work); default: enough
            bands to give every thread work.

    Returns:
        :class:`Fragments` with (N, H, W) arrays.
    """
    return _rasterize(screen_vertices, triangles, height, width, None, cull_backfaces,
                      perspective_correct, n_bands)[0]


def rasterize_interpolate(screen_vertices, triangles, height: int, width: int, attributes, *,
                          cull_backfaces: bool = False, perspective_correct: bool = True,
                          n_bands: int | None = None) -> tuple[Fragments, np.ndarray]:
    """:func:`rasterize` and :func:`~.interpolate.interpolate` of per-vertex attributes in one
    pass (the fast path for PNCC): the attributes are interpolated while each pixel's
    barycentrics are computed, not read back from the bary array afterwards. Results are
    identical to ``interpolate(attributes, rasterize(...), triangles)``.

    Args:
        screen_vertices, triangles, height, width, cull_backfaces, perspective_correct,
            n_bands: as for :func:`rasterize`.
        attributes: per-vertex (V, C) or (N, V, C); converted to float32.

    Returns:
        (:class:`Fragments` (N, H, W), attributes per pixel (N, H, W, C) float32, 0 on
        background).
    """
    return _rasterize(screen_vertices, triangles, height, width, attributes, cull_backfaces,
                      perspective_correct, n_bands)


_NO_ATTR = np.zeros((1, 1, 0), np.float32)


def _rasterize(screen_vertices, triangles, height, width, attributes, cull_backfaces,
               perspective_correct, n_bands):
    sv, tris = _check_inputs(screen_vertices, triangles, height, width)
    N, V = sv.shape[0], sv.shape[1]
    H, W = int(height), int(width)
    if attributes is None:
        attr = _NO_ATTR
    else:
        attr = np.asarray(attributes)
        attr = attr[None] if attr.ndim == 2 else attr
        if attr.ndim != 3 or attr.shape[0] not in (1, N) or attr.shape[1] != V:
            raise ValueError(f"per-vertex attributes must be (V={V}, C) or (N={N}, V, C), got "
                             f"{np.shape(attributes)}")
        attr = np.ascontiguousarray(attr, dtype=np.float32)
        attr = attr if attr.flags.writeable else attr.copy()
    if n_bands is None:
        threads = numba.get_num_threads()
        # every band re-scans all triangles (cheap rejects), so use no more than needed
        n_bands = max(1, -(-threads // max(N, 1)))
    n_bands = int(max(1, min(n_bands, H)))
    p2f = np.empty((N, H, W), np.int32)
    bary = np.empty((N, H, W, 3), np.float32)
    zbuf = np.empty((N, H, W), np.float32)
    out = np.empty((N, H, W, attr.shape[2]), np.float32)
    XY = np.empty((N, V, 2), np.int32)
    ZW = np.empty((N, V), np.float64)
    ok = np.empty((N, V), np.bool_)
    _snap(sv, bool(perspective_correct), XY, ZW, ok)
    _raster_batch(sv, XY, ZW, ok, tris, H, W, n_bands, bool(cull_backfaces),
                  bool(perspective_correct), p2f, bary, zbuf, attr, out)
    return Fragments(p2f, bary, zbuf), out


def rasterize_reference(screen_vertices, triangles, height: int, width: int, *,
                        cull_backfaces: bool = False,
                        perspective_correct: bool = True) -> Fragments:
    """Plain numpy reference rasterizer: for every triangle, test every pixel centre in its
    bounding box (float arithmetic, inclusive edges), keep the nearest. Slow; used by tests
    and benchmarks to check :func:`rasterize`.
    """
    sv, tris = _check_inputs(screen_vertices, triangles, height, width)
    N, H, W = sv.shape[0], int(height), int(width)
    p2f = np.full((N, H, W), -1, np.int32)
    bary = np.zeros((N, H, W, 3), np.float32)
    zbuf = np.full((N, H, W), np.inf, np.float32)
    for n in range(N):
        P = sv[n].astype(np.float64)
        for f, (a, b, c) in enumerate(tris):
            p0, p1, p2 = P[a], P[b], P[c]
            if not np.all(np.isfinite([p0, p1, p2])):
                continue
            if perspective_correct and min(p0[2], p1[2], p2[2]) <= 0:
                continue
            xs, ys = np.array([p0[0], p1[0], p2[0]]), np.array([p0[1], p1[1], p2[1]])
            j0, j1 = max(0, int(np.ceil(xs.min() - 0.5))), min(W - 1, int(np.floor(xs.max() - 0.5)))
            i0, i1 = max(0, int(np.ceil(ys.min() - 0.5))), min(H - 1, int(np.floor(ys.max() - 0.5)))
            if j0 > j1 or i0 > i1:
                continue
            area = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p2[0] - p0[0]) * (p1[1] - p0[1])
            if area == 0 or (cull_backfaces and area > 0):
                continue
            jj, ii = np.meshgrid(np.arange(j0, j1 + 1) + 0.5, np.arange(i0, i1 + 1) + 0.5)
            l0 = ((p1[0] - jj) * (p2[1] - ii) - (p2[0] - jj) * (p1[1] - ii)) / area
            l1 = ((p2[0] - jj) * (p0[1] - ii) - (p0[0] - jj) * (p2[1] - ii)) / area
            l2 = 1.0 - l0 - l1
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
            if perspective_correct:
                q = np.stack([l0 / p0[2], l1 / p1[2], l2 / p2[2]], -1)
                z = 1.0 / q.sum(-1)
                lam = q * z[..., None]
            else:
                lam = np.stack([l0, l1, l2], -1)
                z = l0 * p0[2] + l1 * p1[2] + l2 * p2[2]
            sub = zbuf[n, i0:i1 + 1, j0:j1 + 1]
            win = inside & (z < sub)
            sub[win] = z[win]
            p2f[n, i0:i1 + 1, j0:j1 + 1][win] = f
            bary[n, i0:i1 + 1, j0:j1 + 1][win] = lam[win]
    return Fragments(p2f, bary, zbuf)
