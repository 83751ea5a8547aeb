"""Mesh basics: normals, NCC, the vertex symmetry map, mesh export and decimation.

Pure numpy/scipy functions on arrays; shapes in each docstring (V vertices, F triangles,
N a batch).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def face_normals(vertices: np.ndarray, triangles: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Per-triangle normals (right-hand rule: counter-clockwise corners face the viewer).

    Args:
        vertices: (V, 3) or (N, V, 3).
        triangles: (F, 3) integer indices.
        normalize: unit length if True, else the raw cross product (length = 2 x area).

    Returns:
        (F, 3) or (N, F, 3), same float dtype as ``vertices`` (float32 for integer input).
    """
    v = np.asarray(vertices)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float32)
    t = np.asarray(triangles)
    a = v[..., t[:, 0], :]
    n = np.cross(v[..., t[:, 1], :] - a, v[..., t[:, 2], :] - a)
    if normalize:
        n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-20)
    return n.astype(v.dtype, copy=False)


def _incidence(n_vertices: int, triangles: np.ndarray):
    """Sparse (V, F) matrix with a 1 for every corner: sums face values onto vertices."""
    from scipy.sparse import csr_matrix

    t = np.asarray(triangles, dtype=np.int64)
    F = t.shape[0]
    rows = t.reshape(-1)
    cols = np.repeat(np.arange(F), 3)
    return csr_matrix((np.ones(rows.size, np.float64), (rows, cols)), shape=(n_vertices, F))


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals.

    Each vertex gets the sum of its triangles' cross products (|cross| = 2 x area), normalised.
    Vertices used by no triangle get a zero normal.

    Args:
        vertices: (V, 3) or (N, V, 3) float.
        triangles: (F, 3) integer indices, counter-clockwise seen from outside.

    Returns:
        (V, 3) or (N, V, 3) float32.
    """
    v = np.asarray(vertices, dtype=np.float64)
    batched = v.ndim == 3
    if not batched:
        v = v[None]
    N, V, _ = v.shape
    fn = face_normals(v, triangles, normalize=False)  # (N, F, 3)
    M = _incidence(V, triangles)
    F = fn.shape[1]
    acc = M @ fn.transpose(1, 0, 2).reshape(F, N * 3)  # (V, N*3)
    acc = acc.reshape(V, N, 3).transpose(1, 0, 2)
    norm = np.linalg.norm(acc, axis=-1, keepdims=True)
    out = np.where(norm > 0, acc / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)
    return out if batched else out[0]


def ncc(vertices: np.ndarray) -> np.ndarray:
    """Normalized Coordinate Code: the (mean) shape normalised per axis to [0, 1].

    PNCC images are this code interpolated per pixel and shown as RGB = (x, y, z).

    Args:
        vertices: (V, 3) shape, usually the model's mean shape.

    Returns:
        (V, 3) float32 in [0, 1]; an axis with zero extent maps to 0.5.
    """
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    ext = hi - lo
    out = np.where(ext > 0, (v - lo) / np.where(ext > 0, ext, 1.0), 0.5)
    return out.astype(np.float32)


def symmetry_map(vertices: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vertex symmetry map: the nearest vertex to each vertex's mirror image.

    Args:
        vertices: (V, 3) shape, symmetric about the plane ``coordinate[axis] = 0``.
        axis: mirror axis (0 = x, the model convention).

    Returns:
        idx: (V,) int32, ``idx[i]`` is the vertex nearest to vertex i mirrored.
        residuals: (V,) float32 distance from the mirrored vertex i to ``vertices[idx[i]]``
            (report ``residuals.max()`` as the symmetry residual, in the model's units).
    """
    from scipy.spatial import cKDTree

    v = np.asarray(vertices, dtype=np.float64)
    m = v.copy()
    m[:, axis] = -m[:, axis]
    dist, idx = cKDTree(v).query(m, k=1)
    return idx.astype(np.int32), dist.astype(np.float32)


def split_seams(vertices: np.ndarray, triangles: np.ndarray, uv: np.ndarray,
                uv_triangles: np.ndarray):
    """Turn per-corner UVs into per-vertex UVs by duplicating seam vertices.

    Args:
        vertices: (V, 3); triangles: (F, 3); uv: (T, 2); uv_triangles: (F, 3).

    Returns:
        (vertices (V', 3), triangles (F, 3), uv (V', 2), source (V',) int64): ``source[i]`` is
        the original vertex of output vertex i (V' = number of distinct (vertex, uv) pairs).
    """
    pairs = np.stack([np.asarray(triangles).reshape(-1), np.asarray(uv_triangles).reshape(-1)], 1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    tris = inverse.reshape(-1, 3).astype(np.int32)
    return (np.asarray(vertices)[uniq[:, 0]], tris, np.asarray(uv)[uniq[:, 1]],
            uniq[:, 0].astype(np.int64))


def export_mesh(path: str | os.PathLike, vertices: np.ndarray, triangles: np.ndarray, *,
                uv: np.ndarray | None = None, uv_triangles: np.ndarray | None = None,
                vertex_colors: np.ndarray | None = None) -> Path:
    """Write an OBJ or PLY (by suffix) through trimesh, atomically.

    With ``uv``/``uv_triangles`` (per-corner UVs) seam vertices are duplicated so each
    written vertex has one UV (OBJ keeps them as ``vt``). ``vertex_colors`` (V, 3) float in
    [0, 1] or uint8 go to PLY (and OBJ as trimesh writes them) when no UVs are given.
    """
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".obj", ".ply"):
        raise ValueError(f"{path}: export_mesh writes .obj or .ply, not '{suffix}'")
    v = np.asarray(vertices, dtype=np.float64)
    t = np.asarray(triangles, dtype=np.int64)
    visual = None
    if uv is not None:
        if uv_triangles is None:
            uv_triangles = t
        v, t, uvv, src = split_seams(v, t, uv, uv_triangles)
        visual = trimesh.visual.TextureVisuals(uv=np.asarray(uvv, dtype=np.float64))
        if vertex_colors is not None:
            vertex_colors = np.asarray(vertex_colors)[src]
    mesh = trimesh.Trimesh(vertices=v, faces=t, visual=visual, process=False)
    if vertex_colors is not None and uv is None:
        c = np.asarray(vertex_colors)
        if c.dtype != np.uint8:
            c = (np.clip(c, 0, 1) * 255 + 0.5).astype(np.uint8)
        mesh.visual.vertex_colors = c
    path.parent.mkdir(parents=True, exist_ok=True)
    from facecorpus.core import atomic

    if suffix == ".obj":
        atomic.write_text(path, trimesh.exchange.obj.export_obj(
            mesh, include_texture=uv is not None, include_normals=False, write_texture=False))
    else:
        atomic.write_bytes(path, trimesh.exchange.ply.export_ply(mesh, encoding="binary"))
    return path


