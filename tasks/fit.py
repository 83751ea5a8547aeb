"""Fit: batched 3DMM fitting of pose, camera, identity and expression (PyTorch, CPU).

Stage 1 (:func:`fit_landmarks`) fits 68 landmarks:

    E = sum_k w_k * huber(|P(v_k) - l_k|; delta) / sigma^2 + |alpha / id_std|^2 + |beta / exp_std|^2

with ``P`` a scaled orthographic or perspective camera (``renderers.cameras`` conventions),
``v_k`` the landmark vertices, and **sliding jawline correspondences**: every few solver rounds
each jaw landmark (0-7, 9-16) is re-attached to the candidate vertex of its side's contour set
(``model.contour_right`` / ``contour_left``) whose projection lies closest to it in 2D, so on
a turned head the far jaw landmarks follow the silhouette. With ``FitConfig.landmarks =
"dense"`` the inner 51 landmarks give way to mediapipe's 468 points, each a barycentric row
of the basis through ``meshops.correspondence`` (far-side points dropped per round by
normal . view direction); with ``focal = "estimate"`` the perspective camera's focal is
``fs`` x the ``fov_deg`` focal, fs fitted per image under ``lambda_f log^2(fs) / 2`` (the
focal scale of ``tasks/nonrigid``). Initialisation is closed-form: an
affine camera from the mean shape's landmarks (least squares), orthonormalised. The solver is
a batched Levenberg-Marquardt on the residual vector with the exact Jacobian (Huber as an
IRLS weight): every image has its own damping, step acceptance, stopping and iteration
count, and leaves the batch when done, so an image's result does not depend on its
batch-mates (a garbage image cannot shift the others).

Stage 2 (:func:`refine_photometric`) adds a photometric term over the face mask through the
differentiable renderer (``renderers.diff``), with SH lighting and the model's albedo or a UV
texture prior; solved per image by Levenberg-Marquardt (``tasks/photometric.py``) or Adam.

Shapes: N images, V vertices, K identity, E expression modes, S image size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from facecorpus.configs.fit import FitConfig
from facecorpus.meshops.model import MorphableModel
from facecorpus.renderers.cameras import Camera, euler_to_rotation, rotation_to_euler

CameraKind = Literal["orthographic", "perspective"]
JAW_RIGHT = np.arange(0, 8)
JAW_LEFT = np.arange(9, 17)
log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Batched fit, one row per image. Angles in degrees; ``translation`` (N, 3) mm
    (perspective) or (N, 2) px (orthographic, ty up); ``scale`` (N,) px/mm (orthographic) or
    ``focal`` (N,) px. ``alpha`` (N, K), ``beta`` (N, E) (shorter than the model's bases if
    fewer modes were fit); ``sh`` (N, 27) after stage 2 else None.

    Metrics per image: ``landmark_rmse`` (px), ``landmark_nme`` (rmse / inter-ocular
    distance), ``photometric_error`` (mean L1 over the mask, NaN before stage 2),
    ``iterations`` (N,) this image's own solver iterations (stage 1: Levenberg-Marquardt
    iterations over all rounds, accepted or not; stage 2 adds its Adam steps).

    ``converged`` (N,) bool is True exactly when all of these hold for the image:

    1. its landmarks passed :func:`validate_landmarks`;
    2. its last Levenberg-Marquardt round stopped on its own criterion - an accepted step
       lowered the energy by no more than ``FitConfig.tol`` x (1 + energy), or no step
       could lower it - before ``iters_per_round`` iterations;
    3. the sliding-jaw correspondences settled: unchanged by one more update, or the energy
       changed by < ``settle_rel`` x (1 + energy) between the last two rounds;
    4. every parameter and the landmark error are finite;
    5. ``landmark_nme < max_nme``;

    and, after :func:`refine_photometric`, its stage-2 parameters are finite and its
    recomputed ``landmark_nme`` is still below ``FitConfig.max_nme``.
    ``failure`` (N,) object: None, or why the image must not be used (the first check that
    failed, e.g. ``"non-finite parameters after stage 2"``); see :func:`fit_failures`.
    A False ``converged`` with ``failure`` None means only the solver budget ran out (the
    fit may still be usable)."""

    camera: CameraKind
    image_size: int
    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    focal: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    landmark_rmse: np.ndarray
    landmark_nme: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    photometric_error: np.ndarray = field(default=None)  # type: ignore[assignment]
    sh: np.ndarray | None = None
    landmark_vertices: np.ndarray | None = None  # (N, 68) vertex used for every landmark
    failure: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.photometric_error is None:
            self.photometric_error = np.full(len(self.yaw), np.nan, np.float32)
        if self.failure is None:
            self.failure = np.full(len(self.yaw), None, object)

    def __len__(self) -> int:
        return len(self.yaw)

    def rotation(self, i: int) -> np.ndarray:
        return euler_to_rotation(self.yaw[i], self.pitch[i], self.roll[i])

    def camera_for(self, i: int) -> Camera:
        S = self.image_size
        if self.camera == "perspective":
            return Camera.perspective(S, S, float(self.focal[i]), rotation=self.rotation(i),
                                      translation=self.translation[i])
        return Camera.orthographic(S, S, float(self.scale[i]), rotation=self.rotation(i),
                                   translation=self.translation[i])

    def vertices(self, model: MorphableModel, i: int) -> np.ndarray:
        """Fitted shape (V, 3) mm of image ``i``."""
        return model.shape(self.alpha[i], self.beta[i])

    def screen_vertices(self, model: MorphableModel, i: int) -> np.ndarray:
        """(V, 3) [x_px, y_px, depth] of image ``i``."""
        return self.camera_for(i).project(self.vertices(model, i))

    def select(self, idx) -> FitResult:
        kw = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            kw[f] = v[idx] if isinstance(v, np.ndarray) else v
        return replace(self, **kw)


