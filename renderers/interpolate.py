"""Attribute interpolation and texture sampling over :class:`~.raster.Fragments` (numba).

Outputs are float32 and 0 on background pixels. One jitted signature each (float32 in,
float32 out) keeps the compile cache small; inputs are converted.
"""

from __future__ import annotations

import numpy as np
from facecorpus.renderers.raster import Fragments, index_range
from numba import njit, prange


def _rw(a: np.ndarray) -> np.ndarray:
    """A writeable C-contiguous array: read-only inputs would compile a second signature."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _interp(p2f, bary, corner_idx, attr, out):
    N, H, W = p2f.shape
    C = attr.shape[2]
    per_image = attr.shape[0] > 1
    for k in prange(N * H):
        n = k // H
        i = k % H
        na = n if per_image else 0
        for j in range(W):
            f = p2f[n, i, j]
            if f < 0:
                for c in range(C):
                    out[n, i, j, c] = 0.0
                continue
            b0 = bary[n, i, j, 0]
            b1 = bary[n, i, j, 1]
            b2 = bary[n, i, j, 2]
            a0 = corner_idx[f, 0]
            a1 = corner_idx[f, 1]
            a2 = corner_idx[f, 2]
            for c in range(C):
                out[n, i, j, c] = (b0 * attr[na, a0, c] + b1 * attr[na, a1, c]
                                   + b2 * attr[na, a2, c])


def interpolate(attributes, fragments: Fragments, triangles=None) -> np.ndarray:
    """Interpolate attributes over the covered pixels with the fragments' barycentrics.

    Args:
        attributes: per-vertex (V, C) or (N, V, C), needs ``triangles`` (F, 3); or
            per-corner (F, 3, C) (e.g. UVs with seams, flat normals), ``triangles`` ignored.
            A per-vertex (V,) or per-corner (F, 3) array without channel axis is not accepted
            (ambiguous): add ``[..., None]``.
        fragments: from :func:`~.raster.rasterize`, (N, H, W).
        triangles: (F, 3) vertex indices used for that raster pass.

    Returns:
        (N, H, W, C) float32, 0 on background.
    """
    p2f, bary = fragments.pix_to_face, fragments.bary
    N, H, W = p2f.shape
    a = np.asarray(attributes)
    per_corner = triangles is None
    if per_corner and not (a.ndim == 3 and a.shape[1] == 3):
        raise ValueError(f"per-corner attributes must be (F, 3, C), got {a.shape} "
                         "(per-vertex attributes need `triangles`)")
    if not per_corner and not (a.ndim == 2 or (a.ndim == 3 and a.shape[0] in (1, N))):
        raise ValueError(f"per-vertex attributes must be (V, C) or (N={N}, V, C), got {a.shape}")
    if per_corner:
        F = a.shape[0]
        corner_idx = np.arange(F * 3, dtype=np.int32).reshape(F, 3)
        attr = a.reshape(1, F * 3, a.shape[2])
    else:
        corner_idx = _rw(np.asarray(triangles, dtype=np.int32))
        attr = a[None] if a.ndim == 2 else a
    attr = _rw(np.asarray(attr, dtype=np.float32))
    out = np.empty((N, H, W, attr.shape[2]), np.float32)
    if corner_idx.size:
        lo, hi = index_range(corner_idx)
        if lo < 0 or hi >= attr.shape[1]:
            raise ValueError(f"triangles index vertices in [{lo}, {hi}] but attributes has "
                             f"{attr.shape[1]} rows")
    _interp(_rw(np.asarray(p2f, np.int32)), _rw(np.asarray(bary, np.float32)), corner_idx,
            attr, out)
    return out


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _bilinear(img, xy, mask, out):
    """img (B, Hi, Wi, C); xy (N, H, W, 2) continuous pixel coords (centres at +0.5)."""
    N, H, W, _ = xy.shape
    Hi = img.shape[1]
    Wi = img.shape[2]
    C = img.shape[3]
    per_image = img.shape[0] > 1
    for k in prange(N * H):
        n = k // H
        i = k % H
        nb = n if per_image else 0
        for j in range(W):
            x = xy[n, i, j, 0] - 0.5
            y = xy[n, i, j, 1] - 0.5
            if not mask[n, i, j] or not (np.isfinite(x) and np.isfinite(y)):
                for c in range(C):
                    out[n, i, j, c] = 0.0
                continue
            # clamp to the border texel centres ("edge" padding)
            x = min(max(x, 0.0), Wi - 1.0)
            y = min(max(y, 0.0), Hi - 1.0)
            x0 = min(int(np.floor(x)), Wi - 2) if Wi > 1 else 0
            y0 = min(int(np.floor(y)), Hi - 2) if Hi > 1 else 0
            fx = x - x0
            fy = y - y0
            x1 = min(x0 + 1, Wi - 1)
            y1 = min(y0 + 1, Hi - 1)
            for c in range(C):
                top = img[nb, y0, x0, c] * (1.0 - fx) + img[nb, y0, x1, c] * fx
                bot = img[nb, y1, x0, c] * (1.0 - fx) + img[nb, y1, x1, c] * fx
                out[n, i, j, c] = top * (1.0 - fy) + bot * fy


def sample_bilinear(image, xy_px, mask=None) -> np.ndarray:
    """Bilinearly sample an image at continuous pixel coordinates (edge-clamped).

    Args:
        image: (Hi, Wi, C) or (N, Hi, Wi, C), or (Hi, Wi) for one channel.
        xy_px: (N, H, W, 2) or (H, W, 2) pixel coordinates, x right, y down, pixel centres at
            +0.5 (so (0.5, 0.5) returns pixel (0, 0) exactly).
        mask: (N, H, W) / (H, W) bool; where False (or where xy is not finite) the result is 0.

    Returns:
        (N, H, W, C) float32 (or (H, W, C) when ``xy_px`` had no batch axis).
    """
    xy = np.asarray(xy_px, dtype=np.float32)
    squeeze = xy.ndim == 3
    if squeeze:
        xy = xy[None]
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4:
        raise ValueError(f"image must be (H, W), (H, W, C) or (N, H, W, C), got {img.shape}")
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    img = _rw(np.asarray(img, dtype=np.float32))
    if img.shape[0] not in (1, xy.shape[0]):
        raise ValueError(f"image batch {img.shape[0]} does not match coordinates {xy.shape[0]}")
    m = np.ones(xy.shape[:3], bool) if mask is None else np.asarray(mask, bool).reshape(
        xy.shape[:3])
    out = np.empty(xy.shape[:3] + (img.shape[3],), np.float32)
    _bilinear(img, _rw(xy), _rw(m), out)
    return out[0] if squeeze else out


def uv_to_texel_xy(uv, size: int) -> np.ndarray:
    """UV (..., 2) (u right, v up) -> continuous pixel coordinates in an S x S UV image.

    Column c <-> u = (c + 0.5) / S; row r <-> v = 1 - (r + 0.5) / S.
    """
    uv = np.asarray(uv, dtype=np.float32)
    return np.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], -1)


def texture(uv_map, uv_per_pixel, mask=None) -> np.ndarray:
    """Look up a UV-space image with bilinear filtering.

    Args:
        uv_map: (S, S, C) or (N, S, S, C) texture (float in [0, 1] or uint8); rows follow the
            UV image convention (row r <-> v = 1 - (r + 0.5) / S).
        uv_per_pixel: (N, H, W, 2) UVs per pixel, e.g. ``interpolate(uv_per_corner, frags)``.
        mask: (N, H, W) bool covered pixels (``fragments.mask``); 0 elsewhere.

    Returns:
        (N, H, W, C) float32.
    """
    m = np.asarray(uv_map)
    size = m.shape[-2]
    if m.shape[-3] != size:
        raise ValueError(f"uv_map must be square (S, S, C), got {m.shape}")
    return sample_bilinear(m, uv_to_texel_xy(uv_per_pixel, size), mask)
