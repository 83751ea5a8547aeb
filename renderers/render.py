"""One raster pass -> every image-space output (image, mask, depth, normals, PNCC, UV).

This is what synthesis and unwrapping call. Shading follows Deep3DFaceRecon: SH Lambertian
lighting is evaluated per vertex (camera-space vertex normals) and the lit colour interpolated;
with a UV texture the per-pixel albedo is the bilinear texture lookup times the interpolated
irradiance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from facecorpus.renderers.cameras import Camera
from facecorpus.renderers.interpolate import interpolate, texture
from facecorpus.renderers.raster import Fragments, rasterize, rasterize_interpolate
from facecorpus.renderers.shading import DEFAULT_SH, composite, shade_vertices

OUTPUTS = ("image", "mask", "depth", "normals", "pncc", "uv")
DEFAULT_ALBEDO = 0.7


@dataclass(frozen=True, eq=False)
class RenderOutput:
    """Image-space outputs of one raster pass over N views of height H and width W.

    Attributes:
        fragments: the raster pass (:class:`~.raster.Fragments`).
        screen_vertices: (N, V, 3) ``[x_px, y_px, depth]`` used for it.
        mask: (N, H, W) bool covered pixels.
        image: (N, H, W, 3) float32 shaded colour composited over the background, or None.
        depth: (N, H, W) float32 depth of the visible surface, 0 on background, or None.
        normals: (N, H, W, 3) float32 unit camera-space normals (+z towards the camera),
            0 on background, or None.
        pncc: (N, H, W, 3) float32 interpolated NCC in [0, 1], 0 on background, or None.
        uv: (N, H, W, 2) float32 texture coordinates (u right, v up), 0 on background, or None.
    """

    fragments: Fragments
    screen_vertices: np.ndarray
    mask: np.ndarray
    image: np.ndarray | None = None
    depth: np.ndarray | None = None
    normals: np.ndarray | None = None
    pncc: np.ndarray | None = None
    uv: np.ndarray | None = None


def _as_cameras(cameras: Camera | Sequence[Camera]) -> list[Camera]:
    cams = [cameras] if isinstance(cameras, Camera) else list(cameras)
    if not cams:
        raise ValueError("render: no cameras")
    c0 = cams[0]
    for c in cams[1:]:
        if (c.kind, c.width, c.height) != (c0.kind, c0.width, c0.height):
            raise ValueError("render: all cameras of one call must share kind and image size")
    return cams


def _batch_vertices(vertices, n_views: int) -> np.ndarray:
    v = np.asarray(vertices, dtype=np.float32)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or v.shape[-1] != 3 or v.shape[0] not in (1, n_views):
        raise ValueError(f"render: vertices must be (V, 3) or (N={n_views}, V, 3), got "
                         f"{np.shape(vertices)}")
    return v


def rasterize_views(vertices, triangles, cameras: Camera | Sequence[Camera], *,
                    cull_backfaces: bool = False) -> tuple[Fragments, np.ndarray]:
    """Project model-space vertices with each camera and rasterize.

    Args:
        vertices: (V, 3) shared by all views or (N, V, 3) one mesh per view, model space.
        triangles: (F, 3).
        cameras: one :class:`~.cameras.Camera` or N of them (same kind and size).

    Returns:
        (fragments (N, H, W), screen_vertices (N, V, 3) float32).
    """
    frags, sv, _ = _rasterize_views(vertices, triangles, cameras, cull_backfaces, None)
    return frags, sv


def _rasterize_views(vertices, triangles, cameras, cull_backfaces, attributes):
    """:func:`rasterize_views`, plus per-vertex ``attributes`` interpolated in the same pass
    when given (None otherwise)."""
    cams = _as_cameras(cameras)
    v = _batch_vertices(vertices, len(cams))
    if len(cams) == 1:  # a view, not np.stack's copy of (V, 3)
        sv = cams[0].project(v[0])[None]
    else:
        sv = np.stack([c.project(v[min(k, len(v) - 1)]) for k, c in enumerate(cams)])
    kw = {"cull_backfaces": cull_backfaces, "perspective_correct": cams[0].is_perspective}
    if attributes is None:
        return rasterize(sv, triangles, cams[0].height, cams[0].width, **kw), sv, None
    frags, pix = rasterize_interpolate(sv, triangles, cams[0].height, cams[0].width,
                                       attributes, **kw)
    return frags, sv, pix


def render(vertices, triangles, cameras: Camera | Sequence[Camera], *,
           outputs: Sequence[str] = ("image", "mask", "depth", "pncc"),
           ncc=None, albedo=None, sh=DEFAULT_SH, vertex_normals=None,
           uv=None, uv_triangles=None, uv_texture=None, background=None,
           cull_backfaces: bool = False) -> RenderOutput:
    """Render N views of a mesh from one raster pass.

    Args:
        vertices: (V, 3) or (N, V, 3) model space (mm).
        triangles: (F, 3) counter-clockwise seen from outside.
        cameras: one Camera (N = 1, or N = len(vertices)) or a sequence of N cameras.
        outputs: any of ``OUTPUTS``; "mask" is always filled.
        ncc: (V, 3) NCC code (``facecorpus.meshops.geometry.ncc(model.vertices)``), needed
            for "pncc".
        albedo: (V, 3) or (N, V, 3) per-vertex albedo in [0, 1]; default uniform 0.7 grey.
        sh: (27,) or (N, 27) SH coefficients (:mod:`~.shading`).
        vertex_normals: (V, 3) or (N, V, 3) model-space unit normals; computed when needed
            and not given (pass them when rendering one mesh many times).
        uv, uv_triangles: (T, 2) and (F, 3) per-corner UVs, needed for "uv" and uv_texture.
        uv_texture: (S, S, 3) or (N, S, S, 3) albedo texture; replaces ``albedo``.
        background: see :func:`~.shading.composite`.
        cull_backfaces: skip back faces (safe for closed or face-only meshes seen from front).

    Returns:
        :class:`RenderOutput`; outputs not requested are None.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"render: unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    cams = _as_cameras(cameras)
    v = _batch_vertices(vertices, len(cams))
    if len(cams) == 1 and len(v) > 1:
        cams = cams * len(v)
    tris = np.asarray(triangles)
    if "pncc" in outputs and ncc is None:
        raise ValueError("render: 'pncc' needs ncc (V, 3)")
    # PNCC is interpolated inside the raster pass (no second pass over the bary array)
    frags, sv, pncc = _rasterize_views(v, tris, cams, cull_backfaces,
                                       ncc if "pncc" in outputs else None)
    mask = frags.mask
    out: dict[str, np.ndarray | None] = {}
    if "depth" in outputs:
        out["depth"] = np.where(mask, frags.zbuf, 0.0).astype(np.float32)
    if "pncc" in outputs:
        out["pncc"] = pncc
    uv_pix = None
    if "uv" in outputs or uv_texture is not None:
        if uv is None or uv_triangles is None:
            raise ValueError("render: 'uv' and uv_texture need uv and uv_triangles")
        uv_pix = interpolate(np.asarray(uv, np.float32)[np.asarray(uv_triangles)], frags)
        if "uv" in outputs:
            out["uv"] = uv_pix
    if "normals" in outputs or "image" in outputs:
        if vertex_normals is None:
            from facecorpus.meshops.geometry import vertex_normals as _vn

            vertex_normals = _vn(v, tris)
        rots = np.stack([c.rotation for c in cams])
        alb = np.float32(DEFAULT_ALBEDO) * np.ones(3, np.float32) if albedo is None else albedo
        lit, cam_n = shade_vertices(vertex_normals, rots, alb if uv_texture is None
                                    else np.ones(3, np.float32), sh)
        if "normals" in outputs:
            n_pix = interpolate(cam_n, frags, tris)
            norm = np.linalg.norm(n_pix, axis=-1, keepdims=True)
            out["normals"] = np.where(norm > 0, n_pix / np.maximum(norm, 1e-12), 0.0
                                      ).astype(np.float32)
        if "image" in outputs:
            colour = interpolate(lit, frags, tris)  # lit colour, or irradiance with a texture
            if uv_texture is not None:
                colour *= texture(uv_texture, uv_pix, mask)
            np.clip(colour, 0.0, 1.0, out=colour)
            out["image"] = composite(colour, mask, background)
    return RenderOutput(fragments=frags, screen_vertices=sv, mask=mask, **out)