# ------------------------------------------------------------------ torch helpers
def _torch():
    import torch

    return torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op threads. The landmark fit is thousands of tiny ops:
    one thread is ~40x faster than two on a shared 2-core machine (measured)."""
    torch = _torch()
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rot_torch(angles):
    """(N, 3) radians (yaw, pitch, roll) -> (N, 3, 3), R = Rz(roll) Ry(yaw) Rx(pitch)."""
    from facecorpus.renderers.cameras import euler_to_rotation_torch

    deg = angles * (180.0 / math.pi)
    return euler_to_rotation_torch(deg[:, 0], deg[:, 1], deg[:, 2])


def _project(X, angles, trans, scale_or_focal, kind: str, S: int):
    """Model points (N, P, 3) -> image xy (N, P, 2) and depth (N, P)."""
    from facecorpus.renderers.cameras import project_orthographic_torch, project_perspective_torch

    R = _rot_torch(angles)
    c = S / 2.0
    if kind == "perspective":
        sv = project_perspective_torch(X, R, trans, scale_or_focal, c, c)
    else:
        sv = project_orthographic_torch(X, R, trans, scale_or_focal, c, c)
    return sv[..., :2], sv[..., 2]


def inter_ocular(lm: np.ndarray) -> np.ndarray:
    """Outer-eye-corner distance (N,) of (N, 68, 2) landmarks (the 300-W normaliser)."""
    return np.linalg.norm(lm[:, 36] - lm[:, 45], axis=-1)


def init_pose(model: MorphableModel, landmarks: np.ndarray, S: int, kind: CameraKind,
              fov_deg: float = 12.0):
    """Closed-form start (affine camera on the mean shape, orthonormalised).

    Args:
        landmarks: (N, 68, 2) pixels.

    Returns:
        angles (N, 3) radians, translation (N, 2|3), scale (N,), focal (N,).
    """
    X = model.vertices[model.landmarks].astype(np.float64)  # (68, 3)
    N = landmarks.shape[0]
    c = S / 2.0
    A = np.c_[X, np.ones(len(X))]
    angles = np.zeros((N, 3))
    scales = np.zeros(N)
    t2 = np.zeros((N, 2))
    for n in range(N):
        # x - c = s r1.X + tx ; -(y - c) = s r2.X + ty   (ty up)
        b = np.c_[landmarks[n, :, 0] - c, -(landmarks[n, :, 1] - c)]
        sol, *_ = np.linalg.lstsq(A, b, rcond=None)  # (4, 2)
        r1, r2 = sol[:3, 0], sol[:3, 1]
        s = 0.5 * (np.linalg.norm(r1) + np.linalg.norm(r2))
        M = np.stack([r1, r2, np.cross(r1, r2)])
        U, _, Vt = np.linalg.svd(M)
        R = U @ np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))]) @ Vt
        yaw, pitch, roll = rotation_to_euler(R)
        angles[n] = np.deg2rad([yaw, pitch, roll])
        scales[n] = s
        t2[n] = sol[3]
    focal = np.full(N, (S / 2.0) / math.tan(math.radians(fov_deg) / 2.0))
    if kind == "perspective":
        # same scale at the face centre: distance = focal / scale
        d = focal / scales
        trans = np.c_[t2 / scales[:, None], -d]
        return angles, trans, scales, focal
    return angles, t2, scales, focal


class _ShapeBasis:
    """Torch shape model restricted to a vertex subset (the fit never needs all vertices),
    then ``bary_rows`` surface points: rows ``len(verts) + d`` are the barycentric
    combinations ``sum_k bary[d, k] * vertex(tri_verts[d, k])`` (dense landmarks)."""

    def __init__(self, model: MorphableModel, verts: np.ndarray, n_id: int, n_exp: int,
                 tri_verts: np.ndarray | None = None, bary: np.ndarray | None = None):
        torch = _torch()
        self.verts = np.asarray(verts)

        def rows(a):  # (..., V, 3) -> (..., len(verts) + D, 3)
            out = a[..., self.verts, :]
            if tri_verts is None:
                return out
            b = np.einsum("dk,...dkc->...dc", bary, a[..., tri_verts, :])
            return np.concatenate([out, b], -2)

        self.mean = torch.as_tensor(rows(model.vertices), dtype=torch.float64)
        self.id = torch.as_tensor(rows(model.id_basis[:n_id]), dtype=torch.float64)
        self.exp = torch.as_tensor(rows(model.exp_basis[:n_exp]), dtype=torch.float64)

    def __call__(self, alpha, beta):
        torch = _torch()
        return (self.mean + torch.einsum("nk,kpc->npc", alpha, self.id)
                + torch.einsum("ne,epc->npc", beta, self.exp))


def _slide_jaw(proj_cand: np.ndarray, cand_r: np.ndarray, cand_l: np.ndarray,
               lm2d: np.ndarray, lm_vertices: np.ndarray, fixed: np.ndarray,
               yaw_deg: np.ndarray, min_yaw: float) -> np.ndarray:
    """Re-attach the jaw landmarks of the side turned away from the camera to the closest
    projected contour candidate (their 2D landmark lies on the silhouette, not on a fixed
    vertex); the side facing the camera keeps the model's own landmark vertices.

    Args:
        proj_cand: (N, Nr + Nl, 2) projected candidates, right then left.
        lm2d: (N, 68, 2) targets. lm_vertices: (N, 68) current vertex ids.
        fixed: (68,) the model's landmark vertices. yaw_deg: (N,) current yaw.
        min_yaw: a side slides only when the head is turned away from it by more than this.
    """
    out = lm_vertices.copy()
    nr = len(cand_r)
    # negative yaw turns the nose to image left and hides the subject's right (x < 0) side
    for side, cand, off, away in ((JAW_RIGHT, cand_r, 0, yaw_deg < -min_yaw),
                                  (JAW_LEFT, cand_l, nr, yaw_deg > min_yaw)):
        out[:, side] = fixed[side]
        if len(cand) == 0 or not away.any():
            continue
        P = proj_cand[away, off:off + len(cand)]  # (n, C, 2)
        d = np.linalg.norm(lm2d[away][:, side, None, :] - P[:, None, :, :], axis=-1)
        out[np.flatnonzero(away)[:, None], side[None, :]] = cand[d.argmin(-1)]
    return out


def fit_landmarks(model: MorphableModel, landmarks: np.ndarray, image_size: int,
                  opts: FitConfig | None = None, weights: np.ndarray | None = None,
                  dense: np.ndarray | None = None,
                  focal_prior: np.ndarray | None = None) -> FitResult:
    """Stage 1 (see :func:`_fit_landmarks`), run with one torch thread."""
    with torch_threads(1):
        return _fit_landmarks(model, landmarks, image_size, opts or FitConfig(), weights,
                              dense, focal_prior)


_CORRESPONDENCES: dict = {}


def dense_correspondence(model: MorphableModel):
    """The model's mediapipe-468 correspondence (``meshops.correspondence``), memoised per
    model content, with the unit normals (D, 3) of its points on the mean shape."""
    from facecorpus.meshops.correspondence import correspondence_for
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.tasks.landmarks import MP478_TO_68

    h = model.content_hash()
    if h not in _CORRESPONDENCES:
        corr = correspondence_for(model, MP478_TO_68)
        vn = vertex_normals(model.vertices, model.triangles)
        n = np.einsum("dk,dkc->dc", corr.bary, vn[model.triangles[corr.triangle]])
        n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
        _CORRESPONDENCES[h] = (corr, n)
    return _CORRESPONDENCES[h]


def validate_dense(dense, image_size: int) -> str | None:
    """Why one image's dense points (478|468, 2) cannot be fit, or None."""
    try:
        g = np.asarray(dense, np.float64)
    except (TypeError, ValueError) as e:
        return f"dense landmarks are not numbers ({e})"
    if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] < 468:
        return f"dense landmarks have shape {g.shape}, need (468|478, 2)"
    if not np.isfinite(g[:468]).all():
        return (f"dense landmarks are not finite ({int((~np.isfinite(g[:468])).sum())} "
                "NaN/inf values)")
    ext = g[:468].max(0) - g[:468].min(0)
    if not (ext >= 2.0).all():
        return f"degenerate dense landmarks: their box is {ext[0]:.3g} x {ext[1]:.3g} px"
    return None


def validate_landmarks(landmarks, image_size: int, min_extent_px: float = 2.0) -> str | None:
    """Why one image's landmarks cannot be fit, or None when they can.

    Args:
        landmarks: (68, 2) pixel coordinates. image_size: the square image side S.

    Returns:
        A rejection reason (wrong shape, non-finite values, a landmark box narrower than
        ``min_extent_px`` on an axis: all points equal or collinear give no scale and no
        pose) or None. The flow raises ``SampleRejected(uri, "fit", reason)`` on a reason;
        :func:`fit_landmarks` also checks every image itself and marks a bad one failed
        without touching the others.
    """
    try:
        g = np.asarray(landmarks, np.float64)
    except (TypeError, ValueError) as e:
        return f"landmarks are not numbers ({e})"
    if g.size != 136:
        return f"landmarks have {g.size} values (shape {g.shape}), need 68 x 2"
    g = g.reshape(68, 2)
    if not np.isfinite(g).all():
        return f"landmarks are not finite ({int((~np.isfinite(g)).sum())} NaN/inf values)"
    ext = g.max(0) - g.min(0)
    if not (ext >= min_extent_px).all():
        return (f"degenerate landmarks: their box is {ext[0]:.3g} x {ext[1]:.3g} px "
                f"(< {min_extent_px:g} px on an axis)")
    if inter_ocular(g[None])[0] < 1e-3 * image_size:
        return "degenerate landmarks: the outer eye corners coincide"
    return None


def _rot_and_grad(angles):
    """(N, 3) radians (yaw, pitch, roll) -> R (N, 3, 3) = Rz(roll) Ry(yaw) Rx(pitch) and
    dR (N, 3, 3, 3), dR[:, j] = dR / d angles[:, j] (the LM Jacobian needs it exactly)."""
    torch = _torch()
    y, p, r = angles[:, 0], angles[:, 1], angles[:, 2]
    cy, sy, cp, sp, cr, sr = y.cos(), y.sin(), p.cos(), p.sin(), r.cos(), r.sin()
    o, z = torch.ones_like(y), torch.zeros_like(y)

    def m(*e):
        return torch.stack(e, -1).reshape(-1, 3, 3)

    rx, drx = m(o, z, z, z, cp, -sp, z, sp, cp), m(z, z, z, z, -sp, -cp, z, cp, -sp)
    ry, dry = m(cy, z, sy, z, o, z, -sy, z, cy), m(-sy, z, cy, z, z, z, -cy, z, -sy)
    rz, drz = m(cr, -sr, z, sr, cr, z, z, z, o), m(-sr, -cr, z, cr, -sr, z, z, z, z)
    R = rz @ ry @ rx
    dR = torch.stack([rz @ dry @ rx, rz @ ry @ drx, drz @ ry @ rx], 1)
    return R, dR


