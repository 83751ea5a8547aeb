"""Rasterizer backends behind one interface: ``rasterize(screen_vertices, triangles, height,
width, *, cull_backfaces, perspective_correct) -> Fragments``.

- ``numba`` (default, always present): :func:`facecorpus.renderers.raster.rasterize`.
- ``pytorch3d`` (optional): ``pytorch3d.renderer.mesh.rasterize_meshes``, used when pytorch3d
  is importable (it is not installable from this project's registries; see pyproject's
  ``pytorch3d`` extra). Screen vertices are mapped to pytorch3d's NDC (+x left, +y up, the
  shorter image side spans [-1, 1]) so pixel centres coincide; back faces are culled here
  with our winding rule, so both backends agree on what "front" means.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
from facecorpus.renderers.raster import Fragments, _check_inputs, rasterize

Rasterizer = Callable[..., Fragments]


def pytorch3d_available() -> bool:
    return importlib.util.find_spec("pytorch3d") is not None


def available_backends() -> list[str]:
    return ["numba"] + (["pytorch3d"] if pytorch3d_available() else [])


def screen_to_pytorch3d_ndc(screen_vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., 3) [x_px, y_px, depth] -> pytorch3d NDC [x, y, depth] (+x left, +y up).

    pytorch3d puts pixel column j's centre at ``r_x / 2 - (j + 0.5) r_x / W`` with
    ``r_x = 2 max(W / H, 1)`` (and likewise for rows), i.e. the same pixel-centre grid as ours.
    """
    sv = np.asarray(screen_vertices, np.float32)
    rx = 2.0 * max(width / height, 1.0)
    ry = 2.0 * max(height / width, 1.0)
    out = sv.copy()
    out[..., 0] = rx / 2 - sv[..., 0] * rx / width
    out[..., 1] = ry / 2 - sv[..., 1] * ry / height
    return out


def rasterize_pytorch3d(screen_vertices, triangles, height: int, width: int, *,
                        cull_backfaces: bool = False,
                        perspective_correct: bool = True) -> Fragments:
    """:func:`~.raster.rasterize` computed by pytorch3d (same inputs, same outputs)."""
    import torch
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    sv, tris = _check_inputs(screen_vertices, triangles, height, width)
    N, H, W = sv.shape[0], int(height), int(width)
    keep = [np.arange(len(tris))] * N
    if cull_backfaces:
        keep = []
        for n in range(N):
            p = sv[n][tris].astype(np.float64)
            area = ((p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
                    - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1]))
            keep.append(np.nonzero(area < 0)[0])  # front: counter-clockwise seen by camera
    ndc = screen_to_pytorch3d_ndc(sv, H, W)
    meshes = Meshes(verts=[torch.from_numpy(ndc[n]) for n in range(N)],
                    faces=[torch.from_numpy(tris[keep[n]].astype(np.int64)) for n in range(N)])
    p2f, zbuf, bary, _ = rasterize_meshes(meshes, image_size=(H, W), blur_radius=0.0,
                                          faces_per_pixel=1,
                                          perspective_correct=perspective_correct,
                                          cull_backfaces=False)
    p2f = p2f[..., 0].numpy().astype(np.int64)
    first = meshes.mesh_to_faces_packed_first_idx().numpy()
    out = np.full((N, H, W), -1, np.int32)
    for n in range(N):
        hit = p2f[n] >= 0
        out[n][hit] = keep[n][p2f[n][hit] - first[n]]
    z = zbuf[..., 0].numpy().astype(np.float32)
    b = bary[..., 0, :].numpy().astype(np.float32)
    mask = out >= 0
    return Fragments(out, np.where(mask[..., None], b, 0.0).astype(np.float32),
                     np.where(mask, z, np.inf).astype(np.float32))


def get_rasterizer(backend: str = "auto") -> Rasterizer:
    """The rasterize function of a backend: "numba", "pytorch3d" or "auto" (numba: it is the
    tested default; pytorch3d only when asked for)."""
    if backend in ("auto", "numba"):
        return rasterize
    if backend == "pytorch3d":
        if not pytorch3d_available():
            raise ModuleNotFoundError("the pytorch3d backend needs pytorch3d, which is not "
                                      "installed (see pyproject's `pytorch3d` extra)")
        return rasterize_pytorch3d
    raise ValueError(f"unknown rasterizer backend {backend!r}; choose from "
                     f"{['auto'] + available_backends()}")
