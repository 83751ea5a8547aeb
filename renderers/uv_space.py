"""UV-space outputs: per-vertex attributes in UV, per-texel visibility, image <-> UV maps.

The UV layout is rasterized once per topology and size by
:func:`facecorpus.meshops.uv.rasterize_uv` (cached there): texel -> (face, barycentrics).
Because ``uv_triangles`` and ``triangles`` index the same faces, those barycentrics move any
per-vertex attribute into UV space (``uv_position`` from vertices, NCC in UV, ...).

UV image convention: S x S, column c <-> u = (c + 0.5) / S, row r <-> v = 1 - (r + 0.5) / S.

``uv_sampling_map`` (S, S, 2) holds, for every texel, where its surface point lands in the
image, in the normalised coordinates of ``torch.nn.functional.grid_sample`` with
``align_corners=False``: x_n = 2 x_px / W - 1, y_n = 2 y_px / H - 1 (so -1 and +1 are the outer
image borders and pixel centres sit at +0.5 in pixel units). Texels not covered by the layout
hold -2 (outside the image, so ``grid_sample`` with zero padding reads 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.uv import UVRaster, rasterize_uv
from facecorpus.renderers.cameras import Camera
from facecorpus.renderers.interpolate import interpolate, sample_bilinear
from facecorpus.renderers.raster import Fragments

OUTSIDE = -2.0

__all__ = ["OUTSIDE", "UVProjection", "UVRaster", "image_to_uv", "project_to_uv",
           "rasterize_uv", "to_uv_space", "uv_fragments"]


def uv_fragments(raster: UVRaster) -> Fragments:
    """View a UV raster as (1, S, S) fragments (zbuf 0 on covered texels, +inf elsewhere)."""
    face = raster.texel_face[None]
    return Fragments(face, raster.texel_bary[None],
                     np.where(face >= 0, 0.0, np.inf).astype(np.float32))


def to_uv_space(attributes, raster: UVRaster, triangles) -> np.ndarray:
    """Move per-vertex attributes into UV space.

    Args:
        attributes: (V, C) or (N, V, C) per vertex (e.g. vertices -> ``uv_position``).
        raster: from :func:`rasterize_uv` for this model's layout.
        triangles: (F, 3) vertex indices (same faces as the layout's ``uv_triangles``).

    Returns:
        (S, S, C) or (N, S, S, C) float32, 0 on texels outside the layout.
    """
    a = np.asarray(attributes, np.float32)
    fr = uv_fragments(raster)
    if a.ndim == 3:
        N = a.shape[0]
        fr = Fragments(np.broadcast_to(fr.pix_to_face, (N,) + fr.pix_to_face.shape[1:]),
                       np.broadcast_to(fr.bary, (N,) + fr.bary.shape[1:]),
                       np.broadcast_to(fr.zbuf, (N,) + fr.zbuf.shape[1:]))
        return interpolate(a, Fragments(np.ascontiguousarray(fr.pix_to_face),
                                        np.ascontiguousarray(fr.bary), fr.zbuf), triangles)
    return interpolate(a, fr, triangles)[0]


@dataclass(frozen=True, eq=False)
class UVProjection:
    """Where each texel lands in N images and whether the image saw it.

    Attributes:
        uv_sampling_map: (N, S, S, 2) float32 normalised image x, y (see module docstring);
            ``OUTSIDE`` (-2) on texels outside the UV layout.
        uv_visible_mask: (N, S, S) bool: texel in the layout, inside the image, and its
            surface point is the one the image z-buffer kept (within the depth tolerance).
        uv_depth: (N, S, S) float32 depth of the texel's surface point (+inf outside).
    """

    uv_sampling_map: np.ndarray
    uv_visible_mask: np.ndarray
    uv_depth: np.ndarray


def project_to_uv(vertices, triangles, cameras: Camera | Sequence[Camera], raster: UVRaster,
                  fragments: Fragments, *, depth_tol: float | None = None) -> UVProjection:
    """Project every texel's surface point into the images and test it against the z-buffer.

    Args:
        vertices: (V, 3) or (N, V, 3) model space, the mesh that produced ``fragments``.
        triangles: (F, 3).
        cameras: one Camera or N (those of the raster pass).
        raster: UV raster of the layout.
        fragments: (N, H, W) image-space raster pass of the same mesh and cameras.
        depth_tol: visibility tolerance in the camera's depth units (mm for perspective,
            pixels for orthographic); default 1% of each view's mesh depth extent. Each texel
            also gets 0.75 px times its face's screen-space depth slope (at most 5x the
            tolerance), and only front-facing faces (counter-clockwise seen from the camera)
            count as visible.

    Returns:
        :class:`UVProjection`.
    """
    cams = [cameras] if isinstance(cameras, Camera) else list(cameras)
    v = np.asarray(vertices, np.float32)
    v = v[None] if v.ndim == 2 else v
    N, H, W = fragments.pix_to_face.shape
    if len(cams) == 1 and N > 1:
        cams = cams * N
    if len(cams) != N or len(v) not in (1, N):
        raise ValueError(f"project_to_uv: {len(cams)} cameras and {len(v)} meshes for "
                         f"{N} images")
    S = raster.size
    tris = np.asarray(triangles, np.int64)
    pos = to_uv_space(v, raster, tris)  # (Nv, S, S, 3) texel surface points
    covered = raster.mask
    tface = raster.texel_face[covered]
    smap = np.full((N, S, S, 2), OUTSIDE, np.float32)
    vis = np.zeros((N, S, S), bool)
    depth = np.full((N, S, S), np.inf, np.float32)
    for k, cam in enumerate(cams):
        sv = cam.project(v[min(k, len(v) - 1)]).astype(np.float64)
        p = cam.project(pos[min(k, len(pos) - 1)][covered])  # (P, 3)
        tol = depth_tol
        if tol is None:
            tol = 0.01 * float(sv[:, 2].max() - sv[:, 2].min())
        # Per face: front-facing? and how fast depth changes per pixel on screen. A texel
        # point and the pixel centre it is compared at differ by up to ~0.7 px, so a steep
        # (grazing) surface gets that much extra tolerance, capped so occluders stay hidden.
        a, b, c = sv[tris[:, 0]], sv[tris[:, 1]], sv[tris[:, 2]]
        e1, e2 = b - a, c - a
        area = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
        front = area < 0  # counter-clockwise seen from the camera (y-down image)
        with np.errstate(divide="ignore", invalid="ignore"):
            gx = (e1[:, 2] * e2[:, 1] - e2[:, 2] * e1[:, 1]) / area
            gy = (e2[:, 2] * e1[:, 0] - e1[:, 2] * e2[:, 0]) / area
        slope = np.nan_to_num(np.hypot(gx, gy), nan=np.inf, posinf=np.inf)
        face_tol = tol + np.minimum(0.75 * slope, 5.0 * tol)
        smap[k][covered] = np.stack([2 * p[:, 0] / W - 1, 2 * p[:, 1] / H - 1], -1)
        depth[k][covered] = p[:, 2]
        col = np.floor(p[:, 0]).astype(np.int64)
        row = np.floor(p[:, 1]).astype(np.int64)
        inside = (col >= 0) & (col < W) & (row >= 0) & (row < H) & np.isfinite(p[:, 2])
        z = np.full(len(p), np.inf, np.float32)
        z[inside] = fragments.zbuf[k, row[inside], col[inside]]
        ok = inside & front[tface] & (np.abs(p[:, 2] - z) <= face_tol[tface])
        vis[k][covered] = ok
    return UVProjection(smap, vis, depth)


def image_to_uv(image, projection: UVProjection, *, visible_only: bool = True) -> np.ndarray:
    """Sample images into UV space along the sampling map (bilinear): ``uv_visible``.

    Args:
        image: (N, H, W, C) or (H, W, C) float in [0, 1] or uint8.
        projection: from :func:`project_to_uv` for these images.
        visible_only: zero the texels outside ``uv_visible_mask`` (else every texel that lands
            inside the image is sampled, occluded or not).

    Returns:
        (N, S, S, C) float32.
    """
    img = np.asarray(image)
    img = img[None] if img.ndim == 3 else img
    H, W = img.shape[1:3]
    m = projection.uv_sampling_map
    xy = np.stack([(m[..., 0] + 1) * 0.5 * W, (m[..., 1] + 1) * 0.5 * H], -1)
    if visible_only:
        mask = projection.uv_visible_mask
    else:
        mask = (m[..., 0] > -1) & (m[..., 0] < 1) & (m[..., 1] > -1) & (m[..., 1] < 1)
    return sample_bilinear(img, xy, mask)