def decimate(vertices: np.ndarray, triangles: np.ndarray, target_faces: int, *,
             preserve_boundary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation through pymeshlab (optional dependency).

    Args:
        vertices: (V, 3); triangles: (F, 3).
        target_faces: the wanted triangle count (< F).

    Returns:
        (vertices (V', 3) float32, triangles (F', 3) int32) with F' close to ``target_faces``.
        The result is a new topology: model bases do not carry over.
    """
    try:
        import pymeshlab
    except ImportError as e:  # the `decimate` extra
        raise ImportError("decimate() needs pymeshlab: pip install 'facecorpus[decimate]'") from e
    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=np.asarray(vertices, dtype=np.float64),
                               face_matrix=np.asarray(triangles, dtype=np.int32)))
    ms.meshing_decimation_quadric_edge_collapse(targetfacenum=int(target_faces),
                                                preserveboundary=preserve_boundary,
                                                preservenormal=True, planarquadric=True)
    m = ms.current_mesh()
    return m.vertex_matrix().astype(np.float32), m.face_matrix().astype(np.int32)


def closest_point_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray,
                               c: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of the point of triangle (a, b, c) closest to p.

    Vectorised Ericson (Real-Time Collision Detection, 5.1.5): Voronoi regions of the
    vertices, edges and face, checked in reverse priority so earlier regions win.

    Args:
        p, a, b, c: (M, 3) float arrays (one triangle per point).

    Returns:
        (M, 3) float64 barycentrics (w_a, w_b, w_c), non-negative, summing to 1.
    """
    p, a, b, c = (np.asarray(x, dtype=np.float64) for x in (p, a, b, c))
    ab, ac = b - a, c - a
    ap, bp, cp = p - a, p - b, p - c

    def dot(x, y):
        return np.einsum("ij,ij->i", x, y)

    d1, d2 = dot(ab, ap), dot(ac, ap)
    d3, d4 = dot(ab, bp), dot(ac, bp)
    d5, d6 = dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        sv = np.where(denom != 0, vb / denom, 1 / 3)
        sw = np.where(denom != 0, vc / denom, 1 / 3)
        out = np.stack([1 - sv - sw, sv, sw], 1)
        e_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        m = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        out[m] = np.stack([np.zeros(m.sum()), 1 - e_bc[m], e_bc[m]], 1)
        e_ac = d2 / (d2 - d6)
        m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        out[m] = np.stack([1 - e_ac[m], np.zeros(m.sum()), e_ac[m]], 1)
        out[(d6 >= 0) & (d5 <= d6)] = (0.0, 0.0, 1.0)
        e_ab = d1 / (d1 - d3)
        m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        out[m] = np.stack([1 - e_ab[m], e_ab[m], np.zeros(m.sum())], 1)
        out[(d3 >= 0) & (d4 <= d3)] = (0.0, 1.0, 0.0)
        out[(d1 <= 0) & (d2 <= 0)] = (1.0, 0.0, 0.0)
    return np.clip(np.nan_to_num(out, nan=1 / 3), 0.0, 1.0)


def closest_points_on_mesh(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray,
                           k: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of a triangle mesh for many query points.

    Candidates are the ``k`` triangles with the nearest centroids (exact for reasonably
    uniform meshes and points near the surface, which is what it is for).

    Args:
        points: (M, 3) queries; vertices: (V, 3); triangles: (F, 3).

    Returns:
        face (M,) int32, bary (M, 3) float32, distance (M,) float32.
    """
    from scipy.spatial import cKDTree

    v = np.asarray(vertices, dtype=np.float64)
    t = np.asarray(triangles, dtype=np.int64)
    q = np.asarray(points, dtype=np.float64)
    k = int(min(k, len(t)))
    _, cand = cKDTree(v[t].mean(1)).query(q, k=k)
    cand = cand.reshape(len(q), k)
    M = len(q)
    best_d = np.full(M, np.inf)
    best_f = np.zeros(M, np.int64)
    best_b = np.zeros((M, 3))
    for j in range(k):
        f = cand[:, j]
        tri = t[f]
        bary = closest_point_on_triangles(q, v[tri[:, 0]], v[tri[:, 1]], v[tri[:, 2]])
        pt = np.einsum("mi,mij->mj", bary, v[tri])
        d = np.linalg.norm(pt - q, axis=1)
        better = d < best_d
        best_d[better], best_f[better], best_b[better] = d[better], f[better], bary[better]
    return best_f.astype(np.int32), best_b.astype(np.float32), best_d.astype(np.float32)
