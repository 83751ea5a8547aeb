"""Unwrap: sample each photo into the model's UV layout through its fitted mesh.

For every texel of the S x S layout: its surface point on the fitted mesh is projected into
the image; it is *visible* when the image z-buffer kept that point (front-facing, within the
depth tolerance: ``renderers.uv_space.project_to_uv``), it lands inside the face mask
(:func:`facecorpus.tasks.masks.face_mask`), and the surface is not seen at a grazing angle
(``cos(view angle) >= min_cos``). Visible texels get the bilinearly sampled photo colour.

Outputs (one name per concept):

- ``uv_visible`` (N, S, S, 3) float32 in [0, 1], 0 where not visible;
- ``uv_visible_mask`` (N, S, S) bool;
- ``uv_sampling_map`` (N, S, S, 2) float32: normalised image x, y of every texel's surface
  point in ``grid_sample`` convention (align_corners=False: -1/+1 are the image borders),
  the target of a learned UV sampler; texels outside the layout hold -2. It is filled for
  every texel of the layout (occluded ones included); ``uv_visible_mask`` says which to trust;
- ``uv_view_weight`` (N, S, S) float32 cos of the view angle (0 where not visible).

Optional occlusion rejection (:func:`reject_occlusions`): texels whose colour disagrees
strongly with the fitted rendering are dropped (hands, hair, glasses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.model import MorphableModel


@dataclass
class UnwrapResult:
    uv_visible: np.ndarray
    uv_visible_mask: np.ndarray
    uv_sampling_map: np.ndarray
    uv_view_weight: np.ndarray


def view_cosines(vertices: np.ndarray, triangles: np.ndarray, camera, raster) -> np.ndarray:
    """(S, S) cos between each texel's surface normal and the direction to the camera."""
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.renderers.uv_space import to_uv_space

    n_cam = vertex_normals(vertices, triangles) @ camera.rotation.T.astype(np.float32)
    n_uv = to_uv_space(n_cam, raster, triangles)
    n_uv /= np.maximum(np.linalg.norm(n_uv, axis=-1, keepdims=True), 1e-12)
    if camera.is_perspective:
        p_uv = to_uv_space(camera.to_camera_space(vertices).astype(np.float32), raster,
                           triangles)
        d = -p_uv / np.maximum(np.linalg.norm(p_uv, axis=-1, keepdims=True), 1e-12)
        return (n_uv * d).sum(-1)
    return n_uv[..., 2]  # orthographic: the camera looks down -z


def unwrap_one(image: np.ndarray, vertices: np.ndarray, camera, model: MorphableModel,
               uv_size: int, mask: np.ndarray | None = None, *, min_cos: float = 0.15,
               depth_tol: float | None = None) -> UnwrapResult:
    """Unwrap one image.

    Args:
        image: (H, W, 3) uint8 or float in [0, 1].
        vertices: (V, 3) fitted shape; camera: its Camera (``FitResult.camera_for(i)``).
        uv_size: S.
        mask: (H, W) bool sampling mask (see :func:`facecorpus.tasks.masks.face_mask`);
            None: the whole image.
        min_cos: texels seen at a grazing angle (cos below this) are not visible.

    Returns:
        :class:`UnwrapResult` with a leading batch axis of 1.
    """
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.render import rasterize_views
    from facecorpus.renderers.uv_space import image_to_uv, project_to_uv

    tris = model.triangles
    raster = rasterize_uv(model.uv, model.uv_triangles, uv_size)
    frags, _ = rasterize_views(vertices, tris, camera)
    proj = project_to_uv(vertices, tris, camera, raster, frags, depth_tol=depth_tol)
    vis = proj.uv_visible_mask[0].copy()
    cos = view_cosines(np.asarray(vertices, np.float32), tris, camera, raster)
    vis &= cos >= min_cos
    if mask is not None:
        H, W = mask.shape
        sm = proj.uv_sampling_map[0]
        col = np.floor((sm[..., 0] + 1) * 0.5 * W).astype(np.int64)
        row = np.floor((sm[..., 1] + 1) * 0.5 * H).astype(np.int64)
        inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        ok = np.zeros_like(vis)
        ok[inside] = mask[row[inside], col[inside]]
        vis &= ok
    proj = dataclasses.replace(proj, uv_visible_mask=vis[None])
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    uv_visible = image_to_uv(img, proj)
    return UnwrapResult(uv_visible=uv_visible, uv_visible_mask=vis[None],
                        uv_sampling_map=proj.uv_sampling_map,
                        uv_view_weight=np.where(vis, cos, 0.0).astype(np.float32)[None])


