"""Dense correspondence: mediapipe's 468 face-mesh points embedded on a model's surface.

A :class:`Correspondence` holds, for every kept mediapipe point, the model triangle it lies
on and its barycentrics, so a fitted shape gives that point as a barycentric row of the
shape basis (``tasks.fit`` fits dense landmarks through it).

How it is built (:func:`build_correspondence`, deterministic, pure arrays):

1. similarity (Umeyama, no reflection) taking the canonical mesh's 68 shared points
   (``ids68``: mediapipe ids of the 68 landmarks) onto the model's 68 landmark vertices of
   the mean shape;
2. a thin-plate-spline warp of the residual on those 68 (scipy ``RBFInterpolator``,
   smoothing ``tps_smoothing``): the 68 shared points land on their vertices, the others
   follow smoothly;
3. each warped point goes to the closest point of the model surface
   (``geometry.closest_points_on_mesh`` over the ``k`` triangles with the nearest centroids);
4. points farther than ``max_dist`` x the mean shape's outer-eye-corner distance from the
   surface are dropped (0.15 by default: ~15 mm on an adult head; beyond that the point has
   no counterpart on the model, e.g. a region the model lacks).

The canonical mesh is mediapipe's ``canonical_face_model.obj`` (Apache-2.0, in the mediapipe
source tree, not in its wheel); it is read only when building. Built data for ICT-FaceKit is
shipped as ``meshops/data/mp468_<content hash[:16]>.npz`` (derived data: triangle ids and
barycentrics) by ``scripts/build_mp_correspondence.py``; :func:`correspondence_for` loads it
by the model's ``content_hash``, or builds and caches it under ``$FACECORPUS_CACHE`` when a
canonical mesh is given (``FACECORPUS_MP_CANONICAL``: an OBJ, or a (468, 3) ``.npy``).

Shapes: D kept points, V vertices, F triangles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
N_CANONICAL = 468


@dataclass(frozen=True)
class Correspondence:
    """``point_ids`` (D,) mediapipe ids kept; ``triangle`` (D,) model triangle ids;
    ``bary`` (D, 3) barycentrics (>= 0, rows sum to 1); ``distance`` (D,) mm from the warped
    canonical point to the surface (a build diagnostic); ``model_hash`` the model's
    ``content_hash``."""

    point_ids: np.ndarray
    triangle: np.ndarray
    bary: np.ndarray
    distance: np.ndarray
    model_hash: str

    def __len__(self) -> int:
        return len(self.point_ids)

    def points(self, vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
        """(D, 3) surface points of a shape with ``vertices`` (V, 3)."""
        return np.einsum("dk,dkc->dc", self.bary, vertices[triangles[self.triangle]])

    def save(self, path) -> None:
        from facecorpus.core.atomic import save_npz

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, {"point_ids": self.point_ids, "triangle": self.triangle,
                        "bary": self.bary, "distance": self.distance,
                        "model_hash": np.array(self.model_hash)})

    @classmethod
    def load(cls, path) -> Correspondence:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["point_ids"].astype(np.int32), z["triangle"].astype(np.int32),
                       z["bary"].astype(np.float64), z["distance"].astype(np.float32),
                       str(z["model_hash"]))


def read_canonical(path) -> np.ndarray:
    """(468, 3) canonical points from mediapipe's ``canonical_face_model.obj`` (its ``v``
    lines) or a ``.npy`` of that array."""
    path = Path(path)
    if path.suffix == ".npy":
        v = np.load(path, allow_pickle=False)
    else:
        v = np.array([[float(t) for t in line.split()[1:4]]
                      for line in path.read_text().splitlines() if line.startswith("v ")])
    v = np.asarray(v, np.float64)
    if v.shape != (N_CANONICAL, 3):
        raise ValueError(f"{path}: {v.shape} canonical points, need ({N_CANONICAL}, 3)")
    return v


def similarity(src: np.ndarray, dst: np.ndarray):
    """Umeyama least-squares similarity (no reflection): dst ~ s R src + t. Returns s, R, t."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    U, S, Vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(U @ Vt))
    D = np.diag([1.0, 1.0, d])
    R = U @ D @ Vt
    s = float((S * np.diag(D)).sum() / (a**2).sum())
    return s, R, md - s * R @ ms


def build_correspondence(vertices: np.ndarray, triangles: np.ndarray, landmarks: np.ndarray,
                         canonical: np.ndarray, ids68: np.ndarray, *, model_hash: str = "",
                         max_dist: float = 0.15, tps_smoothing: float = 0.0,
                         k: int = 48) -> Correspondence:
    """Embed ``canonical`` (468, 3) on the surface (``vertices`` (V, 3) mean shape,
    ``triangles`` (F, 3)). ``landmarks`` (68,) the model's landmark vertex ids, ``ids68``
    (68,) the canonical ids of the same 68 points. See the module docstring."""
    from facecorpus.meshops.geometry import closest_points_on_mesh
    from scipy.interpolate import RBFInterpolator

    V = np.asarray(vertices, np.float64)
    C = np.asarray(canonical, np.float64)
    dst = V[np.asarray(landmarks)]
    src = C[np.asarray(ids68)]
    s, R, t = similarity(src, dst)
    C1 = C @ (s * R).T + t
    warp = RBFInterpolator(C1[ids68], dst - C1[ids68], kernel="thin_plate_spline",
                           smoothing=tps_smoothing)
    C2 = C1 + warp(C1)
    tri, bary, dist = closest_points_on_mesh(C2, V, np.asarray(triangles), k)
    bary = bary.astype(np.float64)
    bary /= bary.sum(1, keepdims=True)
    iod = float(np.linalg.norm(dst[36] - dst[45]))
    keep = np.isfinite(dist) & (dist <= max_dist * iod) & (bary >= 0).all(1)
    ids = np.flatnonzero(keep).astype(np.int32)
    return Correspondence(ids, tri[keep], bary[keep], dist[keep].astype(np.float32),
                          model_hash)


def shipped_path(model_hash: str) -> Path:
    return DATA_DIR / f"mp468_{model_hash[:16]}.npz"


def correspondence_for(model, ids68: np.ndarray, canonical_path=None) -> Correspondence:
    """The dense correspondence of ``model`` (a ``MorphableModel``): shipped data matching
    its ``content_hash``, else a cached build, else built now from the canonical mesh at
    ``canonical_path`` / ``$FACECORPUS_MP_CANONICAL`` and cached.

    Raises:
        FileNotFoundError: nothing shipped or cached for this model and no canonical mesh.
    """
    h = model.content_hash()
    for p in (shipped_path(h), _cache_path(h)):
        if p.is_file():
            c = Correspondence.load(p)
            if c.model_hash == h:
                return c
    src = canonical_path or os.environ.get("FACECORPUS_MP_CANONICAL")
    if not src:
        raise FileNotFoundError(
            f"no dense correspondence for model {h[:16]}: none shipped, none cached; set "
            "FACECORPUS_MP_CANONICAL to mediapipe's canonical_face_model.obj to build one")
    c = build_correspondence(model.vertices, model.triangles, model.landmarks,
                             read_canonical(src), ids68, model_hash=h)
    c.save(_cache_path(h))
    return c


def _cache_path(model_hash: str) -> Path:
    root = Path(os.environ.get("FACECORPUS_CACHE", Path.home() / ".cache" / "facecorpus"))
    return root / "correspondence" / f"mp468_{model_hash[:16]}.npz"