class _LandmarkProblem:
    """Stage-1 residuals and their exact Jacobian for a batch of images.

    Parameter vector per image (P,): angles (3, radians), translation (2 px orthographic |
    3 mm perspective), log scale (orthographic) or, perspective with ``estimate_focal``, the
    log focal scale log(fs) and a frozen per-image log(f_ref / ``focal``) (focal = fs *
    f_ref: f_ref is the image's EXIF focal or ``focal``; prior ``lambda_f`` log^2(fs) / 2, fs
    clamped to ``fs_bounds``; otherwise the focal is fixed), whitened identity a (K,) and
    expression b (E,) (alpha = a * id_std). Every operation is row-wise in the image axis,
    so an image's numbers never depend on its batch-mates.
    """

    def __init__(self, basis: _ShapeBasis, id_std, exp_std, kind: str, S: int, sigma: float,
                 delta: float, focal, estimate_focal: bool = False, lambda_f: float = 0.0,
                 fs_bounds=(0.1, 4.0)):
        torch = _torch()
        self.mean, self.kind, self.S, self.sigma, self.delta = basis.mean, kind, S, sigma, delta
        self.est_f = kind == "perspective" and estimate_focal
        self.lambda_f = float(lambda_f)
        self.log_fs_bounds = (math.log(fs_bounds[0]), math.log(fs_bounds[1]))
        self.n_pose = 8 if self.est_f else 6
        self.frozen = [7] if self.est_f else []  # never solved for: the per-image f_ref
        self.P = self.n_pose + len(id_std) + len(exp_std)
        # (Pv, 3, K + E): per-mode displacement of every fit vertex in mm (std folded in)
        self.modes = torch.cat([basis.id * id_std[:, None, None],
                                basis.exp * exp_std[:, None, None]], 0).permute(1, 2, 0)
        self.focal = float(focal)  # perspective: one fixed focal (px) for all

    def shape(self, p, lm_pos):
        """(n, 68, 3) landmark-vertex positions (mm) and (n, 68, 3, K + E) mode columns."""
        B = self.modes[lm_pos]  # (n, 68, 3, M)
        X = self.mean[lm_pos] + (B @ p[:, None, self.n_pose:, None])[..., 0]
        return X, B

    def project(self, p, X, jac: bool):
        """(n, 68, 2) pixels and, with ``jac``, d pixels / d pose (n, 68, 2, 6) and the
        (n, 68, 2, 3) derivative w.r.t. the model-space point (chain rule for the modes)."""
        torch = _torch()
        c = self.S / 2.0
        R, dR = _rot_and_grad(p[:, :3])
        Y = X @ R.transpose(-1, -2)  # (n, 68, 3)
        if self.kind == "perspective":
            Z = Y + p[:, None, 3:6]
            f = (self.focal * (p[:, 6] + p[:, 7]).exp()[:, None] if self.est_f
                 else self.focal)
            depth = -Z[..., 2]
            uv = torch.stack([c + f * Z[..., 0] / depth, c - f * Z[..., 1] / depth], -1)
            if not jac:
                return uv, None, None
            # d(u, v) / dZ: (n, 68, 2, 3)
            fd = f / depth
            dZ = torch.zeros(*Z.shape[:2], 2, 3, dtype=Z.dtype)
            dZ[..., 0, 0] = fd
            dZ[..., 0, 2] = fd * Z[..., 0] / depth
            dZ[..., 1, 1] = -fd
            dZ[..., 1, 2] = -fd * Z[..., 1] / depth
            dY_dang = torch.einsum("njab,npb->npaj", dR, X)  # (n, 68, 3, 3)
            d_pose = torch.cat([dZ @ dY_dang, dZ], -1)  # angles, translation
            if self.est_f:  # d (u, v) / d log fs = (u - c, v - c); the same for log f_ref
                d_pose = torch.cat([d_pose, (uv - c)[..., None], (uv - c)[..., None]], -1)
            return uv, d_pose, dZ @ R[:, None]
        s = p[:, 5].exp()[:, None]
        uv = torch.stack([c + s * Y[..., 0] + p[:, None, 3], c - s * Y[..., 1] - p[:, None, 4]],
                         -1)
        if not jac:
            return uv, None, None
        sgn = torch.tensor([1.0, -1.0], dtype=Y.dtype)
        dY_dang = torch.einsum("njab,npb->npaj", dR, X)[..., :2, :]  # (n, 68, 2, 3)
        n, L = Y.shape[:2]
        d_t = torch.zeros(n, L, 2, 2, dtype=Y.dtype)
        d_t[..., 0, 0], d_t[..., 1, 1] = 1.0, -1.0
        d_ls = (sgn * s[..., None] * Y[..., :2])[..., None]
        d_pose = torch.cat([sgn[:, None] * s[..., None, None] * dY_dang, d_t, d_ls], -1)
        return uv, d_pose, sgn[:, None] * s[..., None, None] * R[:, None, :2, :]

    def energy(self, p, lm_pos, target, w):
        """(n,) the stage-1 energy: sum_k w_k huber(|r_k| / sigma) + |a|^2 / 2 + |b|^2 / 2."""
        X, _ = self.shape(p, lm_pos)
        uv, _, _ = self.project(p, X, False)
        r = (uv - target).norm(dim=-1) / self.sigma
        d = self.delta
        hub = (r < d) * 0.5 * r**2 + (r >= d) * d * (r - 0.5 * d)
        e = (w * hub).sum(1) + 0.5 * (p[:, self.n_pose:] ** 2).sum(1)
        if self.est_f:
            e = e + 0.5 * self.lambda_f * p[:, 6] ** 2
        return e, uv

    def clamp(self, p):
        """Keep the focal scale inside its bounds (a projected LM step)."""
        if not self.est_f:
            return p
        p = p.clone()
        p[:, 6] = p[:, 6].clamp(*self.log_fs_bounds)
        return p

    def normal_equations(self, p, lm_pos, target, w):
        """Gauss-Newton system of the IRLS-weighted residuals: (n, P, P) J^T J and (n, P)
        J^T r (Huber as the weight min(1, delta / |r_k|) on landmark k)."""
        X, B = self.shape(p, lm_pos)
        uv, d_pose, d_X = self.project(p, X, True)
        diff = (uv - target) / self.sigma  # (n, 68, 2)
        r = diff.norm(dim=-1)
        irls = (self.delta / r.clamp(min=1e-12)).clamp(max=1.0)
        sw = (w * irls).sqrt()[..., None, None] / self.sigma  # (n, 68, 1, 1)
        J = _torch().cat([d_pose, d_X @ B], -1) * sw  # (n, 68, 2, P)
        J = J.reshape(len(p), -1, self.P)
        res = (diff * sw[..., 0] * self.sigma).reshape(len(p), -1)
        A = J.transpose(1, 2) @ J
        g = (J.transpose(1, 2) @ res[..., None])[..., 0]
        idx = _torch().arange(self.n_pose, self.P)
        A[:, idx, idx] += 1.0  # the prior's residuals a, b have the identity Jacobian
        g[:, self.n_pose:] += p[:, self.n_pose:]
        if self.est_f:
            A[:, 6, 6] += self.lambda_f
            g[:, 6] += self.lambda_f * p[:, 6]
        return A, g


def _levenberg_marquardt(prob: _LandmarkProblem, p, lm_pos, target, w, free, max_iter: int,
                         tol: float):
    """Per-image Levenberg-Marquardt on the stage-1 energy: every image has its own damping,
    step acceptance and stop, and a finished image leaves the batch.

    Args:
        p: (n, P) start (updated copy returned). free: (P,) bool, the parameters solved for.

    Returns:
        p (n, P), energies (n,), iterations (n,) int, stopped (n,) bool: the relative energy
        decrease of an accepted step fell below ``tol`` (or no step could lower it) within
        ``max_iter`` iterations.
    """
    torch = _torch()
    n = len(p)
    p = p.clone()
    lam = torch.full((n,), 1e-3, dtype=p.dtype)
    e, _ = prob.energy(p, lm_pos, target, w)
    its = torch.zeros(n, dtype=torch.int64)
    stopped = torch.zeros(n, dtype=torch.bool)
    active = torch.isfinite(e)
    fixed = torch.nonzero(~free).flatten()
    eye = torch.eye(prob.P, dtype=p.dtype)
    for _ in range(max_iter):
        ia = torch.nonzero(active).flatten()
        if len(ia) == 0:
            break
        pa, lp, tg, wa = p[ia], lm_pos[ia], target[ia], w[ia]
        A, g = prob.normal_equations(pa, lp, tg, wa)
        A[:, fixed, :] = 0.0
        A[:, :, fixed] = 0.0
        A[:, fixed, fixed] = 1.0
        g[:, fixed] = 0.0
        # Marquardt scaling (by the diagonal) plus a floor: the pose block has no prior
        diag = torch.diagonal(A, dim1=1, dim2=2)
        M = A + lam[ia, None, None] * (diag[:, :, None] * eye + 1e-9 * eye)
        L, info = torch.linalg.cholesky_ex(M)
        ok = info == 0
        L = torch.where(ok[:, None, None], L, eye)
        step = -torch.cholesky_solve(g[..., None], L)[..., 0]
        p_new = prob.clamp(pa + step)
        e_new, _ = prob.energy(p_new, lp, tg, wa)
        e_old = e[ia]
        better = ok & torch.isfinite(e_new) & (e_new < e_old)
        its[ia] += 1
        p[ia] = torch.where(better[:, None], p_new, pa)
        e[ia] = torch.where(better, e_new, e_old)
        lam[ia] = torch.where(better, (lam[ia] * 0.3).clamp(min=1e-10), lam[ia] * 10.0)
        done = (better & ((e_old - e_new) <= tol * (1.0 + e_old.abs()))) | (lam[ia] > 1e10)
        stopped[ia] |= done
        active[ia] = ~done
    return p, e, its, stopped


