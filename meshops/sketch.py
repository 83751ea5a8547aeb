"""A dependency-free orthographic sketch of a mesh (painter's algorithm on the UV rasterizer
kernel): for previews and contact sheets where the renderers are not needed. Not a renderer:
no perspective, no anti-aliasing, per-triangle depth order only.
"""

from __future__ import annotations

import numpy as np
from facecorpus.meshops.geometry import vertex_normals
from facecorpus.meshops.uv import _raster_kernel


def _yaw(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def sketch(vertices: np.ndarray, triangles: np.ndarray, colors: np.ndarray | None = None, *,
           size: int = 256, yaw: float = 0.0, shade: bool = True,
           background: float = 0.0) -> np.ndarray:
    """Orthographic view of a mesh seen from +z after a yaw rotation (positive yaw turns the
    nose towards image right).

    Args:
        vertices: (V, 3); triangles: (F, 3); colors: (V, 3) in [0, 1] or None (grey).
        size: output side S; the mesh is fitted into 90% of the image.
        shade: multiply by a Lambertian term from a frontal light.

    Returns:
        (S, S, 3) float32 image in [0, 1].
    """
    v = np.asarray(vertices, dtype=np.float64) @ _yaw(yaw).T
    t = np.asarray(triangles, dtype=np.int64)
    lo, hi = v[:, :2].min(0), v[:, :2].max(0)
    centre, extent = (lo + hi) / 2, max(float((hi - lo).max()), 1e-9)
    scale = 0.9 * size / extent
    px = (v[:, 0] - centre[0]) * scale + size / 2
    py = size / 2 - (v[:, 1] - centre[1]) * scale
    order = np.argsort(v[t, 2].mean(1), kind="stable")  # far to near: near triangles last
    face = np.full((size, size), -1, np.int32)
    bary = np.zeros((size, size, 3), np.float32)
    _raster_kernel(px, py, np.ascontiguousarray(t[order]), size, face, bary)
    img = np.full((size, size, 3), background, np.float32)
    hit = face >= 0
    tri = t[order][face[hit]]
    b = bary[hit][..., None]
    col = np.full((len(v), 3), 0.8) if colors is None else np.asarray(colors, dtype=np.float64)
    c = (b * col[tri]).sum(1)
    if shade:
        n = vertex_normals(v, t)
        nz = np.clip((b * n[tri]).sum(1)[:, 2], 0.0, 1.0)
        c = c * (0.25 + 0.75 * nz[:, None])
    img[hit] = np.clip(c, 0, 1)
    return img
