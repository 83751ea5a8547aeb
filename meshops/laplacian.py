"""Mesh Laplacians as sparse matrices, and the quadratic forms of a smoothness energy.

The cotangent weights come from :func:`facecorpus.meshops.dr.cotangent_weights` (clamped,
floored; see that module). Two operators:

- ``"cotangent"``: the Laplace-Beltrami operator ``Delta = M^-1 C`` with ``C`` the cotangent
  stiffness matrix and ``M`` the lumped (barycentric, one third of the incident triangle
  areas) mass matrix. Resolution independent: a field's energy does not change when the mesh
  is refined.
- ``"uniform"``: the graph Laplacian ``L = I - D^-1 A`` (dimensionless, one ring).

Shapes: V vertices, F triangles.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

LaplacianKind = Literal["cotangent", "uniform"]


def vertex_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(V,) lumped vertex areas: one third of the area of every incident triangle."""
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    a = 0.5 * np.linalg.norm(np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]]), axis=1)
    return np.bincount(t.reshape(-1), np.repeat(a / 3.0, 3), minlength=len(v))


def stiffness(vertices: np.ndarray, triangles: np.ndarray, kind: LaplacianKind = "cotangent"
              ) -> sp.csr_matrix:
    """(V, V) symmetric positive semi-definite ``C`` (rows sum to 0): cotangent weights, or
    unit weights for ``"uniform"``."""
    from facecorpus.meshops.dr import cotangent_weights

    V = len(vertices)
    ei, ej, w = cotangent_weights(vertices, triangles)
    if kind == "uniform":
        w = np.ones_like(w)
    W = sp.coo_matrix((np.r_[w, w], (np.r_[ei, ej], np.r_[ej, ei])), shape=(V, V)).tocsr()
    return (sp.diags(np.asarray(W.sum(1)).ravel()) - W).tocsr()


def smoothness_forms(vertices: np.ndarray, triangles: np.ndarray,
                     kind: LaplacianKind = "cotangent", unit: float = 1.0
                     ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Quadratic forms ``(K, Mr)`` of ``E(d) = sum_c d_c^T K d_c + lambda sum_c d_c^T Mr d_c``
    for a per-vertex field ``d`` (V, 3), both (V, V) sparse symmetric.

    ``"cotangent"``: ``K = C M^-1 C`` (the discrete integral of ``|Delta d|^2``) and
    ``Mr = M`` (integral of ``|d|^2``), with lengths measured in ``unit`` (the mesh is
    divided by it) and the areas normalised to a total of 1: a field's energy is a
    surface mean, independent of the mesh resolution and of the face's size.
    ``"uniform"``: ``K = L^T L / V`` and ``Mr = I / V`` (vertex means) with the graph
    Laplacian ``L``.
    """
    v = np.asarray(vertices, np.float64) / float(unit)
    V = len(v)
    if kind == "uniform":
        C = stiffness(v, triangles, "uniform")
        deg = np.asarray(C.diagonal()).clip(min=1)
        L = sp.diags(1.0 / deg) @ C
        return (L.T @ L / V).tocsr(), (sp.identity(V, format="csr") / V)
    C = stiffness(v, triangles, "cotangent")
    area = vertex_areas(v, triangles)
    total = float(area.sum())
    # vertices in no triangle get a tiny mass: the operator stays finite, they stay free
    m = np.maximum(area / max(total, 1e-300), 1e-12)
    K = C @ sp.diags(1.0 / (m * total)) @ C / total
    return K.tocsr(), sp.diags(m).tocsr()


def flipped_fraction(vertices: np.ndarray, reference: np.ndarray, triangles: np.ndarray
                     ) -> float:
    """Fraction of non-degenerate triangles of ``reference`` (V, 3) whose normal points
    against it in ``vertices`` (V, 3) (0 for a smooth deformation)."""
    t = np.asarray(triangles, np.int64)

    def fn(x):
        x = np.asarray(x, np.float64)
        return np.cross(x[t[:, 1]] - x[t[:, 0]], x[t[:, 2]] - x[t[:, 0]])

    a, b = fn(reference), fn(vertices)
    good = np.linalg.norm(a, axis=1) > 0
    return float(((a * b).sum(1)[good] <= 0).mean()) if good.any() else 0.0
