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
        bary: (N, H, W, 3) float32 perspective-correct barycentrics (0 on background).
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


@njit(cache=True, nogil=True, fastmath=False)
def _raster_band(sv, tris, n, r0, r1, W, cull, persp, p2f, bary, zbuf):
    for i in range(r0, r1):
        for j in range(W):
            p2f[n, i, j] = -1
            zbuf[n, i, j] = np.inf
            bary[n, i, j, 0] = 0.0
            bary[n, i, j, 1] = 0.0
            bary[n, i, j, 2] = 0.0
    # band bounds in fixed point (pixel centres at k * 256 + 128)
    F = tris.shape[0]
    for f in range(F):
        a = tris[f, 0]
        b = tris[f, 1]
        c = tris[f, 2]
        fx0 = sv[n, a, 0]
        fy0 = sv[n, a, 1]
        fx1 = sv[n, b, 0]
        fy1 = sv[n, b, 1]
        fx2 = sv[n, c, 0]
        fy2 = sv[n, c, 1]
        ymin = min(fy0, min(fy1, fy2))
        ymax = max(fy0, max(fy1, fy2))
        # cheap reject before anything else: most triangles miss this band (or are tiny)
        if not (ymax > r0 and ymin < r1):  # also rejects NaN
            continue
        xmin = min(fx0, min(fx1, fx2))
        xmax = max(fx0, max(fx1, fx2))
        if not (xmax > 0.0 and xmin < W):
            continue
        if ymin < -_LIMIT or ymax > _LIMIT or xmin < -_LIMIT or xmax > _LIMIT:
            continue
        X0 = np.int64(np.rint(fx0 * _SUB))
        Y0 = np.int64(np.rint(fy0 * _SUB))
        X1 = np.int64(np.rint(fx1 * _SUB))
        Y1 = np.int64(np.rint(fy1 * _SUB))
        X2 = np.int64(np.rint(fx2 * _SUB))
        Y2 = np.int64(np.rint(fy2 * _SUB))
        # pixel-centre index range: centre k*256+128 within [min, max]
        XMIN = min(X0, min(X1, X2))
        XMAX = max(X0, max(X1, X2))
        YMIN = min(Y0, min(Y1, Y2))
        YMAX = max(Y0, max(Y1, Y2))
        j0 = -((128 - XMIN) // 256)  # ceil((XMIN - 128) / 256)
        j1 = (XMAX - 128) // 256
        i0 = -((128 - YMIN) // 256)
        i1 = (YMAX - 128) // 256
        j0 = max(j0, 0)
        j1 = min(j1, W - 1)
        i0 = max(i0, r0)
        i1 = min(i1, r1 - 1)
        if j0 > j1 or i0 > i1:
            continue
        area = (X1 - X0) * (Y2 - Y0) - (X2 - X0) * (Y1 - Y0)
        if area == 0:
            continue
        z0 = sv[n, a, 2]
        z1 = sv[n, b, 2]
        z2 = sv[n, c, 2]
        if persp and not (z0 > 0.0 and z1 > 0.0 and z2 > 0.0):
            continue
        if not (np.isfinite(z0) and np.isfinite(z1) and np.isfinite(z2)):
            continue
        # area > 0 here means clockwise on screen seen with y up, i.e. a back face
        if area > 0:
            if cull:
                continue
            # swap corners 1 and 2 so area < 0 (front-facing orientation) below
            sw = True
            X1, X2 = X2, X1
            Y1, Y2 = Y2, Y1
            z1, z2 = z2, z1
            fx1, fx2 = fx2, fx1
            fy1, fy2 = fy2, fy1
        else:
            sw = False
            area = -area  # |area|: the edge functions below are positive inside
        # Front orientation: corners 0 -> 1 -> 2 counter-clockwise on screen (y down), so
        # with E_ab(p) = (p.x - a.x)(b.y - a.y) - (p.y - a.y)(b.x - a.x) inside is E >= 0.
        # Top-left rule for this orientation: an edge a->b is "left" if b.y > a.y (going
        # down) and "top" if horizontal going left (b.x < a.x).
        dy12 = Y2 - Y1
        dx12 = X2 - X1
        dy20 = Y0 - Y2
        dx20 = X0 - X2
        dy01 = Y1 - Y0
        dx01 = X1 - X0
        bias0 = 0 if (dy12 > 0 or (dy12 == 0 and dx12 < 0)) else -1
        bias1 = 0 if (dy20 > 0 or (dy20 == 0 and dx20 < 0)) else -1
        bias2 = 0 if (dy01 > 0 or (dy01 == 0 and dx01 < 0)) else -1
        px0 = np.int64(j0) * 256 + 128
        py = np.int64(i0) * 256 + 128
        # Coverage is decided on the snapped integer grid; the barycentrics themselves come
        # from the unsnapped float64 positions so that they match the torch path (and the
        # reference) to float precision instead of to 1/256 px.
        gx0 = np.float64(fx0)
        gy0 = np.float64(fy0)
        gx1 = np.float64(fx1)
        gy1 = np.float64(fy1)
        gx2 = np.float64(fx2)
        gy2 = np.float64(fy2)
        farea = (gx2 - gx0) * (gy1 - gy0) - (gx1 - gx0) * (gy2 - gy0)
        if farea == 0.0:
            continue
        inv_area = 1.0 / farea
        if persp:
            iw0 = 1.0 / np.float64(z0)
            iw1 = 1.0 / np.float64(z1)
            iw2 = 1.0 / np.float64(z2)
        else:
            iw0 = 1.0
            iw1 = 1.0
            iw2 = 1.0
        for i in range(i0, i1 + 1):
            cy = i + 0.5
            e0 = (px0 - X1) * dy12 - (py - Y1) * dx12
            e1 = (px0 - X2) * dy20 - (py - Y2) * dx20
            e2 = (px0 - X0) * dy01 - (py - Y0) * dx01
            for j in range(j0, j1 + 1):
                if e0 + bias0 >= 0 and e1 + bias1 >= 0 and e2 + bias2 >= 0:
                    cx = j + 0.5
                    l0 = ((cx - gx1) * (gy2 - gy1) - (cy - gy1) * (gx2 - gx1)) * inv_area
                    l1 = ((cx - gx2) * (gy0 - gy2) - (cy - gy2) * (gx0 - gx2)) * inv_area
                    l2 = 1.0 - l0 - l1
                    if persp:
                        q0 = l0 * iw0
                        q1 = l1 * iw1
                        q2 = l2 * iw2
                        s = q0 + q1 + q2
                        z = 1.0 / s
                        l0 = q0 * z
                        l1 = q1 * z
                        l2 = q2 * z
                    else:
                        z = l0 * z0 + l1 * z1 + l2 * z2
                    if z < zbuf[n, i, j]:
                        zbuf[n, i, j] = z
                        p2f[n, i, j] = f
                        bary[n, i, j, 0] = l0
                        if sw:
                            bary[n, i, j, 1] = l2
                            bary[n, i, j, 2] = l1
                        else:
                            bary[n, i, j, 1] = l1
                            bary[n, i, j, 2] = l2
                e0 += 256 * dy12
                e1 += 256 * dy20
                e2 += 256 * dy01
            py += 256


@njit(cache=True, parallel=True, nogil=True)
def _raster_batch(sv, tris, H, W, n_bands, cull, persp, p2f, bary, zbuf):
    N = sv.shape[0]
    rows = (H + n_bands - 1) // n_bands
    for k in prange(N * n_bands):
        n = k // n_bands
        b = k % n_bands
        r0 = b * rows
        r1 = min(H, r0 + rows)
        if r0 < r1:
            _raster_band(sv, tris, n, r0, r1, W, cull, persp, p2f, bary, zbuf)


def _check_inputs(screen_vertices, triangles, height, width):
    sv = np.asarray(screen_vertices)
    if sv.ndim == 2:
        raise ValueError("screen_vertices must be (N, V, 3); add a batch axis with [None]")
    if sv.ndim != 3 or sv.shape[-1] != 3:
        raise ValueError(f"screen_vertices must be (N, V, 3), got {sv.shape}")
    tris = np.asarray(triangles)
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(f"triangles must be (F, 3) integers, got {tris.shape} {tris.dtype}")
    if tris.size and (tris.min() < 0 or tris.max() >= sv.shape[1]):
        raise ValueError(f"triangle indices out of range [0, {sv.shape[1]})")
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    sv = np.ascontiguousarray(sv, dtype=np.float32)
    tris = np.ascontiguousarray(tris, dtype=np.int32)
    # read-only inputs (cached, shared arrays) would compile a second jitted signature
    return (sv if sv.flags.writeable else sv.copy(),
            tris if tris.flags.writeable else tris.copy())


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
    sv, tris = _check_inputs(screen_vertices, triangles, height, width)
    N = sv.shape[0]
    H, W = int(height), int(width)
    if n_bands is None:
        threads = numba.get_num_threads()
        n_bands = 1 if threads == 1 else max(1, -(-2 * threads // max(N, 1)))
    n_bands = int(max(1, min(n_bands, H)))
    p2f = np.empty((N, H, W), np.int32)
    bary = np.empty((N, H, W, 3), np.float32)
    zbuf = np.empty((N, H, W), np.float32)
    _raster_batch(sv, tris, H, W, n_bands, bool(cull_backfaces), bool(perspective_correct),
                  p2f, bary, zbuf)
    return Fragments(p2f, bary, zbuf)


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
