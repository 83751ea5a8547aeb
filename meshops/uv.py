"""UV-space rasterization and the UV mirror map.

UV image convention (shared by every stage): an ``S x S`` image, column ``c`` <-> ``u = (c +
0.5) / S``, row ``r`` <-> ``v = 1 - (r + 0.5) / S`` (v grows up, rows grow down). A texel is
covered when its centre lies inside (or on the edge of) a UV triangle.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from numba import njit


@dataclass(frozen=True, eq=False)
class UVRaster:
    """Which UV triangle covers each texel, and where.

    texel_face: (S, S) int32 triangle index, -1 where no triangle covers the texel centre.
    texel_bary: (S, S, 3) float32 barycentrics of the texel centre in that triangle (0 outside).
    Both arrays are read-only (they are cached and shared).
    """

    texel_face: np.ndarray
    texel_bary: np.ndarray

    @property
    def size(self) -> int:
        return int(self.texel_face.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """(S, S) bool: covered texels."""
        return self.texel_face >= 0


@njit(cache=True, nogil=True)
def _raster_kernel(px, py, tris, S, face, bary):  # pragma: no cover - compiled
    eps = 1e-7
    for f in range(tris.shape[0]):
        a, b, c = tris[f, 0], tris[f, 1], tris[f, 2]
        x0, y0, x1, y1, x2, y2 = px[a], py[a], px[b], py[b], px[c], py[c]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-14:
            continue
        # texel centres (j + 0.5, i + 0.5) inside the bounding box
        cmin = max(int(np.ceil(min(x0, x1, x2) - 0.5)), 0)
        cmax = min(int(np.floor(max(x0, x1, x2) - 0.5)), S - 1)
        rmin = max(int(np.ceil(min(y0, y1, y2) - 0.5)), 0)
        rmax = min(int(np.floor(max(y0, y1, y2) - 0.5)), S - 1)
        inv = 1.0 / area
        for r in range(rmin, rmax + 1):
            yc = r + 0.5
            for col in range(cmin, cmax + 1):
                xc = col + 0.5
                w0 = ((x1 - xc) * (y2 - yc) - (x2 - xc) * (y1 - yc)) * inv
                w1 = ((x2 - xc) * (y0 - yc) - (x0 - xc) * (y2 - yc)) * inv
                w2 = 1.0 - w0 - w1
                if w0 >= -eps and w1 >= -eps and w2 >= -eps:
                    face[r, col] = f
                    bary[r, col, 0] = w0
                    bary[r, col, 1] = w1
                    bary[r, col, 2] = w2


_CACHE: OrderedDict[tuple[str, int], UVRaster] = OrderedDict()
_CACHE_MAX = 16


def _topology_key(uv: np.ndarray, uv_triangles: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in (np.ascontiguousarray(uv, dtype=np.float32),
              np.ascontiguousarray(uv_triangles, dtype=np.int32)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def rasterize_uv(uv: np.ndarray, uv_triangles: np.ndarray, size: int) -> UVRaster:
    """Rasterize a UV layout: for every texel centre, the covering triangle and barycentrics.

    Args:
        uv: (T, 2) float UV coordinates (u right, v up, the visible range [0, 1]).
        uv_triangles: (F, 3) int indices into ``uv`` (per-corner UVs, OBJ style).
        size: S, the UV image side.

    Returns:
        :class:`UVRaster` with ``texel_face`` (S, S) int32 (-1 outside) and ``texel_bary``
        (S, S, 3) float32 such that ``sum_i bary[..., i] * uv[uv_triangles[face, i]]`` is the
        texel centre's UV. Cached per (layout, size); the arrays are read-only.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"rasterize_uv: size must be positive, got {size}")
    key = (_topology_key(uv, uv_triangles), size)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    uv64 = np.asarray(uv, dtype=np.float64)
    px = uv64[:, 0] * size
    py = (1.0 - uv64[:, 1]) * size
    face = np.full((size, size), -1, np.int32)
    bary = np.zeros((size, size, 3), np.float32)
    _raster_kernel(px, py, np.ascontiguousarray(uv_triangles, dtype=np.int64), size, face, bary)
    face.flags.writeable = False
    bary.flags.writeable = False
    out = UVRaster(face, bary)
    _CACHE[key] = out
    if len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return out


def uv_coverage(uv: np.ndarray, uv_triangles: np.ndarray, size: int = 256) -> float:
    """Fraction of the S x S UV image covered by the layout's triangles."""
    return float(rasterize_uv(uv, uv_triangles, size).mask.mean())


def texel_centres_uv(size: int) -> np.ndarray:
    """(S, S, 2) float64 UV of every texel centre (the module's image convention)."""
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, 1.0 - c)
    return np.stack([u, v], -1)