def _fit_landmarks(model: MorphableModel, landmarks: np.ndarray, image_size: int,
                   opts: FitConfig, weights: np.ndarray | None = None,
                   dense: np.ndarray | None = None,
                   focal_prior: np.ndarray | None = None) -> FitResult:
    """Stage 1: fit pose, camera, identity and expression to 68 landmarks per image.

    With ``opts.landmarks == "dense"`` and ``dense`` given, an image's inner 51 landmarks
    are replaced by its mediapipe points through :func:`dense_correspondence` (barycentric
    rows of the shape basis); the jaw 0-16 keep sliding, weighted ``dense_jaw_weight``. Each dense point weighs
    ``dense_weight * 51 / D`` (D kept correspondence points), so the dense term weighs
    what the 51 inner landmarks did against the prior, whatever D; a point whose normal .
    direction to the camera (current pose, checked every round) is below
    ``dense_min_facing`` gets weight 0 that round. An image whose ``dense`` row is all
    NaN fits its 68 points; a partly non-finite or degenerate one is failed with a reason.

    Args:
        landmarks: (N, 68, 2) pixel coordinates in a ``image_size`` square image.
        weights: optional (N, 68) per-landmark confidences (0 drops a landmark).
        dense: optional (N, 478|468, 2) mediapipe points in the same pixels.
        focal_prior: optional (N,) focal in these pixels (e.g. from EXIF; NaN: none), the
            centre of the fs prior with ``focal="estimate"`` (else the ``fov_deg`` focal).

    Returns:
        :class:`FitResult`; an image whose landmarks fail :func:`validate_landmarks` keeps
        its closed-form start with ``failure`` set, the others fit as if it were absent.
    """
    torch = _torch()
    lm2d = np.array(landmarks, np.float64).reshape(-1, 68, 2)
    N, S = lm2d.shape[0], int(image_size)
    K = model.n_id if opts.n_id is None else min(opts.n_id, model.n_id)
    E = model.n_exp if opts.n_exp is None else min(opts.n_exp, model.n_exp)
    sigma = opts.sigma_px if opts.sigma_px is not None else 0.01 * S
    failure = np.array([validate_landmarks(lm2d[i], S) for i in range(N)] + [None],
                       object)[:N]
    use_dense = opts.landmarks == "dense" and dense is not None
    has_dense = np.zeros(N, bool)
    if use_dense:
        corr, dnormal = dense_correspondence(model)
        dn = np.asarray(dense, np.float64)
        if dn.ndim != 3 or dn.shape[0] != N:
            raise ValueError(f"dense has shape {dn.shape}, need ({N}, 478|468, 2)")
        has_dense = ~np.isnan(dn).all((1, 2))
        for i in np.flatnonzero(has_dense):
            why = validate_dense(dn[i], S)
            if why is not None and failure[i] is None:
                failure[i] = why
        D = len(corr)
    bad = np.array([f is not None for f in failure], bool)
    has_dense &= ~bad
    if bad.any():
        # a harmless stand-in keeps the arrays finite; the image is never solved
        ok_lm = np.where(bad[:, None, None], 0.0, lm2d)
        X = model.vertices[model.landmarks][:, :2]
        ok_lm[bad] = S / 2.0 + (X - X.mean(0)) * (0.4 * S / np.ptp(X[:, 0]).clip(1e-6)) \
            * np.array([1.0, -1.0])
    else:
        ok_lm = lm2d
    angles0, trans0, scale0, focal0 = init_pose(model, ok_lm, S, opts.camera, opts.fov_deg)

    cand_r = np.asarray(model.contour_right, np.int64)
    cand_l = np.asarray(model.contour_left, np.int64)
    verts = np.unique(np.concatenate([model.landmarks, cand_r, cand_l]))
    pos = np.full(model.n_vertices, -1, np.int64)
    pos[verts] = np.arange(len(verts))
    if use_dense:
        basis = _ShapeBasis(model, verts, K, E, model.triangles[corr.triangle], corr.bary)
        dense_cols = len(verts) + np.arange(D)
    else:
        basis = _ShapeBasis(model, verts, K, E)
        D, dense_cols = 0, np.zeros(0, np.int64)
    id_std = torch.as_tensor(model.id_std[:K], dtype=torch.float64)
    exp_std = torch.as_tensor(model.exp_std[:E], dtype=torch.float64)
    prob = _LandmarkProblem(basis, id_std, exp_std, opts.camera, S, sigma, opts.huber_delta,
                            focal0[0], opts.focal == "estimate", opts.lambda_f,
                            opts.focal_scale_bounds)
    w = np.ones((N, 68)) if weights is None else np.asarray(weights, np.float64).reshape(N, 68)
    w = np.where(np.isfinite(w), w, 0.0) * np.r_[np.full(17, opts.jaw_weight), np.ones(51)]
    w_dense = np.zeros((N, D))
    if use_dense:
        w[has_dense, 17:] = 0.0
        if opts.jaw_weight > 0:
            w[has_dense, :17] *= opts.dense_jaw_weight / opts.jaw_weight
        else:
            w[has_dense, :17] = np.where(w[has_dense, :17] > 0, opts.dense_jaw_weight, 0.0)
        w_dense[has_dense] = opts.dense_weight * 51.0 / D
        ok_dense = np.where(has_dense[:, None, None], dn[:, corr.point_ids], 0.0)
        ok_lm_all = np.concatenate([ok_lm, ok_dense], 1)
    else:
        ok_lm_all = ok_lm
    visible = np.ones((N, D), bool)
    w_t = torch.as_tensor(np.concatenate([w, w_dense], 1))
    target = torch.as_tensor(ok_lm_all)
    sf0 = np.log(scale0) if opts.camera == "orthographic" else None
    if prob.est_f:
        fp = (np.full(N, np.nan) if focal_prior is None
              else np.asarray(focal_prior, np.float64).reshape(N))
        ok_fp = np.isfinite(fp) & (fp > 0)
        log_ref = np.where(ok_fp, np.log(np.where(ok_fp, fp, 1.0) / focal0), 0.0)
        trans0 = trans0.copy()
        trans0[:, 2] *= np.exp(log_ref)  # the same face scale at the reference focal
        sf0 = np.c_[np.zeros(N), log_ref]  # log fs = 0: start at the reference focal
    pose0 = np.c_[angles0, trans0] if sf0 is None else np.c_[angles0, trans0, sf0]
    p = torch.as_tensor(np.c_[pose0, np.zeros((N, K + E))])
    fixed_lm = np.asarray(model.landmarks, np.int64)
    lm_vertices = np.tile(fixed_lm, (N, 1))

    iterations = np.zeros(N, np.int64)
    solved = np.zeros(N, bool)  # the last LM round stopped on its criterion
    settled = np.zeros(N, bool)  # the correspondences (or the energy) stopped changing
    energy = np.full(N, np.inf)
    todo = ~bad
    free_pose = torch.arange(prob.P) < prob.n_pose
    free_all = torch.ones(prob.P, dtype=torch.bool)
    free_pose[prob.frozen] = False
    free_all[prob.frozen] = False
    cand_cols = pos[np.concatenate([cand_r, cand_l])]
    all_cols = torch.as_tensor(np.arange(len(verts) + D))
    # round 0 solves the pose only; rounds 1..rounds everything; the extra pass only looks
    # whether the last round's correspondences still hold
    for r in range(opts.rounds + 2):
        idx = np.flatnonzero(todo)
        if not len(idx):
            break
        it = torch.as_tensor(idx)
        with torch.no_grad():
            X, _ = prob.shape(p[it], all_cols.expand(len(idx), -1))
            uv, _, _ = prob.project(p[it], X, False)
            new_v = _slide_jaw(uv[:, cand_cols].numpy(), cand_r, cand_l, ok_lm[idx],
                               lm_vertices[idx], fixed_lm, np.rad2deg(p[it, 0].numpy()),
                               opts.slide_min_yaw)
            new_vis = visible[idx]
            if D:
                new_vis = _dense_facing(prob, p[it], X[:, len(verts):].numpy(),
                                        dnormal) >= opts.dense_min_facing
        if r >= 2:
            # correspondences unchanged after a solved round: a fixed point, another round
            # would return the same numbers
            same = ((new_v == lm_vertices[idx]).all(1) & (new_vis == visible[idx]).all(1)
                    & solved[idx])
            settled[idx[same]] = True
            todo[idx[same]] = False
            idx, new_v, new_vis = idx[~same], new_v[~same], new_vis[~same]
            if not len(idx) or r == opts.rounds + 1:
                break
            it = torch.as_tensor(idx)
        lm_vertices[idx] = new_v
        if D:
            visible[idx] = new_vis
            w_t[it, 68:] = torch.as_tensor(w_dense[idx] * new_vis)
        lm_pos = torch.as_tensor(np.c_[pos[lm_vertices[idx]],
                                       np.tile(dense_cols, (len(idx), 1))])
        p_i, e_i, n_i, ok_i = _levenberg_marquardt(
            prob, p[it], lm_pos, target[it], w_t[it], free_pose if r == 0 else free_all,
            opts.iters_per_round, opts.tol)
        p[it] = p_i
        iterations[idx] += n_i.numpy()
        if r >= 1:
            e_np = e_i.numpy()
            solved[idx] = ok_i.numpy()
            # a jaw landmark flipping between two near-equal candidates changes nothing
            # that matters: the energy settling counts too
            settled[idx] = solved[idx] & (np.abs(energy[idx] - e_np)
                                          <= opts.settle_rel * (1 + np.abs(e_np)))
            energy[idx] = e_np
        log.debug("fit round %d: %d images, iterations %s", r, len(idx), n_i.tolist())

    with torch.no_grad():
        _, pred = prob.energy(p, torch.as_tensor(np.c_[pos[lm_vertices],
                                                      np.tile(dense_cols, (N, 1))]),
                              target, w_t)
    pred = pred.numpy()[:, :68]
    # dense: the far-side jaw points lie on the silhouette and carry dense_jaw_weight
    # (0 by default), so they are left out of the error that decides a rejection
    keep = np.ones((N, 68), bool)
    yaw_now = np.rad2deg(p[:, 0].numpy())
    keep[np.ix_(has_dense & (yaw_now < -opts.slide_min_yaw), JAW_RIGHT)] = False
    keep[np.ix_(has_dense & (yaw_now > opts.slide_min_yaw), JAW_LEFT)] = False
    rmse = np.sqrt((((pred - lm2d) ** 2).sum(-1) * keep).sum(-1) / keep.sum(-1))
    nme = rmse / np.maximum(inter_ocular(np.nan_to_num(lm2d)), 1e-6)
    pn = p.numpy()
    finite = np.isfinite(pn).all(1) & np.isfinite(rmse)
    converged = ~bad & finite & solved & settled & (nme < opts.max_nme)
    R = euler_to_rotation(*np.rad2deg(pn[:, :3]).T)
    yaw, pitch, roll = rotation_to_euler(R)  # canonical range
    nt = 2 if opts.camera == "orthographic" else 3
    sf = np.exp(pn[:, 5]) if opts.camera == "orthographic" else np.asarray(focal0, np.float64)
    if prob.est_f:
        sf = sf * np.exp(pn[:, 6] + pn[:, 7])
    n0 = prob.n_pose
    out = FitResult(
        camera=opts.camera, image_size=S,
        yaw=yaw.astype(np.float32), pitch=pitch.astype(np.float32), roll=roll.astype(np.float32),
        translation=pn[:, 3:3 + nt].astype(np.float32),
        scale=(sf if opts.camera == "orthographic" else np.zeros(N)).astype(np.float32),
        focal=(sf if opts.camera == "perspective" else np.zeros(N)).astype(np.float32),
        alpha=(pn[:, n0:n0 + K] * model.id_std[:K]).astype(np.float32),
        beta=(pn[:, n0 + K:] * model.exp_std[:E]).astype(np.float32),
        landmark_rmse=rmse.astype(np.float32), landmark_nme=nme.astype(np.float32),
        iterations=iterations, converged=converged,
        landmark_vertices=lm_vertices.astype(np.int32), failure=failure)
    out.failure = fit_failures(out, opts.max_nme)
    return out


