"""Cameras: pose from yaw/pitch/roll, perspective pinhole and scaled orthographic projection.

This module is the authority on the geometric conventions (``tests/test_render_cameras.py``
pins each of them):

- Model/world space: millimetres, right-handed, +x to the subject's left (viewer's right),
  +y up, +z out of the face towards the camera.
- Pose: ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` with angles in **degrees** at every API;
  ``X_world = R @ X_model + t`` (perspective) or ``s * R @ X_model`` plus a 2D image shift
  (scaled orthographic). Signs (right-handed rotations):

  * positive **yaw** turns the nose (+z) towards +x, i.e. towards image right;
  * positive **pitch** turns the nose down (towards image bottom);
  * positive **roll** turns the top of the head (+y) towards -x: the face rotates
    counter-clockwise in the image.
- Camera at the origin looking down -z (OpenGL style, world y up).
- Image space: x right, y down; pixel (row i, col j) covers [j, j+1) x [i, i+1) and its
  centre is (j + 0.5, i + 0.5).
- Perspective: ``x = cx + f X / (-Z)``, ``y = cy - f Y / (-Z)``, ``depth = -Z`` (> 0 in
  front of the camera). Scaled orthographic: ``x = cx + s X' + tx``, ``y = cy - s Y' - ty``,
  ``depth = -s Z'`` (pixels, can be negative; only its order matters) with
  ``(X', Y', Z') = R @ X_model``.

"Screen vertices" are ``(..., V, 3)`` arrays ``[x_px, y_px, depth]``: the input of
:func:`facecorpus.renderers.raster.rasterize`. Every projection has a numpy and a torch
version with the same formula; the torch one is differentiable in every argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from numba import njit

CameraKind = Literal["perspective", "orthographic"]


# --------------------------------------------------------------------------- rotations
def euler_to_rotation(yaw, pitch=0.0, roll=0.0) -> np.ndarray:
    """Rotation matrices ``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` from angles in degrees.

    Args:
        yaw, pitch, roll: scalars or broadcastable arrays of shape (...,), degrees.

    Returns:
        (..., 3, 3) float64.
    """
    y, p, r = (np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (yaw, pitch, roll))
    y, p, r = np.broadcast_arrays(y, p, r)
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    o, z = np.ones_like(y), np.zeros_like(y)
    rx = np.stack([o, z, z, z, cp, -sp, z, sp, cp], -1).reshape(y.shape + (3, 3))
    ry = np.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(y.shape + (3, 3))
    rz = np.stack([cr, -sr, z, sr, cr, z, z, z, o], -1).reshape(y.shape + (3, 3))
    return rz @ ry @ rx


def rotation_to_euler(rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_rotation`: (yaw, pitch, roll) in degrees, yaw in [-90, 90].

    Args:
        rotation: (..., 3, 3).
    """
    R = np.asarray(rotation, dtype=np.float64)
    # R = Rz Ry Rx: R[2,0] = -sin(yaw), R[2,1] = cos(yaw) sin(pitch), R[1,0] = sin(roll) cos(yaw)
    yaw = np.arcsin(np.clip(-R[..., 2, 0], -1.0, 1.0))
    pitch = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    roll = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    return np.rad2deg(yaw), np.rad2deg(pitch), np.rad2deg(roll)


def euler_to_rotation_torch(yaw, pitch, roll):
    """Torch version of :func:`euler_to_rotation` (degrees in, (..., 3, 3) out, differentiable).

    Args:
        yaw, pitch, roll: tensors of one shape (...,), any float dtype and device.
    """
    import torch

    y, p, r = torch.deg2rad(yaw), torch.deg2rad(pitch), torch.deg2rad(roll)
    cy, sy, cp, sp, cr, sr = y.cos(), y.sin(), p.cos(), p.sin(), r.cos(), r.sin()
    o, z = torch.ones_like(y), torch.zeros_like(y)
    shape = y.shape + (3, 3)
    rx = torch.stack([o, z, z, z, cp, -sp, z, sp, cp], -1).reshape(shape)
    ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(shape)
    rz = torch.stack([cr, -sr, z, sr, cr, z, z, z, o], -1).reshape(shape)
    return rz @ ry @ rx


# --------------------------------------------------------------------------- projection
def project_perspective(vertices, rotation, translation, focal, cx, cy) -> np.ndarray:
    """Pinhole projection of model-space points to screen vertices.

    Args:
        vertices: (..., V, 3) model space (mm).
        rotation: (..., 3, 3); translation: (..., 3) mm (the face sits at negative z).
        focal: focal length in pixels, scalar or (...,); cx, cy: principal point in pixels.

    Returns:
        (..., V, 3) float32 ``[x_px, y_px, depth]`` with depth = -Z_camera (> 0 in front).
    """
    v = np.asarray(vertices, dtype=np.float64)
    R = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64)
    X = v @ np.swapaxes(R, -1, -2) + t[..., None, :]
    depth = -X[..., 2]
    f = np.asarray(focal, dtype=np.float64)[..., None]
    cx = np.asarray(cx, dtype=np.float64)[..., None]
    cy = np.asarray(cy, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = cx + f * X[..., 0] / depth
        y = cy - f * X[..., 1] / depth
    return np.stack([x, y, depth], -1).astype(np.float32)


def project_orthographic(vertices, rotation, translation, scale, cx, cy) -> np.ndarray:
    """Scaled orthographic projection of model-space points to screen vertices.

    Args:
        vertices: (..., V, 3) model space (mm).
        rotation: (..., 3, 3); translation: (..., 2) image shift (tx, ty) in pixels, ty up.
        scale: pixels per mm, scalar or (...,); cx, cy: image centre in pixels.

    Returns:
        (..., V, 3) float32 ``[x_px, y_px, depth]`` with depth = -scale * Z (pixels).
    """
    v = np.asarray(vertices, dtype=np.float64)
    R = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)[..., None]
    X = v @ np.swapaxes(R, -1, -2)
    x = np.asarray(cx, dtype=np.float64)[..., None] + s * X[..., 0] + t[..., None, 0]
    y = np.asarray(cy, dtype=np.float64)[..., None] - s * X[..., 1] - t[..., None, 1]
    return np.stack([x, y, -s * X[..., 2]], -1).astype(np.float32)


@njit(cache=True, nogil=True, error_model="numpy")
def _project_kernel(v, R, t, f, cx, cy, persp, out):  # pragma: no cover - compiled
    """Fast path of Camera.project for one (V, 3) float32 mesh: one pass, no temporaries.

    Flat arrays, unsigned indices and one loop per camera kind: numba then drops the
    negative-index and per-vertex branch tests (2.5x faster than the (V, 3) loop)."""
    r00, r01, r02 = R[0, 0], R[0, 1], R[0, 2]
    r10, r11, r12 = R[1, 0], R[1, 1], R[1, 2]
    r20, r21, r22 = R[2, 0], R[2, 1], R[2, 2]
    t0, t1, t2 = t[0], t[1], t[2]
    vf = v.ravel()
    of = out.ravel()
    if persp:
        for k in range(v.shape[0]):
            u = np.uint64(3 * k)
            x = np.float64(vf[u])
            y = np.float64(vf[u + 1])
            z = np.float64(vf[u + 2])
            X = r00 * x + r01 * y + r02 * z
            Y = r10 * x + r11 * y + r12 * z
            Z = r20 * x + r21 * y + r22 * z
            d = -(Z + t2)
            of[u] = cx + f * (X + t0) / d
            of[u + 1] = cy - f * (Y + t1) / d
            of[u + 2] = d
    else:  # f is the scale; t = (tx, ty, 0) is an image shift
        for k in range(v.shape[0]):
            u = np.uint64(3 * k)
            x = np.float64(vf[u])
            y = np.float64(vf[u + 1])
            z = np.float64(vf[u + 2])
            X = r00 * x + r01 * y + r02 * z
            Y = r10 * x + r11 * y + r12 * z
            Z = r20 * x + r21 * y + r22 * z
            of[u] = cx + f * X + t0
            of[u + 1] = cy - f * Y - t1
            of[u + 2] = -f * Z


def _as_tensor_like(x, ref):
    import torch

    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def project_perspective_torch(vertices, rotation, translation, focal, cx, cy):
    """Torch version of :func:`project_perspective` (same shapes; dtype follows ``vertices``).

    Differentiable in vertices, rotation, translation, focal and principal point.
    """
    t = _as_tensor_like(translation, vertices)
    X = vertices @ rotation.transpose(-1, -2) + t[..., None, :]
    depth = -X[..., 2]
    f = _as_tensor_like(focal, vertices)[..., None]
    cx = _as_tensor_like(cx, vertices)[..., None]
    cy = _as_tensor_like(cy, vertices)[..., None]
    import torch

    return torch.stack([cx + f * X[..., 0] / depth, cy - f * X[..., 1] / depth, depth], -1)


def project_orthographic_torch(vertices, rotation, translation, scale, cx, cy):
    """Torch version of :func:`project_orthographic` (same shapes; dtype follows ``vertices``)."""
    import torch

    t = _as_tensor_like(translation, vertices)
    s = _as_tensor_like(scale, vertices)[..., None]
    X = vertices @ rotation.transpose(-1, -2)
    x = _as_tensor_like(cx, vertices)[..., None] + s * X[..., 0] + t[..., None, 0]
    y = _as_tensor_like(cy, vertices)[..., None] - s * X[..., 1] - t[..., None, 1]
    return torch.stack([x, y, -s * X[..., 2]], -1)


# --------------------------------------------------------------------------- camera record
def _pose_rotation(yaw, pitch, roll, rotation) -> np.ndarray:
    """An explicit ``rotation`` if given, else the one of (yaw, pitch, roll) degrees."""
    return euler_to_rotation(yaw, pitch, roll) if rotation is None else np.asarray(rotation)


@dataclass(frozen=True, eq=False)
class Camera:
    """One view: intrinsics plus pose. Build with :meth:`perspective`, :meth:`orthographic`
    or :func:`framing_camera`.

    Attributes:
        kind: "perspective" (``focal`` in pixels, ``translation`` (3,) mm) or
            "orthographic" (``scale`` pixels per mm, ``translation`` (2,) pixels, ty up).
        width, height: image size in pixels.
        cx, cy: principal point (perspective) or image centre (orthographic), pixels.
        rotation: (3, 3) model -> camera rotation.
    """

    kind: CameraKind
    width: int
    height: int
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    focal: float = 0.0
    scale: float = 0.0
    cx: float = 0.0
    cy: float = 0.0

    @classmethod
    def perspective(cls, width: int, height: int, focal: float, *, yaw=0.0, pitch=0.0,
                    roll=0.0, rotation=None, translation=(0.0, 0.0, -500.0), cx=None,
                    cy=None) -> Camera:
        """Pinhole camera; pose from (yaw, pitch, roll) degrees or an explicit ``rotation``."""
        R = _pose_rotation(yaw, pitch, roll, rotation)
        return cls("perspective", int(width), int(height), R.astype(np.float64),
                   np.asarray(translation, dtype=np.float64).reshape(3), focal=float(focal),
                   cx=width / 2.0 if cx is None else float(cx),
                   cy=height / 2.0 if cy is None else float(cy))

    @classmethod
    def orthographic(cls, width: int, height: int, scale: float, *, yaw=0.0, pitch=0.0,
                     roll=0.0, rotation=None, translation=(0.0, 0.0), cx=None,
                     cy=None) -> Camera:
        """Scaled orthographic camera; ``scale`` in pixels per mm, ``translation`` (tx, ty)."""
        R = _pose_rotation(yaw, pitch, roll, rotation)
        return cls("orthographic", int(width), int(height), R.astype(np.float64),
                   np.asarray(translation, dtype=np.float64).reshape(2), scale=float(scale),
                   cx=width / 2.0 if cx is None else float(cx),
                   cy=height / 2.0 if cy is None else float(cy))

    @property
    def is_perspective(self) -> bool:
        return self.kind == "perspective"

    def with_pose(self, *, yaw=0.0, pitch=0.0, roll=0.0, rotation=None) -> Camera:
        """The same camera with a new rotation."""
        R = _pose_rotation(yaw, pitch, roll, rotation)
        return replace(self, rotation=R.astype(np.float64))

    def project(self, vertices) -> np.ndarray:
        """Model-space (..., V, 3) -> screen vertices (..., V, 3) float32 [x_px, y_px, depth]."""
        v = np.asarray(vertices)
        if v.ndim == 2 and v.shape[1] == 3 and v.dtype == np.float32:
            out = np.empty(v.shape, np.float32)
            if self.is_perspective:
                _project_kernel(v, self.rotation, self.translation, self.focal, self.cx,
                                self.cy, True, out)
            else:
                t = np.array([self.translation[0], self.translation[1], 0.0])
                _project_kernel(v, self.rotation, t, self.scale, self.cx, self.cy, False, out)
            return out
        if self.is_perspective:
            return project_perspective(vertices, self.rotation, self.translation, self.focal,
                                       self.cx, self.cy)
        return project_orthographic(vertices, self.rotation, self.translation, self.scale,
                                    self.cx, self.cy)

    def project_torch(self, vertices):
        """Torch version of :meth:`project` (differentiable in ``vertices``)."""
        import torch

        R = torch.as_tensor(self.rotation, dtype=vertices.dtype, device=vertices.device)
        if self.is_perspective:
            return project_perspective_torch(vertices, R, self.translation, self.focal,
                                             self.cx, self.cy)
        return project_orthographic_torch(vertices, R, self.translation, self.scale,
                                          self.cx, self.cy)

    def to_camera_space(self, points) -> np.ndarray:
        """Rotate (and, for perspective, translate) model-space points: (..., 3) -> (..., 3)."""
        X = np.asarray(points, dtype=np.float64) @ self.rotation.T
        return X + self.translation if self.is_perspective else X


def framing_camera(vertices, width: int, height: int, *, yaw=0.0, pitch=0.0, roll=0.0,
                   kind: CameraKind = "orthographic", fill: float = 0.9,
                   fov_deg: float = 12.0) -> Camera:
    """A camera that frames ``vertices`` (V, 3) after rotation so that the larger side of its
    bounding box covers ``fill`` of the image and its box centre lands on the image centre.

    Perspective cameras use a field of view of ``fov_deg`` (vertical) and a distance chosen so
    the framing matches the orthographic one at the box centre's depth.
    """
    R = euler_to_rotation(yaw, pitch, roll)
    X = np.asarray(vertices, dtype=np.float64) @ R.T
    lo, hi = X.min(0), X.max(0)
    centre = (lo + hi) / 2.0
    extent = max(hi[0] - lo[0], hi[1] - lo[1], 1e-9)
    scale = fill * min(width, height) / extent
    if kind == "orthographic":
        return Camera.orthographic(width, height, scale, rotation=R,
                                   translation=(-scale * centre[0], -scale * centre[1]))
    focal = (height / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    # Put the box front at distance d so that focal / d == scale; the box centre is on axis.
    d = focal / scale
    t = np.array([-centre[0], -centre[1], -d - hi[2]])
    return Camera.perspective(width, height, focal, rotation=R, translation=t)