def unwrap_batch(images: np.ndarray, model: MorphableModel, fit, uv_size: int,
                 masks: np.ndarray | None = None, *, min_cos: float = 0.15) -> UnwrapResult:
    """Unwrap N images with their fits (:class:`facecorpus.tasks.fit.FitResult`).

    Args:
        images: (N, H, W, 3); masks: (N, H, W) bool or None.
    """
    parts = [unwrap_one(images[i], fit.vertices(model, i), fit.camera_for(i), model, uv_size,
                        None if masks is None else masks[i], min_cos=min_cos)
             for i in range(len(images))]
    return UnwrapResult(*(np.concatenate([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(UnwrapResult)))


def texels_in(mask: np.ndarray, uv_sampling_map: np.ndarray) -> np.ndarray:
    """(T, T) bool: the image mask (H, W) read at every texel's image point (nearest pixel of
    ``uv_sampling_map`` (T, T, 2) in [-1, 1]); texels mapped outside the image are False."""
    H, W = mask.shape
    col = np.floor((uv_sampling_map[..., 0] + 1) * 0.5 * W).astype(np.int64)
    row = np.floor((uv_sampling_map[..., 1] + 1) * 0.5 * H).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    out = np.zeros(uv_sampling_map.shape[:2], bool)
    out[inside] = mask[row[inside], col[inside]]
    return out


def truly_visible(model: MorphableModel, vertices: np.ndarray, camera, raster, *,
                  region: str | None, erode_px: int, supersample: int = 4) -> np.ndarray:
    """(T, T) bool reference for benchmarks and tests on synthetic faces: the texels of the
    true mesh (V, 3) and camera that the photo shows, independent of the unwrap's own rules.

    A texel counts when a ``supersample`` x finer z-buffer keeps its surface point, its face is
    front-facing (any positive view cosine: no ``min_cos``), it lies in the model's ``region``,
    and its image point is inside the true projected region eroded by ``erode_px`` (the band
    every sampling mask leaves out). ``raster``: the model's UV rasterization at size T.
    """
    from facecorpus.renderers.cameras import Camera
    from facecorpus.renderers.render import rasterize_views
    from facecorpus.renderers.uv_space import project_to_uv
    from facecorpus.tasks import masks as masks_mod

    v = np.asarray(vertices, np.float32)
    f = int(supersample)
    if camera.kind != "orthographic":
        raise ValueError("truly_visible: orthographic cameras only")
    fine = Camera.orthographic(camera.width * f, camera.height * f, camera.scale * f,
                               rotation=camera.rotation,
                               translation=np.asarray(camera.translation) * f)
    frags_f, _ = rasterize_views(v, model.triangles, fine)
    zbuf = project_to_uv(v, model.triangles, fine, raster, frags_f).uv_visible_mask[0]
    keep = np.zeros(model.n_vertices, bool)
    keep[model.regions.get(region, np.arange(model.n_vertices)) if region else
         np.arange(model.n_vertices)] = True
    in_region = np.zeros_like(raster.mask)
    in_region[raster.mask] = keep[model.triangles].all(1)[raster.texel_face[raster.mask]]
    frags, _ = rasterize_views(v, model.triangles, camera)
    smap = project_to_uv(v, model.triangles, camera, raster, frags).uv_sampling_map[0]
    proj = masks_mod.erode(masks_mod.projected_region_mask(model, v, camera, region), erode_px)
    return (zbuf & (view_cosines(v, model.triangles, camera, raster) > 0) & in_region
            & texels_in(proj, smap))


def reject_occlusions(uv_visible: np.ndarray, uv_visible_mask: np.ndarray,
                      uv_expected: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Drop visible texels whose colour disagrees with the fitted rendering in UV space.

    The per-image median colour difference is removed first (exposure / white-balance
    mismatch between photo and prior is not an occlusion).

    Args:
        uv_visible, uv_expected: (N, S, S, 3) float in [0, 1]; uv_visible_mask (N, S, S).
        threshold: L1 (mean over channels) above which a texel is an occluder.

    Returns:
        (N, S, S) bool new mask.
    """
    out = uv_visible_mask.copy()
    for i in range(len(out)):
        m = out[i]
        if not m.any():
            continue
        d = uv_visible[i] - uv_expected[i]
        d = d - np.median(d[m], axis=0)
        out[i] = m & (np.abs(d).mean(-1) <= threshold)
    return out


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of images in [0, 1] over ``mask`` (all pixels when None)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    mse = float(d.mean()) if d.size else float("nan")
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