def _dense_facing(prob: _LandmarkProblem, p, X: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(n, D) cosine between each dense point's normal (mean-shape normals ``normal``
    (D, 3), rotated by the current pose) and its direction to the camera; ``X`` (n, D, 3)
    the points in model space (mm)."""
    R = euler_to_rotation(*np.rad2deg(p[:, :3].numpy()).T).reshape(-1, 3, 3)
    nc = np.einsum("nij,dj->ndi", R, normal)
    if prob.kind == "perspective":
        Y = np.einsum("nij,ndj->ndi", R, X) + p[:, None, 3:6].numpy()
        view = -Y / np.linalg.norm(Y, axis=-1, keepdims=True).clip(1e-12)
        return (nc * view).sum(-1)
    return nc[..., 2]


def project_landmarks(model: MorphableModel, fit: FitResult) -> np.ndarray:
    """(N, 68, 2) fitted model landmarks (the model's fixed landmark vertices)."""
    out = np.zeros((len(fit), 68, 2), np.float32)
    for i in range(len(fit)):
        sv = fit.camera_for(i).project(model.shape(fit.alpha[i], fit.beta[i])[model.landmarks])
        out[i] = sv[:, :2]
    return out


# ------------------------------------------------------------------ synthetic ground truth
@dataclass
class SyntheticBatch:
    """Faces rendered from the model with known parameters (the fitting/unwrapping oracle).

    ``image`` (N, S, S, 3) float32; ``mask`` (N, S, S) bool; ``landmarks`` (N, 68, 2) exact
    projections of the model landmarks; ``noisy_landmarks`` with Gaussian pixel noise;
    ``truth`` a :class:`FitResult` holding the true parameters; ``uv_texture`` (T, T, 3) and
    ``sh`` (N, 27) used to render.
    """

    image: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray
    noisy_landmarks: np.ndarray
    truth: FitResult
    uv_texture: np.ndarray
    sh: np.ndarray


def smooth_uv_texture(size: int, seed: int = 0) -> np.ndarray:
    """A known, smooth RGB UV texture (size, size, 3) in [0.15, 0.85]: low-frequency waves
    (resampled twice - render, unwrap - it must survive bilinear filtering)."""
    rng = np.random.default_rng(seed)
    c = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(c, 1.0 - c)
    out = np.zeros((size, size, 3))
    for ch in range(3):
        acc = 0.5 * np.ones_like(u)
        for _ in range(4):
            fu, fv = rng.uniform(1, 4, 2)
            ph = rng.uniform(0, 2 * np.pi)
            acc += 0.08 * np.sin(2 * np.pi * (fu * u + fv * v) + ph)
        out[..., ch] = acc
    return np.clip(out, 0.15, 0.85).astype(np.float32)


def _truth_fit(rows: list, camera: str, size: int, sh=None) -> FitResult:
    """The true parameters of synthetic faces as a :class:`FitResult`; ``rows`` holds one
    ``(yaw, pitch, roll, translation, scale, focal, alpha, beta)`` per face."""
    n, zero = len(rows), np.zeros(len(rows), np.float32)
    col = list(zip(*rows, strict=True))
    return FitResult(
        camera=camera, image_size=size, yaw=np.array(col[0], np.float32),
        pitch=np.array(col[1], np.float32), roll=np.array(col[2], np.float32),
        translation=np.stack(col[3]).astype(np.float32), scale=np.array(col[4], np.float32),
        focal=np.array(col[5], np.float32), alpha=np.stack(col[6]), beta=np.stack(col[7]),
        landmark_rmse=zero, landmark_nme=zero, iterations=np.zeros(n, np.int64),
        converged=np.ones(n, bool), sh=sh)


def synthetic_batch(model: MorphableModel, n: int, size: int = 256, *, seed: int = 0,
                    yaw_max: float = 60.0, camera: CameraKind = "orthographic",
                    noise_px: float = 1.0, texture_size: int = 256, sh=None,
                    fill: float = 0.75) -> SyntheticBatch:
    """Render ``n`` faces with random identity (0.7 prior std) and three active expressions
    (weights U[0, 0.6] std), yaw evenly spread over
    [-yaw_max, yaw_max], pitch in [-15, 15], roll in [-10, 10], a known UV texture and SH
    light (default: the renderer's DEFAULT_SH). Landmarks are projections of the model's fixed
    landmark vertices, hidden or not: fit them with ``slide_min_yaw=90`` (no sliding)."""
    from facecorpus.renderers.cameras import framing_camera
    from facecorpus.renderers.render import render
    from facecorpus.renderers.shading import DEFAULT_SH

    rng = np.random.default_rng(seed)
    yaws = np.linspace(-yaw_max, yaw_max, n) if n > 1 else np.zeros(1)
    tex = smooth_uv_texture(texture_size, seed)
    sh_arr = np.tile(np.asarray(DEFAULT_SH if sh is None else sh, np.float32), (n, 1))
    imgs, masks, lms, rows = [], [], [], []
    for i in range(n):
        pitch, roll = rng.uniform(-15, 15), rng.uniform(-10, 10)
        a = (rng.normal(size=model.n_id) * model.id_std * 0.7).astype(np.float32)
        # a few active expressions, as in a real face (not every blendshape half on)
        b = np.zeros(model.n_exp, np.float32)
        if model.n_exp:
            k = rng.choice(model.n_exp, min(3, model.n_exp), replace=False)
            b[k] = rng.uniform(0, 0.6, len(k)) * model.exp_std[k]
        v = model.shape(a, b)
        cam = framing_camera(v, size, size, yaw=yaws[i], pitch=pitch, roll=roll, kind=camera,
                             fill=fill)
        out = render(v, model.triangles, cam, outputs=("image", "mask"), uv=model.uv,
                     uv_triangles=model.uv_triangles, uv_texture=tex, sh=sh_arr[i])
        imgs.append(out.image[0])
        masks.append(out.mask[0])
        lms.append(cam.project(v[model.landmarks])[:, :2])
        y, p, r = rotation_to_euler(cam.rotation)
        rows.append((y, p, r, cam.translation, cam.scale, cam.focal, a, b))
    lm = np.stack(lms).astype(np.float32)
    noisy = (lm + rng.normal(0, noise_px, lm.shape)).astype(np.float32)
    truth = _truth_fit(rows, camera, size, sh=sh_arr)
    return SyntheticBatch(np.stack(imgs), np.stack(masks), lm, noisy, truth, tex, sh_arr)


@dataclass
class SyntheticLandmarks:
    """Landmark-only synthetic faces with truth (no rendering): ``dense`` (N, 468, 2)
    mediapipe-like points (NaN rows for points the correspondence dropped), ``landmarks``
    (N, 68, 2) = ``dense[:, MP478_TO_68]`` (what the flow derives from mediapipe),
    ``truth`` a :class:`FitResult`, ``face_width`` (N,) px."""

    dense: np.ndarray
    landmarks: np.ndarray
    truth: FitResult
    face_width: np.ndarray


def synthetic_landmarks(model: MorphableModel, n: int, size: int = 256, *, seed: int = 0,
                        yaw_max: float = 60.0, camera: CameraKind = "orthographic",
                        focal_factor: float | None = None, noise_rel: float = 0.015,
                        iid_rel: float = 0.004, face_px: float | None = None,
                        fill: float = 0.6, silhouette: bool = True) -> SyntheticLandmarks:
    """Faces as :func:`synthetic_batch` draws them (identity 0.7 std, three expressions,
    yaw evenly over [-yaw_max, yaw_max], pitch U[-15, 15], roll U[-10, 10]), the face's
    mediapipe points framed to ``fill`` of the image, with mediapipe-like errors:

    - lateral points (beyond 0.3 of the face's half width from its midline) whose
      normal . view direction < 0.1 (far side, grazing) slide to the face's 2D
      silhouette (the closest point of the convex hull of the projected correspondence
      points and jaw contour candidates), as mediapipe's mesh does on a turned head;
    - a smooth (correlated) displacement field of ``noise_rel`` x face width (rms; four
      random Gaussian bumps) plus i.i.d. ``iid_rel`` x face width;
    - ``face_px``: the face was detected at this width (px) and upsampled to the crop: the
      i.i.d. part grows by face width / ``face_px`` x 1 px (the detector's own pixel).

    ``camera="perspective"`` with ``focal_factor`` k: focal = k x ``size``."""
    from facecorpus.renderers.cameras import framing_camera
    from scipy.spatial import ConvexHull

    corr, dnormal = dense_correspondence(model)
    from facecorpus.tasks.landmarks import MP478_TO_68

    rng = np.random.default_rng(seed)
    yaws = np.linspace(-yaw_max, yaw_max, n) if n > 1 else np.zeros(1)
    cont = np.r_[np.asarray(model.contour_right, np.int64),
                 np.asarray(model.contour_left, np.int64)]
    fov = 12.0 if focal_factor is None else math.degrees(2 * math.atan(0.5 / focal_factor))
    dense = np.full((n, 468, 2), np.nan)
    xm = corr.points(model.vertices, model.triangles)[:, 0]
    lateral = np.abs(xm - np.median(xm)) > 0.3 * np.abs(xm - np.median(xm)).max()
    rows, widths = [], []
    for i in range(n):
        pitch, roll = rng.uniform(-15, 15), rng.uniform(-10, 10)
        a = (rng.normal(size=model.n_id) * model.id_std * 0.7).astype(np.float32)
        b = np.zeros(model.n_exp, np.float32)
        if model.n_exp:
            k = rng.choice(model.n_exp, min(3, model.n_exp), replace=False)
            b[k] = rng.uniform(0, 0.6, len(k)) * model.exp_std[k]
        v = model.shape(a, b)
        P3 = corr.points(v, model.triangles)
        cam = framing_camera(P3, size, size, yaw=yaws[i], pitch=pitch, roll=roll,
                             kind=camera, fill=fill, fov_deg=fov)
        uv = cam.project(P3)[:, :2]
        # facing: normal . direction to the camera (camera at the origin / at +z)
        nc = np.asarray(normal_rot := cam.rotation) @ dnormal.T  # (3, D)
        if camera == "perspective":
            Y = P3 @ normal_rot.T + cam.translation
            facing = (nc.T * (-Y / np.linalg.norm(Y, axis=1, keepdims=True))).sum(1)
        else:
            facing = nc[2]
        hull_pts = np.r_[uv, cam.project(v[cont])[:, :2]]
        hull = ConvexHull(hull_pts)
        # only the lateral far side slides (inner-lip and nostril points face away too,
        # but mediapipe keeps them inside the face)
        hidden = (facing < 0.1) & lateral & silhouette
        if hidden.any():
            uv[hidden] = _closest_on_polygon(uv[hidden], hull_pts[hull.vertices])
        width = float(np.ptp(uv[:, 0]))
        height = float(np.ptp(uv[:, 1]))
        fw = max(width, 0.8 * height)
        # smooth field: four Gaussian bumps of random 2D amplitude
        field_ = np.zeros_like(uv)
        for _ in range(4):
            c0 = uv.mean(0) + rng.normal(0, 0.3 * fw, 2)
            amp = rng.normal(0, 1.0, 2)
            field_ += amp * np.exp(-((uv - c0) ** 2).sum(1, keepdims=True) / (2 * (0.35 * fw) ** 2))
        field_ *= noise_rel * fw / max(np.sqrt((field_ ** 2).sum(1).mean()), 1e-9)
        iid = iid_rel * fw + (fw / face_px if face_px else 0.0)
        uv = uv + field_ + rng.normal(0, iid / math.sqrt(2), uv.shape)
        dense[i, corr.point_ids] = uv
        widths.append(fw)
        y, p_, r_ = rotation_to_euler(cam.rotation)
        rows.append((y, p_, r_, cam.translation, cam.scale, cam.focal, a, b))
    truth = _truth_fit(rows, camera, size)
    return SyntheticLandmarks(dense.astype(np.float32),
                              dense[:, MP478_TO_68].astype(np.float32), truth,
                              np.array(widths, np.float32))


def _closest_on_polygon(q: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Closest point (M, 2) of the closed polygon ``poly`` (K, 2) boundary to each ``q``."""
    a, b = poly, np.roll(poly, -1, 0)
    ab = b - a
    t = (((q[:, None] - a) * ab).sum(-1) / (ab ** 2).sum(-1).clip(1e-12)).clip(0, 1)
    c = a + t[..., None] * ab  # (M, K, 2)
    d = ((c - q[:, None]) ** 2).sum(-1)
    return c[np.arange(len(q)), d.argmin(1)]


def rotation_error_deg(a: FitResult, b: FitResult) -> np.ndarray:
    """(N,) geodesic angle between the two fits' rotations, degrees."""
    Ra = euler_to_rotation(a.yaw, a.pitch, a.roll)
    Rb = euler_to_rotation(b.yaw, b.pitch, b.roll)
    tr = np.einsum("nij,nij->n", Ra, Rb)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


# ------------------------------------------------------------------ stage 2
def refine_photometric(model: MorphableModel, fit: FitResult, images: np.ndarray,
                       masks: np.ndarray, albedo_uv: np.ndarray, landmarks: np.ndarray,
                       opts: FitConfig | None = None) -> FitResult:
    """Stage 2: refine pose, shape, expression and SH light against the photo.

    Colour model (Deep3DFaceRecon-style): ``albedo_uv`` looked up through the model's UV
    layout times SH irradiance of the camera-space vertex normals. Energy: Charbonnier
    colour error over (face mask ∩ rendered mask) + ``w_landmarks`` x the stage-1 landmark
    term (in units of the image size) + ``w_prior`` x the coefficient prior. Visibility comes
    from a rasterizer each step (``fit.rasterizer``: numba on the CPU, or
    ``renderers.raster_torch`` on ``fit.device``, where the Adam path keeps all its tensors);
    gradients flow through recomputed barycentrics (``renderers.diff``). ``photometric_solver``: ``lm`` (default) a per-image
    Levenberg-Marquardt on this energy (:mod:`facecorpus.tasks.photometric`,
    ``photometric_iters`` iterations, one or two renders each, CPU); ``adam``
    ``photometric_iters`` Adam steps (one render and backward pass each, on ``fit.device``).

    Args:
        images: (N, S, S, 3) uint8 or float; masks: (N, S, S) bool face masks.
        albedo_uv: (N, T, T, 3) float per-image albedo/texture prior.
        landmarks: (N, 68, 2) target landmarks (pixels).

    Images do not couple: every term is per image (the colour error is normalised by the
    image's own mask count), the loss is their sum, so each image's gradient is its own
    term's, and Adam's moments are per element. An image whose energy or gradient turns
    non-finite is frozen from that step (it never feeds NaN to the rasterizer or to later
    steps) and returned with NaN parameters and a ``failure``, never passed on silently.

    Returns:
        A new :class:`FitResult` with ``sh`` and ``photometric_error`` (mean L1 over the mask);
        landmark error recomputed, ``converged`` and ``failure`` re-checked per image (see
        :class:`FitResult`).
    """
    opts = opts or FitConfig()
    torch = _torch()
    import cv2
    from facecorpus.renderers import diff
    from facecorpus.renderers.raster import rasterize
    from facecorpus.renderers.raster_torch import rasterize_torch

    lm = opts.photometric_solver == "lm" and opts.photometric_iters > 0
    # lm's per-image Jacobians are numba/numpy: it and its final re-render stay on the CPU
    dev = torch.device("cpu" if lm else opts.resolved_device())
    use_torch_raster = not lm and opts.resolved_rasterizer() == "torch"
    N, S = images.shape[0], fit.image_size
    persp = fit.camera == "perspective"
    K, E = fit.alpha.shape[1], fit.beta.shape[1]
    dt = torch.float32
    # the photometric term runs at render_size: screen xy scale exactly by k (pixel edges at
    # integers), the photo is area-averaged and the mask keeps only fully covered pixels
    R_ = int(opts.photometric_render_size or S)
    k = R_ / S
    imgs = np.asarray(images, np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    msk = np.asarray(masks, bool)
    if R_ != S:
        imgs = np.stack([cv2.resize(im, (R_, R_), interpolation=cv2.INTER_AREA) for im in imgs])
        msk = np.stack([cv2.resize(m.astype(np.float32), (R_, R_),
                                   interpolation=cv2.INTER_AREA) > 0.999 for m in msk])
    photo = torch.as_tensor(imgs)
    mask_t = torch.as_tensor(msk)
    tris = np.asarray(model.triangles, np.int64)
    tris_t = torch.as_tensor(tris, device=dev)
    corner_uv = torch.as_tensor(model.uv[model.uv_triangles], dtype=dt,
                                device=dev)  # (F, 3, 2)
    tex = torch.as_tensor(np.asarray(albedo_uv, np.float32))
    mean = torch.as_tensor(model.vertices, dtype=dt, device=dev)
    id_b = torch.as_tensor(model.id_basis[:K], dtype=dt, device=dev)
    ex_b = torch.as_tensor(model.exp_basis[:E], dtype=dt, device=dev)
    id_std = torch.as_tensor(model.id_std[:K], dtype=dt, device=dev)
    ex_std = torch.as_tensor(model.exp_std[:E], dtype=dt, device=dev)
    lm_idx = torch.as_tensor(np.asarray(model.landmarks, np.int64), device=dev)
    lm_t = torch.as_tensor(np.asarray(landmarks, np.float32), device=dev)

    angles = torch.tensor(np.deg2rad(np.c_[fit.yaw, fit.pitch, fit.roll]), dtype=dt,
                          requires_grad=True, device=dev)
    # translation in units of 100 (px or mm) so one Adam step moves every parameter alike
    t_scale = 100.0
    trans = torch.tensor(fit.translation / t_scale, dtype=dt, requires_grad=True, device=dev)
    sf0 = fit.focal if persp else fit.scale
    log_sf = torch.tensor(np.log(sf0), dtype=dt, requires_grad=not persp, device=dev)
    a_w = torch.tensor(fit.alpha / model.id_std[:K], dtype=dt, device=dev,
                       requires_grad=opts.photometric_fit_shape)
    b_w = torch.tensor(fit.beta / model.exp_std[:E], dtype=dt, device=dev,
                       requires_grad=opts.photometric_fit_shape)
    # light: start ambient, matched to the photo's brightness over the mask
    from facecorpus.renderers.shading import A0, C0

    sh0 = np.zeros((N, 27), np.float32)
    for i in range(N):
        m = msk[i]
        if m.any():
            ratio = photo[i][torch.as_tensor(m)].mean(0) / tex[i].reshape(-1, 3).mean(0).clamp(
                min=1e-3)
            sh0[i, 0::9] = (ratio.numpy() / (A0 * C0)).clip(0.05, 5)
        else:
            sh0[i, 0::9] = 1.0 / (A0 * C0)
    sh = torch.tensor(sh0, requires_grad=True, device=dev)
    # moved only now: the light start above reads them on the CPU
    photo, mask_t, tex = photo.to(dev), mask_t.to(dev), tex.to(dev)
    groups = [{"params": [angles], "lr": opts.photometric_lr}, {"params": [trans], "lr": opts.photometric_lr * 0.5},
              {"params": [sh], "lr": opts.photometric_lr * 2}]
    if not persp:
        groups.append({"params": [log_sf], "lr": opts.photometric_lr * 0.5})
    if opts.photometric_fit_shape:
        groups.append({"params": [a_w, b_w], "lr": opts.photometric_lr * 5})
    optim = _Adam(groups)
    c = S / 2.0

    def forward():
        X = mean + torch.einsum("nk,kvc->nvc", a_w * id_std, id_b) + torch.einsum(
            "ne,evc->nvc", b_w * ex_std, ex_b)
        R = _rot_torch(angles)
        from facecorpus.renderers.cameras import (
            project_orthographic_torch,
            project_perspective_torch,
        )

        if persp:
            sv = project_perspective_torch(X, R, trans * t_scale, log_sf.exp(), c, c)
        else:
            sv = project_orthographic_torch(X, R, trans * t_scale, log_sf.exp(), c, c)
        return X, R, sv

    err = np.full(N, np.nan, np.float32)
    scale_xy = torch.tensor([k, k, 1.0], dtype=dt, device=dev)
    params = [angles, trans, sh, log_sf, a_w, b_w]
    dead = torch.zeros(N, dtype=torch.bool, device=dev)  # non-finite energy/gradient: frozen from then on
    dead_step = np.full(N, -1)
    steps = np.full(N, opts.photometric_iters)
    if lm:
        from facecorpus.tasks import photometric

        # the Adam path's start (ambient light matched to the photo), built in one place
        scene, p0 = photometric.build(model, replace(fit, sh=None), images, masks, albedo_uv,
                                      landmarks, opts)
        with torch_threads(opts.photometric_threads):
            p1, err, steps, dead_step = photometric.levenberg_marquardt(
                scene, p0, opts.photometric_iters, opts.photometric_modes,
                opts.photometric_fit_shape, opts.photometric_tol,
                opts.photometric_hessian_stride, opts.photometric_max_extension)
        with torch.no_grad():
            for q, v in zip((angles, trans, log_sf, a_w, b_w, sh),
                            (p1.angles, p1.trans, p1.log_sf, p1.a_w, p1.b_w, p1.sh)):
                q.copy_(v)
        dead = torch.as_tensor(dead_step >= 0, device=dev)
        steps = np.where(dead_step >= 0, dead_step, steps)
    with torch_threads(opts.photometric_threads):
        for _step in range(0 if lm else opts.photometric_iters + 1):
            X, R, sv_full = forward()
            sv = sv_full * scale_xy
            with torch.no_grad():
                if use_torch_raster:  # fragments stay on dev: no host round trip per step
                    frags = rasterize_torch(sv.detach(), tris_t, R_, R_,
                                            perspective_correct=persp)
                else:
                    frags = rasterize(sv.detach().numpy(), tris, R_, R_,
                                      perspective_correct=persp)
            p2f = frags.pix_to_face
            bary = diff.barycentrics(sv, tris_t, p2f, perspective_correct=persp)
            uvp = diff.interpolate(corner_uv, bary, p2f)
            alb = diff.texture(tex, uvp)
            n_cam = diff.vertex_normals(X, tris_t) @ R.transpose(-1, -2)
            irr = diff.interpolate(diff.sh_irradiance(n_cam, sh), bary, p2f, tris_t)
            colour = alb * irr
            m = mask_t & torch.as_tensor(p2f >= 0)
            d = (colour - photo)[m]
            cnt = m.flatten(1).sum(1).clamp(min=1)
            per_pix = torch.sqrt(d**2 + opts.photometric_charbonnier_eps**2).sum(-1)
            img_idx = torch.nonzero(m, as_tuple=True)[0]
            photo_e = torch.zeros(N, device=dev).index_add(0, img_idx, per_pix) / cnt
            with torch.no_grad():
                l1 = torch.zeros(N, device=dev).index_add(0, img_idx, d.abs().mean(-1)) / cnt
                err = l1.cpu().numpy().astype(np.float32)
            if _step == opts.photometric_iters:
                break
            lm_xy = sv_full[:, lm_idx, :2]
            lm_e = (((lm_xy - lm_t) / S) ** 2).sum(-1).mean(-1)
            prior = ((a_w**2).sum(1) + (b_w**2).sum(1))
            loss = (photo_e + opts.photometric_w_landmarks * 1e3 * lm_e + opts.photometric_w_prior * prior).sum()
            optim.zero_grad()
            loss.backward()
            with torch.no_grad():
                bad = ~torch.isfinite(photo_e + lm_e + prior)
                for q in params:
                    if q.grad is not None:
                        bad |= ~torch.isfinite(q.grad.reshape(N, -1)).all(1)
                dead_step[(bad & ~dead).cpu().numpy()] = _step
                dead |= bad
                keep = [q.detach().clone() for q in params]
                for q in params:
                    if q.grad is not None:
                        q.grad[dead] = 0.0
            optim.step()
            with torch.no_grad():
                for q, q0 in zip(params, keep):
                    q[dead] = q0[dead]  # Adam's momentum would still move a frozen image
    with torch.no_grad():
        _, _, sv = forward()
        lm_xy = sv[:, lm_idx, :2].cpu().numpy()
    lm_np = np.asarray(landmarks, np.float64)
    rmse = np.sqrt(((lm_xy - lm_np) ** 2).sum(-1).mean(-1))
    a = angles.detach().cpu().numpy().astype(np.float64)
    yaw, pitch, roll = rotation_to_euler(euler_to_rotation(*np.rad2deg(a).T))
    sf = log_sf.detach().exp().cpu().numpy()
    nme = rmse / np.maximum(inter_ocular(np.nan_to_num(lm_np)), 1e-6)
    out = replace(
        fit, yaw=yaw.astype(np.float32), pitch=pitch.astype(np.float32),
        roll=roll.astype(np.float32),
        translation=(trans.detach().cpu().numpy() * t_scale).astype(np.float32),
        scale=(sf if not persp else fit.scale).astype(np.float32),
        focal=(sf if persp else fit.focal).astype(np.float32),
        alpha=(a_w * id_std).detach().cpu().numpy().astype(np.float32),
        beta=(b_w * ex_std).detach().cpu().numpy().astype(np.float32),
        sh=sh.detach().cpu().numpy().astype(np.float32), photometric_error=err,
        landmark_rmse=rmse.astype(np.float32), landmark_nme=nme.astype(np.float32),
        iterations=fit.iterations + np.where(dead_step >= 0, dead_step, steps))
    d = dead.cpu().numpy()
    if d.any():
        # a frozen image's numbers are not a fit: NaN them, so that any consumer checking
        # finiteness (not only one reading ``failure``) drops the image
        for name in ("yaw", "pitch", "roll", "translation", "scale", "focal", "alpha", "beta",
                     "sh", "photometric_error", "landmark_rmse", "landmark_nme"):
            getattr(out, name)[d] = np.nan
    failure = fit_failures(out, opts.max_nme, stage="stage 2")
    for i in np.flatnonzero(d):
        if fit.failure[i] is None:
            failure[i] = (f"non-finite parameters after stage 2 (its energy or gradient turned "
                          f"non-finite at step {dead_step[i]})")
    out.failure = failure
    out.converged = np.asarray(fit.converged, bool) & np.array([f is None for f in failure])
    return out


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's defaults and update, no weight decay) on
    parameter groups ``[{"params": [...], "lr": float}]``.

    Why not ``torch.optim.Adam``: constructing it imports ``torch._dynamo`` (about 1.6 CPU-s
    on the shared 2-core VM), paid once in every worker process, for 41 tiny updates.
    ``tests/test_fit.py::test_adam_matches_torch`` checks the steps agree with torch's.
    """

    def __init__(self, groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.betas, self.eps = groups, betas, eps
        self.state: dict[int, list] = {}  # id(param) -> [step, m, v]; step counts own updates

    def zero_grad(self) -> None:
        for g in self.groups:
            for q in g["params"]:
                q.grad = None

    def step(self) -> None:
        import torch

        b1, b2 = self.betas
        with torch.no_grad():
            for g in self.groups:
                for q in g["params"]:
                    if q.grad is None:
                        continue
                    st = self.state.setdefault(id(q), [0, torch.zeros_like(q),
                                                       torch.zeros_like(q)])
                    st[0] += 1
                    t, m, v = st
                    m.lerp_(q.grad, 1 - b1)
                    v.mul_(b2).addcmul_(q.grad, q.grad, value=1 - b2)
                    denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(self.eps)
                    q.addcdiv_(m, denom, value=-g["lr"] / (1 - b1 ** t))


def fit_failures(fit: FitResult, max_nme: float = 0.2, stage: str = "stage 1"
                 ) -> np.ndarray:
    """(N,) object: per image None, or why its fit must not be used - the reason already in
    ``fit.failure``, else "non-finite parameters after <stage>" (pose, camera, coefficients,
    SH, landmark error), else "landmark error 0.31 of the inter-ocular distance > 0.2".
    The flow rejects an image with ``SampleRejected(uri, "fit", reason)`` on a reason."""
    arrays = [np.c_[fit.yaw, fit.pitch, fit.roll], fit.translation, fit.scale, fit.focal,
              fit.alpha, fit.beta, fit.landmark_rmse, fit.landmark_nme]
    if fit.sh is not None:
        arrays.append(fit.sh)
    n = len(fit)
    finite = np.ones(n, bool)
    for a in arrays:
        finite &= np.isfinite(np.asarray(a, np.float64).reshape(n, -1)).all(1)
    out = np.array(list(fit.failure) + [None], object)[:n]
    nme = np.asarray(fit.landmark_nme, np.float64)
    for i in range(n):
        if out[i] is not None:
            continue
        if not finite[i]:
            out[i] = f"non-finite parameters after {stage}"
        elif not nme[i] < max_nme:
            out[i] = f"landmark error {nme[i]:.3g} of the inter-ocular distance > {max_nme:g}"
    return out
