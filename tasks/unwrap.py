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
