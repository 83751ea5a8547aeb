"""Image-space masks of a fitted face.

- :func:`face_mask` — where the photo may be sampled into the UV map: the projected face
  region of the fitted mesh intersected with the landmark face oval (or a given mask),
  eroded so the uncertain edge (and any background beyond it) never enters the UV map.
- :func:`segmentation_mask` — the face mask stored with each sample for segmentation
  data, built as the correspondence-network paper does: the convex hull of the projected
  face-boundary vertices.

Shapes: N images of S x S pixels.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from facecorpus.meshops.model import MorphableModel


def region_triangles(model: MorphableModel, region: str | None) -> np.ndarray:
    """(F', 3) triangles whose three vertices all lie in ``model.regions[region]``
    (all triangles when ``region`` is None or absent)."""
    if not region or region not in model.regions:
        return model.triangles
    keep = np.zeros(model.n_vertices, bool)
    keep[model.regions[region]] = True
    return model.triangles[keep[model.triangles].all(1)]


def boundary_vertices(triangles: np.ndarray) -> np.ndarray:
    """Vertices on the open boundary of a triangle set (edges used by exactly one triangle)."""
    e = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]],
                                triangles[:, [2, 0]]]), axis=1).astype(np.int64)
    # one int64 key per edge: np.unique(axis=0) on the pairs sorts structured rows and cost
    # ~0.2 s per photo on ICT-FaceKit (#12); the keys give the same edges
    base = int(e.max(initial=0)) + 1
    uniq, counts = np.unique(e[:, 0] * base + e[:, 1], return_counts=True)
    once = uniq[counts == 1]
    return np.unique(np.concatenate([once // base, once % base])).astype(triangles.dtype)


def polygon_mask(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixel centres inside a (K, 2) polygon given in pixel coordinates.

    The same pixels as ``skimage.draw.polygon`` (its even-odd crossing test on integer
    (row, col) positions, the same float64 arithmetic and bounds; ``tests/test_unwrap.py``
    compares them), filled row by row: skimage tests every pixel of the bounding box against
    every edge (~10 ms per 256² face mask, two per photo, #12)."""
    r = np.ascontiguousarray(np.asarray(polygon)[:, 1], np.float64) - 0.5
    c = np.ascontiguousarray(np.asarray(polygon)[:, 0], np.float64) - 0.5
    m = np.zeros(shape, bool)
    # skimage's bounds, cast to Py_ssize_t as C casts them (NaN, inf, beyond 2^63: the
    # smallest integer, so a NaN or huge vertex draws nothing there); an empty polygon (a
    # degenerate oval) raises ValueError in min() as there, and its sample is rejected
    minr, maxr = _ssize(max(0, r.min())), _ssize(np.ceil(r.max()))
    minc, maxc = _ssize(max(0, c.min())), _ssize(np.ceil(c.max()))
    maxr, maxc = min(shape[0] - 1, maxr), min(shape[1] - 1, maxc)
    if minr <= maxr and minc <= maxc:  # an empty range stays out of numba: its length
        _fill_polygon(c, r, minr, maxr, minc, maxc, m)  # from -2^63 would overflow
    return m


def _ssize(x) -> int:
    """float -> int as x86-64's C cast (``cvttsd2si``): truncation, or -2^63 when NaN or out
    of range."""
    x = float(x)
    return int(x) if -2.0**63 <= x < 2.0**63 else -2**63


@njit(cache=True)
def _fill_polygon(xp, yp, minr, maxr, minc, maxc, out):  # pragma: no cover - numba
    """skimage's ``point_in_polygon`` (O'Rourke's ray crossings: a pixel is drawn when it is
    within 1e-12 of a vertex, or an odd number of edges cross the ray to its right, or to its
    left: inside or on an edge), with the same float64 expressions, but per row only over
    the edges that straddle it and the vertices on it: skimage visits every edge for every
    pixel of the bounding box."""
    n = xp.shape[0]
    eps = 1e-12
    r_edges = np.empty(n, np.int64)
    l_edges = np.empty(n, np.int64)
    on_row = np.empty(n, np.int64)
    for row in range(minr, maxr + 1):
        y = float(row)
        nr = nl = nv = 0
        j = n - 1
        for i in range(n):  # edge (j, i), j the previous vertex, as skimage walks them
            y0, y1 = yp[i] - y, yp[j] - y
            if -eps < y0 < eps:
                on_row[nv] = i
                nv += 1
            if (y0 > 0) != (y1 > 0):
                r_edges[nr] = i
                nr += 1
            if (y0 < 0) != (y1 < 0):
                l_edges[nl] = i
                nl += 1
            j = i
        if nr == 0 and nl == 0 and nv == 0:
            continue
        for col in range(minc, maxc + 1):
            x = float(col)
            hit = False
            for k in range(nv):
                x0 = xp[on_row[k]] - x
                if -eps < x0 < eps:
                    hit = True
                    break
            if not hit:
                rc = 0
                for k in range(nr):
                    i = r_edges[k]
                    j = i - 1 if i > 0 else n - 1
                    x0, y0, x1, y1 = xp[i] - x, yp[i] - y, xp[j] - x, yp[j] - y
                    if (x0 * y1 - x1 * y0) / (y1 - y0) > 0:
                        rc += 1
                lc = 0
                for k in range(nl):
                    i = l_edges[k]
                    j = i - 1 if i > 0 else n - 1
                    x0, y0, x1, y1 = xp[i] - x, yp[i] - y, xp[j] - x, yp[j] - y
                    if (x0 * y1 - x1 * y0) / (y1 - y0) < 0:
                        lc += 1
                hit = (rc & 1) == 1 or (lc & 1) == 1
            if hit:
                out[row, col] = True


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary erosion of (H, W) by a disk of radius ``px`` (0: unchanged)."""
    if px <= 0:
        return mask.copy()
    from scipy.ndimage import binary_erosion

    yy, xx = np.mgrid[-px:px + 1, -px:px + 1]
    return binary_erosion(mask, structure=(xx**2 + yy**2) <= px * px, border_value=0)


def projected_region_mask(model: MorphableModel, vertices: np.ndarray, camera,
                          region: str | None = "face") -> np.ndarray:
    """(H, W) bool: pixels covered by the fitted mesh's ``region`` triangles."""
    from facecorpus.renderers.render import rasterize_views

    frags, _ = rasterize_views(vertices, region_triangles(model, region), camera)
    return frags.mask[0]


def face_mask(model: MorphableModel, vertices: np.ndarray, camera, *,
              oval: np.ndarray | None = None, given: np.ndarray | None = None,
              region: str | None = "face", erode_px: int = 3) -> np.ndarray:
    """The sampling mask of one image (H, W) bool.

    Args:
        vertices: (V, 3) fitted shape; camera: its :class:`~facecorpus.renderers.cameras.Camera`.
        oval: (K, 2) landmark face-oval polygon in pixels (``tasks.landmarks.oval_for``), or None.
        given: (H, W) bool user mask (face, with occluders removed); replaces the oval.
    """
    m = projected_region_mask(model, vertices, camera, region)
    if given is not None:
        m &= np.asarray(given, bool)
    elif oval is not None:
        m &= polygon_mask(oval, m.shape)
    return erode(m, erode_px)


def segmentation_mask(model: MorphableModel, vertices: np.ndarray, camera,
                      region: str | None = "face") -> np.ndarray:
    """(H, W) bool convex hull of the projected boundary vertices of the face region."""
    from scipy.spatial import ConvexHull, QhullError

    tris = region_triangles(model, region)
    b = boundary_vertices(tris)
    if b.size < 3:
        b = np.unique(tris)
    xy = camera.project(vertices[b])[:, :2].astype(np.float64)
    xy = xy[np.isfinite(xy).all(1)]
    try:
        hull = xy[ConvexHull(xy).vertices]
    except (QhullError, ValueError):
        return np.zeros((camera.height, camera.width), bool)
    return polygon_mask(hull, (camera.height, camera.width))


def trim_edge(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` (N, S, S) bool without its outermost ``width`` texels (4-connected erosion;
    texels outside the map count as not visible).

    Why: the texels at a visible region's edge are sampled where the surface turns away or
    where the image mask ends, and were measured far worse than the interior (ICT-FaceKit,
    known texture, ambient light: 34–42 dB against 58–63 dB two rings in; docs/benchmarks.md).
    Where few images see a texel (the forehead's top, the jaw), most of a corpus prior's
    samples there are such edge texels — hair and background mixed in.
    """
    if width <= 0:
        return mask
    from scipy.ndimage import binary_erosion, generate_binary_structure

    st = generate_binary_structure(2, 1)[None]  # no erosion across the batch axis
    return binary_erosion(mask, st, iterations=int(width), border_value=0)
