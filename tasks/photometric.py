"""Stage 2 as a per-image Levenberg-Marquardt (``FitConfig.photometric_solver = "lm"``).

Minimises exactly the energy of the Adam path of :func:`facecorpus.tasks.fit.refine_photometric`
(per image, parameters ``theta = [angles (3, rad), t / 100 (2 | 3), log s (orthographic),
alpha / id_std (K), beta / exp_std (E), sh (27)]``)::

    E(theta) = 1/|M| sum_{p in M} sum_c sqrt(d_pc^2 + eps^2)         colour, Charbonnier
             + w_landmarks * 1e3 * mean_k |P(v_k) - l_k|^2 / S^2       stage-1 anchor
             + w_prior * (|alpha / id_std|^2 + |beta / exp_std|^2)

with ``M`` = face mask ∩ rendered pixels (at ``photometric_render_size``) and
``d = albedo(uv) * SH(n) - photo``. One iteration: the Charbonnier as IRLS weights
``1 / sqrt(d^2 + eps^2)``, the Jacobian of the residuals w.r.t. the free parameters
at fixed fragments, the damped normal equations ``(H + mu diag H) delta = -g`` solved per
image, one rasterization of every image's trial point, accept (``mu / 3``) or reject
(``mu x 4``, the cached ``H, g`` are reused) on the exact energy, per image; an accepted
step is then tried once more at the length the 1-D parabola through (energy, slope
``g . delta``, trial energy) puts its minimum (``photometric_max_extension``, :func:`extension`),
the lower point kept. The gradient is exact (finite differences on the astronaut agree to
< 1 %), but the IRLS curvature along the step is 2-4x the true one on real photos, so the
plain Gauss-Newton step stops short (docs/benchmarks.md, "Stage 2 LM convergence").

Free parameters: pose (6; 6 perspective: the focal stays fixed, as in the Adam path), the
27 SH coefficients and the first ``photometric_modes`` identity and expression modes (the
others keep their stage-1 values; ``photometric_fit_shape = False``: none).

The Jacobian is built from two local pieces instead of forward mode through the whole
render (which would cost one render per parameter):

- per vertex: screen position ``sv`` (U, 3) w.r.t. pose (``torch.func.jacfwd`` on 6
  numbers) and w.r.t. the model point (3 one-hot JVPs; the projection is per vertex), times
  the mode basis for the shape columns; SH basis of the camera-space normal w.r.t. the
  three angles;
- per pixel: colour w.r.t. its face's three corner positions (one-hot JVPs of the
  pixel-local colour function: barycentrics, UV, bilinear texture, interpolated irradiance)
  and w.r.t. the corners' irradiance (``albedo x lambda_k``, closed form).

The Jacobian includes the turn of the vertex normals with the shape modes (their
derivative over the triangles next to the used vertices, closed form): without it LM
stalled above Adam's energy on the real photos (measured; docs/benchmarks.md). The gradient
is formed from every pixel, pulled back to the vertices by a scatter (no (P, 3, D)
Jacobian); the Gauss-Newton matrix from the pixels on a ``photometric_hessian_stride`` grid
(it does not move the point LM converges to, and every step is accepted on the exact
energy). Visibility is fixed within an iteration, as in the Adam path's gradient.

Per-image independence: every quantity is per image and the solve is per image; batching
only shares the rasterizer call. An image whose current energy or normal equations turn
non-finite is frozen from that iteration and reported by the caller like the Adam path's.

Shapes: N images, V vertices, F triangles, R render size, P masked pixels of one image,
U vertices used by them (and the 68 landmarks), G free geometry parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

T_SCALE = 100.0  # translation in units of 100 (px or mm), as the Adam path
MU0 = 1e-2  # initial damping (relative to diag H)


def resize_targets(images: np.ndarray, masks: np.ndarray, render_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) photos and (N, S, S) masks -> float32 [0, 1] photos and bool masks at
    ``render_size``: photos area-averaged, masks keep only fully covered pixels."""
    import cv2

    imgs = np.asarray(images, np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    msk = np.asarray(masks, bool)
    S = imgs.shape[1]
    if render_size != S:
        imgs = np.stack([cv2.resize(im, (render_size, render_size),
                                    interpolation=cv2.INTER_AREA) for im in imgs])
        msk = np.stack([cv2.resize(m.astype(np.float32), (render_size, render_size),
                                   interpolation=cv2.INTER_AREA) > 0.999 for m in msk])
    return imgs, msk


def _cell(tex: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor):
    """The four texels ``tex[y0, x0], tex[y0, x0 + 1], tex[y0 + 1, x0], tex[y0 + 1, x0 + 1]``
    of (T, T, C) ``tex``, by ``index_select`` on the flat texture (the same values, ~3x
    faster than 2-D advanced indexing; differentiable, forward mode included)."""
    T = tex.shape[1]
    flat = tex.reshape(-1, tex.shape[-1])
    i = y0 * T + x0
    return (flat.index_select(0, i), flat.index_select(0, i + 1),
            flat.index_select(0, i + T), flat.index_select(0, i + T + 1))


def bilinear(tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(bilinear, border, align_corners=False)`` of one (T, T, C) texture
    at (P, 2) UVs (u right, v up; UV image row r <-> v = 1 - (r + 0.5) / T) -> (P, C).
    Written with gathers so that forward-mode JVPs pass through it."""
    T = tex.shape[0]
    x = (uv[:, 0] * T - 0.5).clamp(0, T - 1)
    y = ((1 - uv[:, 1]) * T - 0.5).clamp(0, T - 1)
    x0 = x.detach().floor().clamp(max=T - 2).long()
    y0 = y.detach().floor().clamp(max=T - 2).long()
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    t00, t01, t10, t11 = _cell(tex, x0, y0)
    return (t00 * (1 - fx) + t01 * fx) * (1 - fy) + (t10 * (1 - fx) + t11 * fx) * fy


def pixel_colour(svc: torch.Tensor, irrc: torch.Tensor, uvc: torch.Tensor, px, py,
                 tex: torch.Tensor, persp: bool):
    """Colour of P pixels from their faces' corners: screen positions ``svc`` (P, 3, 3),
    irradiance ``irrc`` (P, 3, 3) (corner, channel), corner UVs ``uvc`` (P, 3, 2), pixel
    centres ``px, py`` (P,) -> (colour (P, 3), barycentrics (P, 3), albedo (P, 3)); the same
    barycentrics as :func:`facecorpus.renderers.diff.barycentrics`."""
    x0, y0 = svc[:, 0, 0], svc[:, 0, 1]
    x1, y1 = svc[:, 1, 0], svc[:, 1, 1]
    x2, y2 = svc[:, 2, 0], svc[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    l0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
    l1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
    lam = torch.stack([l0, l1, 1.0 - l0 - l1], -1)
    if persp:
        q = lam / svc[:, :, 2]
        lam = q / q.sum(-1, keepdim=True)
    alb = bilinear(tex, (lam[..., None] * uvc).sum(1))
    irr = (lam[..., None] * irrc).sum(1)
    return alb * irr, lam, alb


def _take(x: torch.Tensor, idx) -> torch.Tensor:
    """``x[idx]`` for an integer index tensor (any shape) along dim 0, by ``index_select``:
    the same copy, 2.5-3.5x faster than advanced indexing on the CPU (measured on stage 2's
    gathers: (U, 3, m) basis rows, per-pixel corner rows)."""
    idx = torch.as_tensor(idx)
    return x.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *x.shape[1:])


@dataclass
class Scene:
    """The constants of one stage-2 problem (torch float32 unless said).

    photo (N, R, R, 3), mask (N, R, R) bool, tex (N, T, T, 3), tris (F, 3) int64 array and
    tensor, corner_uv (F, 3, 2), mean (V, 3), id_b (K, V, 3), ex_b (E, V, 3), id_std (K,),
    ex_std (E,), lm_idx (68,) int64, lm (N, 68, 2) px; S crop size, R render size."""

    photo: torch.Tensor
    mask: torch.Tensor
    tex: torch.Tensor
    tris: np.ndarray
    tris_t: torch.Tensor
    corner_uv: torch.Tensor
    mean: torch.Tensor
    id_b: torch.Tensor
    ex_b: torch.Tensor
    id_std: torch.Tensor
    ex_std: torch.Tensor
    lm_idx: torch.Tensor
    lm: torch.Tensor
    S: int
    R: int
    persp: bool
    eps: float
    w_landmarks: float
    w_prior: float
    _rows: tuple | None = None  # ((nk, ne), basis rows)
    _coord_rows: tuple | None = None  # ((nk, ne), the same basis coordinate-major)

    def basis_rows(self, verts: torch.Tensor, nk: int, ne: int) -> torch.Tensor:
        """The std-scaled basis of the first nk identity and ne expression modes at
        ``verts``: (U, 3, nk + ne). Vertex-major (built once), so a row gather is cheap."""
        if self._rows is None or self._rows[0] != (nk, ne):
            self._rows = ((nk, ne), torch.cat([self.id_b[:nk] * self.id_std[:nk, None, None],
                                               self.ex_b[:ne] * self.ex_std[:ne, None, None]]
                                              ).permute(1, 2, 0).contiguous())
        rows = self._rows[1]
        return rows[verts] if isinstance(verts, slice) else _take(rows, verts)

    def mode_pullback(self, grad: torch.Tensor, verts: torch.Tensor, nk: int, ne: int
                      ) -> torch.Tensor:
        """``einsum("uj,ujm->m", grad, basis_rows(verts))`` for a (U, 3) ``grad`` at
        ``verts``, bit for bit: that einsum copies its (U, 3, m) operand to (3, U, m) before
        one bmm; gathering from a (3, V, m) copy built once and calling the same bmm saves
        the copy (2.3x, measured)."""
        if self._coord_rows is None or self._coord_rows[0] != (nk, ne):
            self._coord_rows = ((nk, ne), self.basis_rows(slice(None), nk, ne)
                                .permute(1, 0, 2).contiguous())
        cols = self._coord_rows[1].index_select(1, torch.as_tensor(verts))
        return torch.bmm(grad.T.reshape(1, 1, -1), cols.reshape(1, -1, nk + ne))[0, 0]


@dataclass
class Params:
    """Per-image parameters (torch float32): angles (N, 3) rad, trans (N, 2 | 3) in units of
    ``T_SCALE``, log_sf (N,) log scale (orthographic) or log focal, a_w (N, K) and b_w (N, E)
    in std units, sh (N, 27)."""

    angles: torch.Tensor
    trans: torch.Tensor
    log_sf: torch.Tensor
    a_w: torch.Tensor
    b_w: torch.Tensor
    sh: torch.Tensor

    def row(self, i: int) -> Params:
        return Params(*(getattr(self, f)[i].clone() for f in self.__dataclass_fields__))

    def put(self, i: int, p: Params) -> None:
        for f in self.__dataclass_fields__:
            getattr(self, f)[i] = getattr(p, f)


def _rot(angles):
    from facecorpus.renderers.cameras import euler_to_rotation_torch

    deg = angles * (180.0 / math.pi)
    return euler_to_rotation_torch(deg[0], deg[1], deg[2])


def _project(sc: Scene, X, angles, trans, log_sf):
    """(U, 3) model points -> (U, 3) screen vertices at the crop scale S."""
    from facecorpus.renderers.cameras import project_orthographic_torch, project_perspective_torch

    c = sc.S / 2.0
    R = _rot(angles)
    f = project_perspective_torch if sc.persp else project_orthographic_torch
    return f(X, R, trans * T_SCALE, log_sf.exp(), c, c)


def _shape(sc: Scene, p: Params):
    return (sc.mean + torch.einsum("k,kvc->vc", p.a_w * sc.id_std, sc.id_b)
            + torch.einsum("e,evc->vc", p.b_w * sc.ex_std, sc.ex_b))


@dataclass
class _State:
    """One image at one parameter point: geometry, fragments, energy and pixel data."""

    X: torch.Tensor       # (V, 3) model-space shape
    n_model: torch.Tensor  # (V, 3) unit vertex normals, model space
    sv: torch.Tensor      # (V, 3) screen vertices at the crop scale
    energy: float
    l1: float
    pix: tuple | None     # (ys, xs, faces) of the masked pixels


def _geometry(sc: Scene, p: Params):
    from facecorpus.renderers import diff

    X = _shape(sc, p)
    n = diff.vertex_normals(X, sc.tris_t)
    sv = _project(sc, X, p.angles, p.trans, p.log_sf)
    return X, n, sv


def _evaluate(sc: Scene, i: int, p: Params, X, n, sv, p2f: np.ndarray) -> _State:
    """Energy of image ``i`` at ``p`` with its fragments ``p2f`` (R, R)."""
    from facecorpus.renderers.shading import sh_basis_torch

    k = sc.R / sc.S
    m = sc.mask[i].numpy() & (p2f >= 0)
    ys, xs = np.nonzero(m)
    faces = p2f[ys, xs]
    cnt = max(len(ys), 1)
    lm_r = (sv[sc.lm_idx, :2] - sc.lm[i]) / sc.S
    e_lm = float((lm_r ** 2).sum(-1).mean())
    prior = float((p.a_w ** 2).sum() + (p.b_w ** 2).sum())
    e_ph, l1 = 0.0, float("nan")
    if len(ys):
        corners = _take(sc.tris_t, faces)
        svc = _take(sv, corners) * torch.tensor([k, k, 1.0])
        n_cam = _take(n, corners) @ _rot(p.angles).T
        irrc = torch.einsum("pkj,cj->pkc", sh_basis_torch(n_cam), p.sh.reshape(3, 9))
        col, _, _ = pixel_colour(svc, irrc, _take(sc.corner_uv, faces),
                                 torch.as_tensor(xs, dtype=torch.float32) + 0.5,
                                 torch.as_tensor(ys, dtype=torch.float32) + 0.5,
                                 sc.tex[i], sc.persp)
        d = col - _take(sc.photo[i].reshape(-1, 3), ys * sc.R + xs)
        e_ph = float(torch.sqrt(d ** 2 + sc.eps ** 2).sum() / cnt)
        l1 = float(d.abs().mean(-1).sum() / cnt)
    energy = e_ph + sc.w_landmarks * 1e3 * e_lm + sc.w_prior * prior
    return _State(X, n, sv, energy, l1, (ys, xs, faces))


def _drot(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R (3, 3) of (yaw, pitch, roll) radians, R = Rz(roll) Ry(yaw) Rx(pitch), and its
    derivatives (3 angles, 3, 3)."""
    y, p, r = (float(v) for v in angles)
    cy, sy, cp, sp, cr, sr = (math.cos(y), math.sin(y), math.cos(p), math.sin(p),
                              math.cos(r), math.sin(r))
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    drx = torch.tensor([[0, 0, 0], [0, -sp, -cp], [0, cp, -sp]])
    dry = torch.tensor([[-sy, 0, cy], [0, 0, 0], [-cy, 0, -sy]])
    drz = torch.tensor([[-sr, -cr, 0], [cr, -sr, 0], [0, 0, 0]])
    return rz @ ry @ rx, torch.stack([rz @ dry @ rx, rz @ ry @ drx, drz @ ry @ rx])


def _dsh_basis(n: torch.Tensor) -> torch.Tensor:
    """d sh_basis / d normal: (U, 3) -> (U, 9, 3) (``renderers.shading._basis``)."""
    from facecorpus.renderers.shading import A1, A2, C1, C2

    nx, ny, nz = n[:, 0], n[:, 1], n[:, 2]
    z = torch.zeros_like(nx)
    a, b = A1 * C1, A2 * C2
    rows = [(z, z, z), (z, z - a, z), (z, z, z + a), (z - a, z, z), (b * ny, b * nx, z),
            (z, -b * nz, -b * ny), (z, z, b * math.sqrt(3.0) * nz), (-b * nz, z, -b * nx),
            (b * nx, -b * ny, z)]
    return torch.stack([torch.stack(r, -1) for r in rows], 1)


def _dsv_dxc(sc: Scene, xc: torch.Tensor, s: float) -> torch.Tensor:
    """d screen vertex / d camera-space point (before translation for orthographic):
    (U, 3) -> (U, 3, 3)."""
    U = xc.shape[0]
    if not sc.persp:
        return (s * torch.diag(torch.tensor([1.0, -1.0, -1.0]))).expand(U, 3, 3)
    d = -xc[:, 2]
    M = torch.zeros(U, 3, 3)
    M[:, 0, 0] = s / d
    M[:, 0, 2] = s * xc[:, 0] / d ** 2
    M[:, 1, 1] = -s / d
    M[:, 1, 2] = -s * xc[:, 1] / d ** 2
    M[:, 2, 2] = -1.0
    return M


def _pixel_grad(svc, irrc, uvc, px, py, tex, persp: bool):
    """:func:`pixel_colour` and its exact derivative w.r.t. the corner screen positions
    (P, channel, corner, coordinate: 3 with depth for perspective, else 2).

    Barycentrics as edge functions ``lambda_i = e_i / A``, ``e_i = cross(v_{i+1} - p,
    v_{i+2} - p)``, ``A = sum e_i``; perspective: ``lambda'_i = (lambda_i / z_i) /
    sum_m lambda_m / z_m``; the bilinear texture's derivative is its cell's slope (0 where
    the lookup is clamped, as in ``grid_sample``'s border mode)."""
    P = svc.shape[0]
    pt = torch.stack([px, py], -1)[:, None]  # (P, 1, 2)
    rel = svc[:, :, :2] - pt  # (P, 3, 2)
    a, b = rel.roll(-1, 1), rel.roll(-2, 1)  # v_{i+1} - p, v_{i+2} - p
    e = a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1]  # (P, 3)
    A = e.sum(1, keepdim=True)
    lam = e / A
    # de_i / d v_j (P, 3 i, 3 j, 2): a_i = v_{i+1}, b_i = v_{i+2}
    de = torch.zeros(P, 3, 3, 2)
    ar = torch.arange(3)
    de[:, ar, (ar + 1) % 3, 0] = b[..., 1]
    de[:, ar, (ar + 1) % 3, 1] = -b[..., 0]
    de[:, ar, (ar + 2) % 3, 0] = -a[..., 1]
    de[:, ar, (ar + 2) % 3, 1] = a[..., 0]
    dA = de.sum(1, keepdim=True)
    dlam = (de - lam[:, :, None, None] * dA) / A[..., None, None]  # (P, 3 i, 3 j, 2)
    nd = 3 if persp else 2
    if persp:
        z = svc[:, :, 2]
        q = lam / z
        Q = q.sum(1, keepdim=True)
        lp = q / Q
        dlp_dq = (torch.eye(3)[None] - lp[:, :, None]) / Q[..., None]  # (P, i, m)
        dq = torch.zeros(P, 3, 3, 3)  # (P, m, j, coord)
        dq[..., :2] = dlam / z[:, :, None, None]
        dq[:, ar, ar, 2] = -lam / z ** 2
        dlam_full = torch.einsum("pim,pmjd->pijd", dlp_dq, dq)
        lam = lp
    else:
        dlam_full = dlam
    uv = (lam[..., None] * uvc).sum(1)
    T = tex.shape[0]
    xr = uv[:, 0] * T - 0.5
    yr = (1 - uv[:, 1]) * T - 0.5
    x = xr.clamp(0, T - 1)
    y = yr.clamp(0, T - 1)
    x0 = x.floor().clamp(max=T - 2).long()
    y0 = y.floor().clamp(max=T - 2).long()
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    t00, t01, t10, t11 = _cell(tex, x0, y0)
    alb = (t00 * (1 - fx) + t01 * fx) * (1 - fy) + (t10 * (1 - fx) + t11 * fx) * fy
    inx = ((xr > 0) & (xr < T - 1)).float()[:, None]
    iny = ((yr > 0) & (yr < T - 1)).float()[:, None]
    dAdu = ((t01 - t00) * (1 - fy) + (t11 - t10) * fy) * inx * T  # (P, 3 channels)
    dAdv = -((t10 - t00) * (1 - fx) + (t11 - t01) * fx) * iny * T
    irr = (lam[..., None] * irrc).sum(1)  # (P, 3)
    # d colour / d lambda_k (P, channel, k)
    dc_dl = ((dAdu[:, :, None] * uvc[:, None, :, 0] + dAdv[:, :, None] * uvc[:, None, :, 1])
             * irr[:, :, None] + alb[:, :, None] * irrc.transpose(1, 2))
    grad = torch.einsum("pck,pkjd->pcjd", dc_dl, dlam_full[..., :nd])
    return alb * irr, lam, alb, grad


@njit(cache=True, nogil=True)
def _dnormal_sums(tri, lv, e1, e2, B, n_used):  # pragma: no cover - numba
    """d acc_v / d mode (n_used, 3, m): per triangle (a, b, c) with edges e1 = b - a,
    e2 = c - a, d fn = cross(dB_b - dB_a, e2) + cross(e1, dB_c - dB_a), added to its used
    corners (lv >= 0).

    Why two passes over the modes per triangle: the first writes d fn for all modes to
    scratch rows, the second adds them to the corners' contiguous output rows; each loop
    is then branch-free over contiguous memory and LLVM vectorises it (3.8x faster than one
    fused loop with the corner test inside, measured; the same float32 operations in the
    same order, so the result is byte-identical)."""
    m = B.shape[2]
    out = np.zeros((n_used, 3, m), np.float32)
    dx = np.empty(m, np.float32)
    dy = np.empty(m, np.float32)
    dz = np.empty(m, np.float32)
    for f in range(tri.shape[0]):
        ex, ey, ez = e1[f, 0], e1[f, 1], e1[f, 2]
        gx, gy, gz = e2[f, 0], e2[f, 1], e2[f, 2]
        Ba, Bb, Bc = B[tri[f, 0]], B[tri[f, 1]], B[tri[f, 2]]
        for j in range(m):
            ux = Bb[0, j] - Ba[0, j]
            uy = Bb[1, j] - Ba[1, j]
            uz = Bb[2, j] - Ba[2, j]
            wx = Bc[0, j] - Ba[0, j]
            wy = Bc[1, j] - Ba[1, j]
            wz = Bc[2, j] - Ba[2, j]
            dx[j] = uy * gz - uz * gy + ey * wz - ez * wy
            dy[j] = uz * gx - ux * gz + ez * wx - ex * wz
            dz[j] = ux * gy - uy * gx + ex * wy - ey * wx
        for k in range(3):
            v = lv[f, k]
            if v >= 0:
                o = out[v]
                for j in range(m):
                    o[0, j] += dx[j]
                    o[1, j] += dy[j]
                    o[2, j] += dz[j]
    return out


def _dnormals(sc: Scene, X: torch.Tensor, used: np.ndarray, nk: int, ne: int
              ) -> torch.Tensor:
    """d unit vertex normal (model space, ``renderers.diff.vertex_normals``) / d mode, at
    the ``used`` vertices: (U, 3, nk + ne).

    The area-weighted normal sum ``acc_v = sum_{f ni v} cross(b - a, c - a)`` changes by
    ``cross(db - da, c - a) + cross(b - a, dc - da)`` per adjacent triangle, for all modes
    at once (a numba loop over the triangles: the same as torch tensors (F', 3, m) measured
    5x slower on the 2-core VM, memory bound)."""
    V = X.shape[0]
    loc = np.full(V, -1)
    loc[used] = np.arange(len(used))
    tri = sc.tris[(loc[sc.tris] >= 0).any(1)]  # (F', 3)
    t = torch.as_tensor(tri)
    a, b, c = X[t[:, 0]], X[t[:, 1]], X[t[:, 2]]
    e1, e2 = b - a, c - a
    fn = torch.linalg.cross(e1, e2, dim=-1)
    lv = loc[tri]  # (F', 3) accumulating corner v (-1: not used)
    B = sc.basis_rows(slice(None), nk, ne)  # (V, 3, m)
    acc = torch.zeros(len(used), 3)
    for k in range(3):
        ok = torch.as_tensor(lv[:, k] >= 0)
        acc.index_add_(0, torch.as_tensor(lv[:, k])[ok], fn[ok])
    dacc = torch.from_numpy(_dnormal_sums(
        np.ascontiguousarray(tri), np.ascontiguousarray(lv), e1.numpy(), e2.numpy(),
        B.numpy(), len(used)))
    nrm = acc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = acc / nrm
    # d (acc / |acc|) = (dacc - n (n . dacc)) / |acc|, in place (the torch expression made
    # four (U, 3, m) temporaries: ~4 ms a call, measured)
    _tangent_part(dacc.numpy(), n.numpy(), nrm.numpy())
    return dacc


@njit(cache=True, nogil=True)
def _tangent_part(d, n, nrm):  # pragma: no cover - numba
    """In place: d[u] = (d[u] - n[u] (n[u] . d[u])) / nrm[u] for (U, 3, m) ``d``."""
    m = d.shape[2]
    for u in range(d.shape[0]):
        n0, n1, n2, r = n[u, 0], n[u, 1], n[u, 2], nrm[u, 0]
        du = d[u]
        for j in range(m):
            dot = n0 * du[0, j] + n1 * du[1, j] + n2 * du[2, j]
            du[0, j] = (du[0, j] - n0 * dot) / r
            du[1, j] = (du[1, j] - n1 * dot) / r
            du[2, j] = (du[2, j] - n2 * dot) / r


def _normal_equations(sc: Scene, i: int, p: Params, st: _State, nk: int, ne: int,
                      stride: int = 1, pixel_stride: int = 1):
    """Gauss-Newton (IRLS) ``H`` (D, D) and gradient ``g`` (D,) float64 of image ``i``'s
    energy over the free vector [angles 3, trans, log s (orthographic), a_w[:nk],
    b_w[:ne], sh 27]; ``g`` from the masked pixels on a ``pixel_stride`` grid (1: all, the
    exact gradient), ``H`` from those on every ``stride``-th of that grid's rows and
    columns (both scaled to a mean over the mask)."""
    from facecorpus.renderers.shading import sh_basis_torch

    k = sc.R / sc.S
    ys, xs, faces = st.pix
    nt = p.trans.shape[0]
    n_pose = 3 + nt + (0 if sc.persp else 1)
    m = nk + ne
    G = n_pose + m
    D = G + 27
    if pixel_stride > 1:  # a fixed regular subset of the residual for g and H alike
        keep = np.flatnonzero((ys % pixel_stride == 0) & (xs % pixel_stride == 0))
        if len(keep) >= D:  # H's full-rank guard
            ys, xs, faces = ys[keep], xs[keep], faces[keep]
        else:
            pixel_stride = 1
    corners_all = sc.tris[faces]  # (P, 3)
    used, inv = np.unique(np.concatenate([corners_all.ravel(), sc.lm_idx.numpy()]),
                          return_inverse=True)
    inv_pix = torch.as_tensor(inv[:corners_all.size].reshape(-1, 3))
    inv_lm = torch.as_tensor(inv[corners_all.size:])
    used_t = torch.as_tensor(used)
    Xu = _take(st.X, used_t)
    U = len(used)

    # per vertex, closed form: d sv / d pose (U, 3, n_pose); d sv / d model point = MR
    R, dR = _drot(p.angles)
    s = float(p.log_sf.exp())
    xr = Xu @ R.T  # rotated, before translation
    M = _dsv_dxc(sc, xr + p.trans * T_SCALE if sc.persp else xr, s)  # (U, 3, 3)
    MR = M @ R  # (U, 3, 3)
    cols = [torch.einsum("uij,ajk,uk->uia", M, dR, Xu)]
    if sc.persp:
        cols.append(M * T_SCALE)
    else:
        dt = torch.zeros(U, 3, 3)
        dt[:, 0, 0] = T_SCALE
        dt[:, 1, 1] = -T_SCALE
        dt[:, :, 2] = s * xr * torch.tensor([1.0, -1.0, -1.0])
        cols.append(dt)
    Dpose = torch.cat(cols, -1)
    # per vertex: SH basis of the camera normal and its derivative w.r.t. the angles
    nu = _take(st.n_model, used_t)
    ncam = nu @ R.T
    Y = sh_basis_torch(ncam)  # (U, 9)
    dYdn = _dsh_basis(ncam)  # (U, 9, 3)
    DY = torch.einsum("ujd,adk,uk->uja", dYdn, dR, nu)  # (U, 9, 3)
    shm = p.sh.reshape(3, 9)
    irr = Y @ shm.T  # (U, 3)
    Dirr = torch.einsum("cj,uja->uca", shm, DY)  # (U, 3 channels, 3 angles)
    if m:  # the shape modes turn the normals: irradiance w.r.t. the modes (U, 3, m)
        dn = _dnormals(sc, st.X, used, nk, ne)  # (U, 3, m) model-space normal
        W = torch.einsum("cj,ujd->ucd", shm, dYdn) @ R  # d irr / d model normal (U, 3, 3)
        Dirr_m = torch.bmm(W, dn)  # (U, 3, m), contiguous for the gradient below
        Dirr = torch.cat([Dirr, Dirr_m], -1)

    H = torch.zeros(D, D, dtype=torch.float64)
    g = torch.zeros(D, dtype=torch.float64)
    # landmarks (68 points: their Jacobian rows are formed in full)
    c_lm = sc.w_landmarks * 1e3 / len(sc.lm_idx)
    r_lm = ((st.sv[sc.lm_idx, :2] - sc.lm[i]) / sc.S).reshape(-1).double()
    J_lm = torch.cat([Dpose[inv_lm], torch.einsum("lij,ljm->lim", MR[inv_lm], sc.basis_rows(
        sc.lm_idx, nk, ne))], -1)[:, :2].reshape(-1, G).double() / sc.S
    H[:G, :G] += 2 * c_lm * J_lm.T @ J_lm
    g[:G] += 2 * c_lm * J_lm.T @ r_lm
    if m:  # prior over the free modes
        w = torch.cat([p.a_w[:nk], p.b_w[:ne]]).double()
        idx = torch.arange(n_pose, G)
        H[idx, idx] += 2 * sc.w_prior
        g[idx] += 2 * sc.w_prior * w
    if len(ys) == 0:
        return H, g
    scale = torch.tensor([k, k, 1.0])
    nd = 3 if sc.persp else 2  # orthographic depth does not reach the colour
    svc = _take(_take(st.sv, used_t), inv_pix) * scale  # (P, 3, 3)
    irrc = _take(irr, inv_pix)  # (P, 3 corners, 3 channels)
    uvc = _take(sc.corner_uv, faces)
    px = torch.as_tensor(xs, dtype=torch.float32) + 0.5
    py = torch.as_tensor(ys, dtype=torch.float32) + 0.5
    col, lam, alb, dcol = _pixel_grad(svc, irrc, uvc, px, py, sc.tex[i], sc.persp)
    dcol = dcol * scale[:nd]  # w.r.t. the crop-scale screen positions
    res = col - _take(sc.photo[i].reshape(-1, 3), ys * sc.R + xs)  # (P, 3)
    cnt = len(ys)
    wgt = 1.0 / torch.sqrt(res ** 2 + sc.eps ** 2)  # IRLS weight of the Charbonnier
    wr = wgt * res / cnt  # d E_photo / d colour
    al = alb[:, :, None] * lam[:, None, :]  # (P, channel, corner): d colour / d irr_corner
    ysh = torch.einsum("pk,pkj->pj", lam, _take(Y, inv_pix))  # (P, 9)

    # exact gradient without the (P, 3, D) Jacobian: d E / d colour pulled back to the
    # vertices (scatter), then through the per-vertex derivatives
    flat = inv_pix.reshape(-1)
    gsv = torch.zeros(U, nd).index_add_(
        0, flat, torch.einsum("pc,pckd->pkd", wr, dcol).reshape(-1, nd))
    girr = torch.zeros(U, 3).index_add_(
        0, flat, torch.einsum("pc,pck->pkc", wr, al).reshape(-1, 3))
    g[:n_pose] += torch.einsum("ud,udg->g", gsv, Dpose[:, :nd]).double()
    g[:3] += torch.einsum("uc,uca->a", girr, Dirr[:, :, :3]).double()
    if m:
        gx = torch.einsum("ud,udj->uj", gsv, MR[:, :nd])  # d E / d model point (U, 3)
        g[n_pose:G] += sc.mode_pullback(gx, used_t, nk, ne).double()
    g[G:] += torch.einsum("pc,pj->cj", wr * alb, ysh).reshape(-1).double()
    if m:  # through the normals
        g[n_pose:G] += torch.einsum("uc,ucm->m", girr, Dirr_m).double()

    # H (P x D^2, the dominant cost) from the pixels on a stride grid, scaled to all pixels
    sub = np.flatnonzero((ys // pixel_stride % stride == 0) & (xs // pixel_stride % stride == 0))
    if len(sub) < D:  # too few rows for a full-rank H: all pixels
        sub = np.arange(cnt)
    sub_t = torch.as_tensor(sub)
    ip = _take(inv_pix, sub_t)  # (Ps, 3)
    dc = _take(dcol, sub_t)  # (Ps, channel, corner, coord)
    parts = [torch.einsum("pckd,pkdg->pcg", dc, _take(Dpose, ip)[:, :, :nd])]
    irr_p = torch.einsum("pck,pkcg->pcg", _take(al, sub_t), _take(Dirr, ip))  # via irradiance
    parts[0][:, :, :3] += irr_p[:, :, :3]
    if m:
        C = torch.einsum("pckd,pkdj->pckj", dc, _take(MR, ip)[:, :, :nd])  # d colour / d point
        Bp = sc.basis_rows(torch.as_tensor(used[inv[:corners_all.size].reshape(-1, 3)[sub]]),
                           nk, ne)  # (Ps, corner, 3, m)
        parts.append(torch.einsum("pckj,pkjm->pcm", C, Bp) + irr_p[:, :, 3:])
    parts.append(alb[sub_t][:, :, None] * ysh[sub_t][:, None, :])  # SH of the own channel
    J = torch.cat(parts, -1)  # (Ps, channel, G + 9)
    # IRLS weights (the Charbonnier's majorizer): measured to converge in far fewer
    # iterations than its exact curvature eps^2 / rho^3 or eps / rho^2
    ws = wgt[sub_t] / len(sub)
    for c in range(3):
        Jc = J[:, c].contiguous()
        Hc = ((Jc * ws[:, c:c + 1]).T @ Jc).double()  # over [geometry G, this channel's SH]
        sh = slice(G + 9 * c, G + 9 * c + 9)  # blocks by slices: no index_put
        H[:G, :G] += Hc[:G, :G]
        H[:G, sh] += Hc[:G, G:]
        H[sh, :G] += Hc[G:, :G]
        H[sh, sh] += Hc[G:, G:]
    return H, g


def _step(p: Params, delta: torch.Tensor, nk: int, ne: int, persp: bool) -> Params:
    q = Params(*(getattr(p, f).clone() for f in p.__dataclass_fields__))
    nt = p.trans.shape[0]
    d = delta.float()
    q.angles += d[:3]
    q.trans += d[3:3 + nt]
    o = 3 + nt
    if not persp:
        q.log_sf += d[o]
        o += 1
    q.a_w[:nk] += d[o:o + nk]
    q.b_w[:ne] += d[o + nk:o + nk + ne]
    q.sh += d[o + nk + ne:]
    return q


def extension(e0: float, slope: float, e1: float, max_scale: float) -> float:
    """Step length along an accepted LM step from the parabola through the current energy
    ``e0``, the directional derivative ``slope`` (g . delta < 0) and the energy ``e1`` at the
    full step: its minimiser, clipped to [1, max_scale] (1: no extension worth a render).

    Why: the IRLS model of the Charbonnier overestimates the curvature along the step 2-4x
    on real photos (most residuals sit far beyond eps, where the majorizer's weight 1 / rho
    exceeds the true eps^2 / rho^3), so the full GN step lands short of the 1-D minimum."""
    c = e1 - e0 - slope  # curvature coefficient of E(a) = e0 + slope a + c a^2
    if not (slope < 0 and math.isfinite(c)) or c <= 0:
        return max_scale if slope < 0 and math.isfinite(e1) and e1 < e0 else 1.0
    return float(min(max(-slope / (2 * c), 1.0), max_scale))


def levenberg_marquardt(sc: Scene, params: Params, iters: int, n_modes: int | None,
                        fit_shape: bool, tol: float = 1e-5, stride: int = 1,
                        max_extension: float = 1.0, pixel_stride: int = 1
                        ) -> tuple[Params, np.ndarray, np.ndarray, np.ndarray]:
    """Run up to ``iters`` LM iterations per image (stops on its own when a step lowers its
    energy by < ``tol`` x (1 + energy), or the damping saturates).

    ``max_extension`` > 1: after an accepted step, one more render at the step length
    :func:`extension` predicts (at most ``max_extension`` x the step); the lower of the two
    points is kept (per image, on the exact energy).

    ``pixel_stride`` > 1: the gradient and the Gauss-Newton matrix from the masked pixels on
    that grid only (``stride`` then counts that grid's rows); every energy that accepts or
    rejects a step still sums all masked pixels.

    Returns (params, photometric L1 (N,), iterations (N,), dead_step (N,): the iteration at
    which the image turned non-finite, -1 if never)."""
    from facecorpus.renderers.raster import rasterize

    N = params.angles.shape[0]
    K, E = params.a_w.shape[1], params.b_w.shape[1]
    nk = (K if n_modes is None else min(n_modes, K)) if fit_shape else 0
    ne = (E if n_modes is None else min(n_modes, E)) if fit_shape else 0

    def raster(svs):
        k = sc.R / sc.S
        sv = torch.stack(svs) * torch.tensor([k, k, 1.0])
        return rasterize(sv.numpy(), sc.tris, sc.R, sc.R,
                         perspective_correct=sc.persp).pix_to_face

    dead_step = np.full(N, -1)
    its = np.zeros(N, int)
    l1 = np.full(N, np.nan, np.float32)
    mu = np.full(N, MU0)
    states: list[_State | None] = [None] * N
    cache: list = [None] * N  # (H, g) at the current point
    with torch.no_grad():
        geo = [_geometry(sc, params.row(i)) for i in range(N)]
    ok = [i for i in range(N) if torch.isfinite(geo[i][2]).all()]
    for i in set(range(N)) - set(ok):
        dead_step[i] = 0
    if ok:
        p2f = raster([geo[i][2] for i in ok])
        for j, i in enumerate(ok):
            st = _evaluate(sc, i, params.row(i), *geo[i], p2f[j])
            if not math.isfinite(st.energy):
                dead_step[i] = 0
                continue
            states[i], l1[i] = st, st.l1
    active = [i for i in range(N) if states[i] is not None]
    for it in range(iters):
        trials, slopes = {}, {}
        for i in active:
            p = params.row(i)
            if cache[i] is None:
                cache[i] = _normal_equations(sc, i, p, states[i], nk, ne, stride,
                                             pixel_stride)
            H, g = cache[i]
            if not (torch.isfinite(H).all() and torch.isfinite(g).all()):
                dead_step[i] = it
                continue
            dg = H.diagonal().clamp(min=1e-9 * float(H.diagonal().max().clamp(min=1e-12)))
            try:
                delta = torch.linalg.solve(H + mu[i] * torch.diag(dg), -g)
            except RuntimeError:
                mu[i] *= 4
                continue
            trials[i] = _step(p, delta, nk, ne, sc.persp)
            slopes[i] = (delta, float(g @ delta))
        active = [i for i in active if dead_step[i] < 0]
        if not trials:
            break
        with torch.no_grad():
            tg = {i: _geometry(sc, q) for i, q in trials.items()}
        fin = [i for i in trials if torch.isfinite(tg[i][2]).all()]
        p2f = raster([tg[i][2] for i in fin]) if fin else None
        done = []
        ext = {}  # image -> (start energy, longer trial)
        for i, trial in trials.items():
            st = (_evaluate(sc, i, trial, *tg[i], p2f[fin.index(i)]) if i in fin
                  else None)
            e0 = states[i].energy
            if (max_extension > 1 and st is not None and math.isfinite(st.energy)
                    and st.energy < e0):
                a = extension(e0, slopes[i][1], st.energy, max_extension)
                if a > 1.05:
                    ext[i] = _step(params.row(i), a * slopes[i][0], nk, ne, sc.persp)
            trials[i] = (trial, st)
        if ext:
            with torch.no_grad():
                tg = {i: _geometry(sc, q) for i, q in ext.items()}
            fin = [i for i in ext if torch.isfinite(tg[i][2]).all()]
            p2f = raster([tg[i][2] for i in fin]) if fin else None
            for i in fin:
                st = _evaluate(sc, i, ext[i], *tg[i], p2f[fin.index(i)])
                if math.isfinite(st.energy) and st.energy < trials[i][1].energy:
                    trials[i] = (ext[i], st)
        for i, (trial, st) in trials.items():
            its[i] = it + 1
            e0 = states[i].energy
            if st is not None and math.isfinite(st.energy) and st.energy < e0:
                params.put(i, trial)
                states[i], l1[i], cache[i] = st, st.l1, None
                mu[i] = max(mu[i] / 3, 1e-7)
                if e0 - st.energy < tol * (1 + e0):
                    done.append(i)
            else:
                mu[i] *= 4
                if mu[i] > 1e6:
                    done.append(i)
        active = [i for i in active if i not in done]
        if not active:
            break
    return params, l1, its, dead_step


def build(model, fit, images: np.ndarray, masks: np.ndarray, albedo_uv: np.ndarray,
          landmarks: np.ndarray, opts) -> tuple[Scene, Params]:
    """The :class:`Scene` and :class:`Params` of ``fit`` (a ``tasks.fit.FitResult``) for
    stage 2 with ``opts`` (a ``FitConfig``): the photo and mask at the render size and the
    fit's parameters; ``sh`` the fit's if it has them, else ambient light matched to the
    photo's brightness over the mask (the Adam path's start)."""
    from facecorpus.renderers.shading import A0, C0

    N, S = images.shape[0], fit.image_size
    persp = fit.camera == "perspective"
    K, E = fit.alpha.shape[1], fit.beta.shape[1]
    dt = torch.float32
    R_ = int(opts.photometric_render_size or S)
    imgs, msk = resize_targets(images, masks, R_)
    tris = np.asarray(model.triangles, np.int64)
    tex = torch.as_tensor(np.asarray(albedo_uv, np.float32))
    sc = Scene(torch.as_tensor(imgs), torch.as_tensor(msk), tex, tris, torch.as_tensor(tris),
               torch.as_tensor(model.uv[model.uv_triangles], dtype=dt),
               torch.as_tensor(model.vertices, dtype=dt),
               torch.as_tensor(model.id_basis[:K], dtype=dt),
               torch.as_tensor(model.exp_basis[:E], dtype=dt),
               torch.as_tensor(model.id_std[:K], dtype=dt),
               torch.as_tensor(model.exp_std[:E], dtype=dt),
               torch.as_tensor(np.asarray(model.landmarks, np.int64)),
               torch.as_tensor(np.asarray(landmarks, np.float32)), S, R_, persp,
               opts.photometric_charbonnier_eps, opts.photometric_w_landmarks,
               opts.photometric_w_prior)
    if fit.sh is not None:
        sh0 = np.asarray(fit.sh, np.float32)
    else:
        sh0 = np.zeros((N, 27), np.float32)
        for i in range(N):
            m = msk[i]
            if m.any():
                ratio = imgs[i][m].mean(0) / np.maximum(
                    np.asarray(albedo_uv[i], np.float32).reshape(-1, 3).mean(0), 1e-3)
                sh0[i, 0::9] = (ratio / (A0 * C0)).clip(0.05, 5)
            else:
                sh0[i, 0::9] = 1.0 / (A0 * C0)
    sf0 = fit.focal if persp else fit.scale
    p = Params(torch.tensor(np.deg2rad(np.c_[fit.yaw, fit.pitch, fit.roll]), dtype=dt),
               torch.tensor(fit.translation / T_SCALE, dtype=dt),
               torch.tensor(np.log(sf0), dtype=dt),
               torch.tensor(fit.alpha / model.id_std[:K], dtype=dt),
               torch.tensor(fit.beta / model.exp_std[:E], dtype=dt), torch.tensor(sh0))
    return sc, p


def energy(model, fit, images: np.ndarray, masks: np.ndarray, albedo_uv: np.ndarray,
           landmarks: np.ndarray, opts) -> np.ndarray:
    """(N,) stage-2 energy (module docstring) of a stage-2 ``fit`` (with ``sh``): the one
    number both solvers minimise, to compare them. NaN for a non-finite image."""
    from facecorpus.renderers.raster import rasterize

    sc, p = build(model, fit, images, masks, albedo_uv, landmarks, opts)
    out = np.full(len(fit), np.nan)
    k = sc.R / sc.S
    with torch.no_grad():
        for i in range(len(fit)):
            q = p.row(i)
            geo = _geometry(sc, q)
            if not torch.isfinite(geo[2]).all():
                continue
            p2f = rasterize((geo[2] * torch.tensor([k, k, 1.0]))[None].numpy(), sc.tris,
                            sc.R, sc.R, perspective_correct=sc.persp).pix_to_face[0]
            out[i] = _evaluate(sc, i, q, *geo, p2f).energy
    return out