def uv_to_texel(uv: np.ndarray, size: int) -> np.ndarray:
    """(..., 2) UV -> (..., 2) int (row, col) of the texel containing it (clipped to the image)."""
    uv = np.asarray(uv, dtype=np.float64)
    col = np.clip(np.floor(uv[..., 0] * size), 0, size - 1)
    row = np.clip(np.floor((1.0 - uv[..., 1]) * size), 0, size - 1)
    return np.stack([row, col], -1).astype(np.int32)


def uv_mirror_map(model, size: int, *, max_distance: float | None = None,
                  cache: bool = True) -> np.ndarray:
    """For each covered texel, the texel of the mirrored surface point.

    The texel centre's surface point ``p`` (through its UV triangle and barycentrics) is
    mirrored in x; the closest point of the mesh to the mirror image is found (a mirrored
    triangle on symmetric topology, any triangle otherwise) and its UV is looked up through
    that triangle's own corner UVs, so seams and non-symmetric layouts are handled; this is
    not an image flip. If that texel's centre is not covered (a UV-island border), the
    nearest covered texel of its 3 x 3 neighbourhood is used.

    Args:
        model: a :class:`~facecorpus.meshops.model.MorphableModel` (its mean shape is used).
        size: S.
        max_distance: mirror images farther than this from the surface (model units) get no
            mirror; default 2 x the median edge length.
        cache: keep the map in ``$FACECORPUS_CACHE/uv_mirror/``, keyed by the model's
            content hash, S, ``max_distance`` and the meshops source: every pseudo-GT process
            (the driver and each Dask worker) needs it and computing it costs ~1 CPU-s on
            ICT-FaceKit at S = 256 (#12). A cached file is the computed array itself.

    Returns:
        (S, S, 2) int32 ``(row, col)`` of the mirror texel; -1 where the texel is not covered
        or has no mirror.
    """
    if not cache:
        return _uv_mirror_map(model, size, max_distance)
    from facecorpus.core.atomic import save_npz
    from facecorpus.core.hashing import digest, source_digest
    from facecorpus.meshops.assets import cache_dir

    key = digest(model.content_hash(), int(size), max_distance, source_digest(("meshops",)),
                 n=24)
    path = cache_dir() / "uv_mirror" / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            got = z["mirror"]
        if got.shape == (size, size, 2) and got.dtype == np.int32:
            return got
    except (OSError, KeyError, ValueError):
        pass  # absent or unreadable: compute and (re)write
    out = _uv_mirror_map(model, size, max_distance)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, {"mirror": out})
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return out


def _uv_mirror_map(model, size: int, max_distance: float | None) -> np.ndarray:
    from facecorpus.meshops.geometry import closest_points_on_mesh

    raster = rasterize_uv(model.uv, model.uv_triangles, size)
    out = np.full((size, size, 2), -1, np.int32)
    rows, cols = np.nonzero(raster.mask)
    if rows.size == 0:
        return out
    v = model.vertices.astype(np.float64)
    tri = model.triangles
    f = raster.texel_face[rows, cols]
    b = raster.texel_bary[rows, cols].astype(np.float64)
    p = np.einsum("mi,mij->mj", b, v[tri[f]])
    p[:, 0] = -p[:, 0]
    g, bg, dist = closest_points_on_mesh(p, v, tri)
    if max_distance is None:
        e = v[tri[:, [1, 2, 0]]] - v[tri]
        max_distance = 2.0 * float(np.median(np.linalg.norm(e, axis=-1)))
    uv = model.uv.astype(np.float64)
    uvm = np.einsum("mi,mij->mj", bg.astype(np.float64), uv[model.uv_triangles[g]])
    # Exact texel of the mirrored UV, then the nearest covered one among its 3 x 3 neighbours.
    x = uvm[:, 0] * size - 0.5
    y = (1.0 - uvm[:, 1]) * size - 0.5
    r0, c0 = np.floor(y + 0.5).astype(np.int64), np.floor(x + 0.5).astype(np.int64)
    best = np.full(rows.size, np.inf)
    br = np.full(rows.size, -1, np.int64)
    bc = np.full(rows.size, -1, np.int64)
    for dr in (0, -1, 1):
        for dc in (0, -1, 1):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            ok[ok] = raster.texel_face[rr[ok], cc[ok]] >= 0
            d = (rr - y) ** 2 + (cc - x) ** 2
            take = ok & (d < best)
            best[take], br[take], bc[take] = d[take], rr[take], cc[take]
    good = (br >= 0) & (dist <= max_distance)
    out[rows[good], cols[good], 0] = br[good]
    out[rows[good], cols[good], 1] = bc[good]
    return out


def uv_mirror_coverage(mirror: np.ndarray, raster: UVRaster) -> float:
    """Fraction of covered texels that have a mirror texel."""
    covered = raster.mask
    return float((mirror[..., 0][covered] >= 0).mean()) if covered.any() else 0.0
