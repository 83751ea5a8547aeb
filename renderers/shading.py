"""Spherical-harmonics Lambertian shading (Deep3DFaceRecon basis) and compositing.

SH lighting uses 27 coefficients: 9 per colour channel (bands 0-2), laid out channel-major
``[R0..R8, G0..G8, B0..B8]`` exactly like Deep3DFaceRecon's ``gamma.reshape(-1, 3, 9)``.
The basis already folds in the Lambertian convolution constants (``a0 = pi``,
``a1 = 2 pi / sqrt(3)``, ``a2 = 2 pi / sqrt(8)``) and the SH normalisation
(``c0 = 1 / sqrt(4 pi)``, ``c1 = sqrt(3) / sqrt(4 pi)``, ``c2 = 3 sqrt(5) / sqrt(12 pi)``),
with Deep3DFaceRecon's signs and order::

    Y = [a0 c0, -a1 c1 ny, a1 c1 nz, -a1 c1 nx, a2 c2 nx ny, -a2 c2 ny nz,
         a2 c2 / (2 sqrt 3) (3 nz^2 - 1), -a2 c2 nx nz, a2 c2 / 2 (nx^2 - ny^2)]

Normals are unit vectors in camera space (+z towards the camera, y up), so a light with
coefficient 3 > 0 comes from the camera side. Deep3DFaceRecon adds ``init_lit`` (0.8 on
coefficient 0 of every channel) to its network output before using it; coefficients here are
the values *after* that addition (:func:`sh_from_deep3d` converts).

colour = albedo * (Y(normal) . coeffs_channel), per channel; not clipped.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

A0, A1, A2 = math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0)
C0 = 1 / math.sqrt(4 * math.pi)
C1 = math.sqrt(3.0) / math.sqrt(4 * math.pi)
C2 = 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi)
DEEP3D_INIT_LIT = 0.8

#: Ambient light of Deep3DFaceRecon's zero prediction plus a soft frontal-upper key light.
DEFAULT_SH = np.tile(np.array([0.8, -0.15, 0.35, 0.0, 0, 0, -0.05, 0, 0], np.float32), 3)


def sh_from_deep3d(gamma) -> np.ndarray:
    """Deep3DFaceRecon network output gamma (..., 27) -> coefficients used here (adds init_lit)."""
    g = np.array(gamma, dtype=np.float32, copy=True)
    g[..., 0::9] += DEEP3D_INIT_LIT
    return g


def _basis(nx, ny, nz, stack):
    one = nx * 0 + 1
    return stack([
        A0 * C0 * one,
        -A1 * C1 * ny,
        A1 * C1 * nz,
        -A1 * C1 * nx,
        A2 * C2 * nx * ny,
        -A2 * C2 * ny * nz,
        A2 * C2 * 0.5 / math.sqrt(3.0) * (3 * nz * nz - 1),
        -A2 * C2 * nx * nz,
        A2 * C2 * 0.5 * (nx * nx - ny * ny),
    ], -1)


def sh_basis(normals) -> np.ndarray:
    """SH basis per normal: (..., 3) unit normals -> (..., 9)."""
    n = np.asarray(normals, dtype=np.float32)
    return _basis(n[..., 0], n[..., 1], n[..., 2], np.stack)


def sh_basis_torch(normals):
    """Torch version of :func:`sh_basis` (differentiable): (..., 3) -> (..., 9)."""
    import torch

    return _basis(normals[..., 0], normals[..., 1], normals[..., 2], torch.stack)


def sh_irradiance(normals, coeffs) -> np.ndarray:
    """Per-channel irradiance: normals (..., 3), coeffs (27,), or (N, 27) for normals with a
    leading batch axis N -> (..., 3) float32."""
    Y = sh_basis(normals)  # (..., 9)
    c = np.asarray(coeffs, dtype=np.float32)
    if c.ndim == 1:
        return Y @ c.reshape(3, 9).T
    c = c.reshape(c.shape[0], 3, 9)
    flat = Y.reshape(Y.shape[0], -1, 9)
    return np.einsum("nvk,nck->nvc", flat, c).reshape(Y.shape[:-1] + (3,))


@njit(cache=True, nogil=True, error_model="numpy")
def _shade_kernel(normals, rot, albedo, coeffs, colour, cam_normals):  # pragma: no cover
    N = rot.shape[0]
    V = normals.shape[1]
    k0 = A0 * C0
    k1 = A1 * C1
    k2 = A2 * C2
    k6 = A2 * C2 * 0.5 / math.sqrt(3.0)
    for n in range(N):
        nn = n if normals.shape[0] > 1 else 0
        na = n if albedo.shape[0] > 1 else 0
        nc = n if coeffs.shape[0] > 1 else 0
        for v in range(V):  # O(V) per view: serial, cheap next to the raster pass
            x0 = normals[nn, v, 0]
            y0 = normals[nn, v, 1]
            z0 = normals[nn, v, 2]
            x = rot[n, 0, 0] * x0 + rot[n, 0, 1] * y0 + rot[n, 0, 2] * z0
            y = rot[n, 1, 0] * x0 + rot[n, 1, 1] * y0 + rot[n, 1, 2] * z0
            z = rot[n, 2, 0] * x0 + rot[n, 2, 1] * y0 + rot[n, 2, 2] * z0
            cam_normals[n, v, 0] = x
            cam_normals[n, v, 1] = y
            cam_normals[n, v, 2] = z
            b1 = -k1 * y
            b2 = k1 * z
            b3 = -k1 * x
            b4 = k2 * x * y
            b5 = -k2 * y * z
            b6 = k6 * (3.0 * z * z - 1.0)
            b7 = -k2 * x * z
            b8 = k2 * 0.5 * (x * x - y * y)
            for ch in range(3):
                o = 9 * ch
                e = (k0 * coeffs[nc, o] + b1 * coeffs[nc, o + 1] + b2 * coeffs[nc, o + 2]
                     + b3 * coeffs[nc, o + 3] + b4 * coeffs[nc, o + 4]
                     + b5 * coeffs[nc, o + 5] + b6 * coeffs[nc, o + 6]
                     + b7 * coeffs[nc, o + 7] + b8 * coeffs[nc, o + 8])
                colour[n, v, ch] = albedo[na, v, ch] * e


def shade_vertices(normals, rotations, albedo, coeffs) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex SH Lambertian colour for N views in one pass (the renderer's fast path).

    Args:
        normals: (V, 3) or (N, V, 3) unit model-space vertex normals.
        rotations: (N, 3, 3) model -> camera rotations.
        albedo: (V, 3) or (N, V, 3) in [0, 1], or one (3,) colour for every vertex.
        coeffs: (27,) or (N, 27).

    Returns:
        (colour (N, V, 3), camera-space normals (N, V, 3)), float32.
    """
    nrm = np.asarray(normals, np.float32)
    nrm = nrm[None] if nrm.ndim == 2 else nrm
    rot = np.ascontiguousarray(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
    N, V = rot.shape[0], nrm.shape[1]
    alb = np.asarray(albedo, np.float32)
    if alb.ndim == 1:
        alb = np.broadcast_to(alb, (1, V, 3))
    alb = alb[None] if alb.ndim == 2 else alb
    c = np.asarray(coeffs, np.float32).reshape(-1, 27)
    colour = np.empty((N, V, 3), np.float32)
    cam = np.empty((N, V, 3), np.float32)
    _shade_kernel(np.ascontiguousarray(nrm), rot, np.ascontiguousarray(alb),
                  np.ascontiguousarray(c), colour, cam)
    return colour, cam


def lambertian(albedo, normals, coeffs=DEFAULT_SH) -> np.ndarray:
    """SH Lambertian shading: albedo (..., 3) * irradiance(normals).

    Args:
        albedo: (..., 3) in [0, 1]; normals: (..., 3) unit, camera space; coeffs: (27,) or
            (N, 27) for a leading batch axis N.

    Returns:
        (..., 3) float32 colours (not clipped).
    """
    return (np.asarray(albedo, np.float32) * sh_irradiance(normals, coeffs)).astype(np.float32)


def composite(image, mask, background=None) -> np.ndarray:
    """Put rendered pixels over a background.

    Args:
        image: (N, H, W, C) or (H, W, C) rendered colours; mask: matching (N, H, W) bool or
            float coverage in [0, 1].
        background: None (black), a colour (C,), or an image (H, W, C) / (N, H, W, C) float in
            [0, 1] or uint8.

    Returns:
        float32 array shaped like ``image``.
    """
    img = np.asarray(image, np.float32)
    if background is None:
        bg = np.zeros((), np.float32)
    else:
        bg = np.asarray(background)
        bg = bg.astype(np.float32) / 255.0 if bg.dtype == np.uint8 else bg.astype(np.float32)
    m = np.asarray(mask)
    if m.dtype == np.bool_:  # hard coverage: a select, no blending arithmetic
        return np.where(m[..., None], img, bg).astype(np.float32, copy=False)
    m = m.astype(np.float32)[..., None]
    return (img * m + bg * (1.0 - m)).astype(np.float32)
