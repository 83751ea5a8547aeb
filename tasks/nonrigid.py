"""Non-rigid refinement after the 3DMM fit (issue #13 item 1, seed method 003).

Per image, jointly over a focal scale ``fs`` (pinhole ``K`` with focal ``fs * f``,
``f = max(H, W)``, principal point at the image centre), a rotation update ``q`` (vector
part of a unit quaternion, applied on the left of the EPnP rotation), translation ``t`` (mm),
expression weights ``beta`` and a per-vertex corrective field ``dP`` (V, 3) mm:

    E = E_l + w_c E_c + w_r E_r
    E_l = sum_k |proj(P_F[v_k]) - l_k|^2 (100 / W_eye)^2     (W_eye: outer eye corners, px)
    E_c = Q(B (beta - beta^{t-1}) + dP) + lambda_d R(dP)       (the Laplacian term)
    E_r = sum_e beta_e^2 / sigma_e^2 + lambda_f log^2(fs) + lambda_q |q|^2

with ``P_F = P + B beta + dP`` (``P`` the fitted identity shape, ``B`` the expression basis),
``Q(d) = |Delta d|^2`` and ``R(d) = |d|^2`` surface means (``meshops.laplacian
.smoothness_forms``, the surface area normalised to 1, the Laplace-Beltrami operator on the
mean shape measured in units of its outer-eye-corner distance W3) of a field measured in
units of ``cfg.field_unit x W3``. The published weights carry no units; with this
normalisation and ``field_unit = 0.05`` they balance the terms (measured on synthetic faces:
at 0.01 the Laplacian term alone holds the field to ~10 % of the truth's amplitude). ``v_k`` are the model's landmark vertices; the jaw
landmarks of the side turned away slide on the contour candidates (``tasks.fit``).

Start: EPnP (``cv2.solvePnP(..., SOLVEPNP_EPNP)``) of the fitted shape's landmark vertices
with ``fs = 1``, ``beta`` = the fit's, ``dP = 0`` (``beta^0``: the fit's). Gauss-Newton,
``iterations`` steps (each accepted only if it lowers E, else halved up to 4 times).

Sparse structure. dP appears in E_l only at the landmark/contour vertices (set ``l``); the
rest (``f``) only in the quadratic E_c, so it is eliminated exactly once per model: the
Schur complement of E_c onto ``(dP_l, beta)`` is a small dense matrix, and ``dP_f`` follows
from ``dP_l`` and the last ``beta`` step through precomputed sparse solves. Each image's
Gauss-Newton system is then ``7 + E + 3 |l|`` unknowns (dense, ~360 for ICT-FaceKit).

Shapes: N images, V vertices, E expression modes fitted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.model import MorphableModel
from facecorpus.renderers.cameras import Camera, rotation_to_euler
from facecorpus.tasks.fit import FitResult

log = logging.getLogger(__name__)
_D = np.diag([1.0, -1.0, -1.0])  # OpenCV camera (y down, z forward) <-> ours (y up, -z)


@dataclass
class NonrigidResult:
    """Per image: ``vertices`` (N, V, 3) float32 refined mesh ``P + B beta + dP`` (mm);
    ``vertex_offsets`` (N, V, 3) float32 the corrective field dP; ``beta`` (N, E);
    ``focal_scale`` (N,) fs and ``focal`` (N,) = fs * max(H, W) px; ``rotation`` (N, 3, 3)
    and ``translation`` (N, 3) mm (``renderers.cameras`` conventions, perspective);
    ``landmark_rmse_before`` / ``_after`` (N,) px and ``landmark_nme_before`` / ``_after``
    (rmse / outer-eye-corner distance); ``landmark_vertices`` (N, 68); ``failure`` (N,)
    object None or why the refinement must not be used (then the image keeps its start:
    zero offsets, the EPnP camera when there is one). ``width``, ``height`` image size."""

    vertices: np.ndarray
    vertex_offsets: np.ndarray
    beta: np.ndarray
    focal_scale: np.ndarray
    focal: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    landmark_rmse_before: np.ndarray
    landmark_rmse_after: np.ndarray
    landmark_nme_before: np.ndarray
    landmark_nme_after: np.ndarray
    landmark_vertices: np.ndarray
    failure: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.focal)

    def camera_for(self, i: int) -> Camera:
        """The perspective :class:`Camera` of image ``i``."""
        return Camera.perspective(self.width, self.height, float(self.focal[i]),
                                  rotation=self.rotation[i], translation=self.translation[i],
                                  cx=self.width / 2.0, cy=self.height / 2.0)

    def angles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(yaw, pitch, roll) (N,) degrees of the refined rotations."""
        return rotation_to_euler(self.rotation)

    def as_fit_result(self, fit):
        """The refined camera and ``beta`` as a perspective
        :class:`facecorpus.tasks.fit.FitResult` (identity, SH and iterations from ``fit``;
        landmark errors and ``failure`` the refinement's). Its ``vertices(model, i)`` is the
        3DMM part only: use :attr:`vertices` (with ``vertex_offsets``) for the mesh.
        Square images only (FitResult has one ``image_size``)."""
        from dataclasses import replace

        if self.width != self.height:
            raise ValueError(f"FitResult needs a square image, got {self.width}x{self.height}")
        yaw, pitch, roll = self.angles()
        ok = np.array([f is None for f in self.failure])
        return replace(
            fit, camera="perspective", image_size=self.width,
            yaw=yaw.astype(np.float32), pitch=pitch.astype(np.float32),
            roll=roll.astype(np.float32), translation=self.translation.astype(np.float32),
            scale=np.zeros(len(self), np.float32), focal=self.focal.astype(np.float32),
            beta=self.beta.astype(np.float32), landmark_rmse=self.landmark_rmse_after,
            landmark_nme=self.landmark_nme_after,
            converged=np.asarray(fit.converged, bool) & ok, failure=self.failure.copy())


def refined_fit(fit, nr: NonrigidResult) -> RefinedFit:
    """``fit`` with the refinement's camera, ``beta`` and corrective field: a
    :class:`RefinedFit` whose ``vertices(model, i)`` is the refined mesh."""
    f = nr.as_fit_result(fit)
    kw = {k: getattr(f, k) for k in f.__dataclass_fields__}
    return RefinedFit(**kw, vertex_offsets=nr.vertex_offsets.astype(np.float32),
                      focal_scale=nr.focal_scale.astype(np.float32))


@dataclass
class RefinedFit(FitResult):
    """A :class:`facecorpus.tasks.fit.FitResult` (perspective) plus the corrective field:
    ``vertex_offsets`` (N, V, 3) float32 mm, ``focal_scale`` (N,) fs. ``vertices`` is
    ``P + B beta + dP``, so every consumer of a fit (unwrap, masks, shading, re-render)
    uses the refined mesh; ``select`` and concatenation keep the extra arrays."""

    vertex_offsets: np.ndarray = None  # type: ignore[assignment]
    focal_scale: np.ndarray = None  # type: ignore[assignment]

    def vertices(self, model: MorphableModel, i: int) -> np.ndarray:
        return (model.shape(self.alpha[i], self.beta[i])
                + self.vertex_offsets[i]).astype(np.float32)


# ------------------------------------------------------------------ per-model precompute
@dataclass
class _Reduced:
    l_idx: np.ndarray  # (nl,) vertices kept as unknowns (landmarks + contour candidates)
    f_idx: np.ndarray  # (nf,) the others
    S: np.ndarray  # (3 nl + E, 3 nl + E) Schur complement of E_c on [dP_l (nl, 3) flat, beta]
    X_l: np.ndarray  # (nf, nl): dP_f[:, c] = -(X_l dP_l[:, c] + X_b[c] dbeta)
    X_b: np.ndarray  # (3, nf, E)


_CACHE: dict = {}
_LOCK = threading.Lock()


def _reduced(model: MorphableModel, E: int, kind: str, lambda_d: float, field_unit: float
             ) -> _Reduced:
    key = (id(model), E, kind, float(lambda_d), float(field_unit))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
    red = _build_reduced(model, E, kind, lambda_d, field_unit)
    with _LOCK:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = (model, red)
    return red


def eye_distance_mm(model: MorphableModel) -> float:
    """W3: the mean shape's 3D outer-eye-corner distance (mm)."""
    v = model.vertices[np.asarray(model.landmarks)[[36, 45]]].astype(np.float64)
    return float(np.linalg.norm(v[0] - v[1]))


def _build_reduced(model: MorphableModel, E: int, kind: str, lambda_d: float,
                   field_unit: float) -> _Reduced:
    import scipy.sparse.linalg as spl
    from facecorpus.meshops.laplacian import smoothness_forms

    V = model.n_vertices
    w3 = eye_distance_mm(model)
    u = field_unit * w3
    K, Mr = smoothness_forms(model.vertices, model.triangles, kind, unit=w3)
    # the forms act on fields in units u; in mm they scale by 1 / u^2
    K, Mr = K / u**2, Mr / u**2
    H = (K + lambda_d * Mr).tocsc()
    l_idx = np.unique(np.concatenate([np.asarray(model.landmarks), model.contour_right,
                                      model.contour_left]).astype(np.int64))
    f_mask = np.ones(V, bool)
    f_mask[l_idx] = False
    f_idx = np.flatnonzero(f_mask)
    nl = len(l_idx)
    B = np.asarray(model.exp_basis[:E], np.float64).transpose(2, 1, 0)  # (3, V, E)
    KB = np.stack([K @ B[c] for c in range(3)])  # (3, V, E)
    Hff = H[f_idx][:, f_idx].tocsc()
    Hfl = H[f_idx][:, l_idx].toarray()
    lu = spl.splu(Hff)
    rhs = np.concatenate([Hfl] + [KB[c][f_idx] for c in range(3)], 1)
    sol = lu.solve(rhs) if len(f_idx) else rhs
    X_l = sol[:, :nl]
    X_b = np.stack([sol[:, nl + c * E: nl + (c + 1) * E] for c in range(3)])
    Hll = H[l_idx][:, l_idx].toarray()
    S_ll = Hll - Hfl.T @ X_l
    n = 3 * nl + E
    S = np.zeros((n, n))
    for c in range(3):
        sl = np.arange(nl) * 3 + c
        S[np.ix_(sl, sl)] = S_ll
        S_lb = KB[c][l_idx] - Hfl.T @ X_b[c]
        S[sl, 3 * nl:] = S_lb
        S[3 * nl:, sl] = S_lb.T
        S[3 * nl:, 3 * nl:] += B[c].T @ KB[c] - KB[c][f_idx].T @ X_b[c]
    S = 0.5 * (S + S.T)
    return _Reduced(l_idx, f_idx, S, X_l, X_b)


# ------------------------------------------------------------------ helpers
def _quat_to_rot(q: np.ndarray) -> np.ndarray:
    """Vector part (3,) of a unit quaternion (|q| <= 1, real part >= 0) -> (3, 3)."""
    from scipy.spatial.transform import Rotation

    n = float(np.linalg.norm(q))
    if n > 1.0:
        q = q / n
        n = 1.0
    w = np.sqrt(max(0.0, 1.0 - n * n))
    return Rotation.from_quat([q[0], q[1], q[2], w]).as_matrix()


def _rot_to_quat(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(R).as_quat()
    return np.array([x, y, z]) * (1.0 if w >= 0 else -1.0)


def _skew(a: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    o = np.zeros(a.shape[:-1])
    return np.stack([o, -a[..., 2], a[..., 1], a[..., 2], o, -a[..., 0],
                     -a[..., 1], a[..., 0], o], -1).reshape(a.shape[:-1] + (3, 3))


def _project(P, R, t, F, cx, cy):
    """Model points (n, 3) -> pixels (n, 2), camera points (n, 3)."""
    Xc = P @ R.T + t
    d = -Xc[:, 2]
    return np.stack([cx + F * Xc[:, 0] / d, cy - F * Xc[:, 1] / d], -1), Xc


def _epnp(X: np.ndarray, x: np.ndarray, f: float, cx: float, cy: float):
    """EPnP pose of model points X (68, 3) seen at pixels x (68, 2): (R, t) in our
    conventions, or None."""
    import cv2

    K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    ok, rvec, tvec = cv2.solvePnP(X.astype(np.float64), x.astype(np.float64), K, None,
                                  flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        return None
    Rcv, _ = cv2.Rodrigues(rvec)
    R, t = _D @ Rcv, _D @ tvec.reshape(3)
    if not (np.isfinite(R).all() and np.isfinite(t).all()) or t[2] >= 0:
        return None
    return R, t


def _rmse(a, b) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


def _landmark_rmse_of_fit(model, fit, i, lm) -> float:
    v = fit.vertices(model, i)
    idx = (fit.landmark_vertices[i] if fit.landmark_vertices is not None
           else model.landmarks)
    return _rmse(fit.camera_for(i).project(v[idx])[:, :2].astype(np.float64), lm)


# ------------------------------------------------------------------ the solver
def refine_nonrigid(model: MorphableModel, fit, landmarks: np.ndarray, image_size, cfg=None
                    ) -> NonrigidResult:
    """Refine every image's fit non-rigidly (module docstring); images are independent.

    Args:
        model: the fitted model. fit: :class:`facecorpus.tasks.fit.FitResult` (N images;
            its identity ``alpha`` is kept, its ``beta`` is the start).
        landmarks: (N, 68, 2) target pixels. image_size: S or (H, W).
        cfg: :class:`facecorpus.configs.nonrigid.NonrigidConfig` (None: the defaults).

    Returns:
        :class:`NonrigidResult`. An image whose stage-1 fit failed, whose EPnP start fails
        or whose refinement is non-finite or ends above ``cfg.max_nme`` gets a ``failure``
        reason (the others are unaffected).
    """
    from facecorpus.configs.nonrigid import NonrigidConfig
    from facecorpus.tasks.fit import _slide_jaw, inter_ocular

    cfg = cfg or NonrigidConfig()
    H_img, W_img = (image_size, image_size) if np.isscalar(image_size) else image_size
    H_img, W_img = int(H_img), int(W_img)
    f0 = float(max(H_img, W_img))
    cx, cy = W_img / 2.0, H_img / 2.0
    lm_all = np.asarray(landmarks, np.float64).reshape(-1, 68, 2)
    N = len(lm_all)
    E = int(fit.beta.shape[1])
    V = model.n_vertices
    red = _reduced(model, E, cfg.laplacian, cfg.lambda_d, cfg.field_unit)
    l_idx, nl = red.l_idx, len(red.l_idx)
    pos = np.full(V, -1, np.int64)
    pos[l_idx] = np.arange(nl)
    Bl = np.asarray(model.exp_basis[:E], np.float64)[:, l_idx].transpose(1, 2, 0)  # (nl,3,E)
    B_all = np.asarray(model.exp_basis[:E], np.float64)
    sig2 = np.maximum(np.asarray(model.exp_std[:E], np.float64), 1e-12) ** 2
    fixed_lm = np.asarray(model.landmarks, np.int64)
    cand_r = np.asarray(model.contour_right, np.int64)
    cand_l = np.asarray(model.contour_left, np.int64)
    cand = np.concatenate([cand_r, cand_l])
    nP = 7 + E + 3 * nl
    iE = slice(7, 7 + E)
    iD = slice(7 + E, nP)
    Sfull = np.zeros((nP, nP))
    Sfull[7:, 7:] = np.block([[red.S[3 * nl:, 3 * nl:], red.S[3 * nl:, :3 * nl]],
                              [red.S[:3 * nl, 3 * nl:], red.S[:3 * nl, :3 * nl]]])
    Sfull *= cfg.w_c
    Rdiag = np.zeros(nP)
    Rdiag[0] = cfg.lambda_f
    Rdiag[1:4] = 0.25 * cfg.lambda_q  # q_new ~ q + delta / 2 for the small left update
    Rdiag[iE] = 1.0 / sig2
    Rdiag *= cfg.w_r

    out_v = np.zeros((N, V, 3), np.float32)
    out_d = np.zeros((N, V, 3), np.float32)
    out_b = np.asarray(fit.beta, np.float64).copy()
    out_fs = np.ones(N)
    out_R = np.tile(np.eye(3), (N, 1, 1))
    out_t = np.tile(np.array([0.0, 0.0, -500.0]), (N, 1))
    rmse_b = np.full(N, np.nan)
    rmse_a = np.full(N, np.nan)
    lmv = np.tile(fixed_lm, (N, 1))
    failure = np.full(N, None, object)
    prev_fail = getattr(fit, "failure", None)

    for i in range(N):
        lm = lm_all[i]
        P0 = model.shape(fit.alpha[i], None).astype(np.float64)  # identity shape
        beta = np.asarray(fit.beta[i], np.float64).copy()
        out_v[i] = (P0 + np.tensordot(beta, B_all, (0, 0))).astype(np.float32)
        if prev_fail is not None and prev_fail[i] is not None:
            failure[i] = f"stage-1 fit failed: {prev_fail[i]}"
            continue
        if not np.isfinite(lm).all():
            failure[i] = "landmarks are not finite"
            continue
        try:
            rmse_b[i] = _landmark_rmse_of_fit(model, fit, i, lm)
        except Exception as e:  # noqa: BLE001 - a bad fit row must not stop the batch
            failure[i] = f"stage-1 fit cannot be projected ({e})"
            continue
        w_eye = float(inter_ocular(lm[None])[0])
        if not w_eye > 1e-6:
            failure[i] = "degenerate landmarks: the outer eye corners coincide"
            continue
        wl = (100.0 / w_eye) ** 2
        Pl0 = P0[l_idx]
        Pstart = P0 + np.tensordot(beta, B_all, (0, 0))
        lm_v = (fit.landmark_vertices[i].astype(np.int64)
                if getattr(fit, "landmark_vertices", None) is not None else fixed_lm)
        pose = _epnp(Pstart[lm_v], lm, f0, cx, cy)
        if pose is None:
            failure[i] = "EPnP found no pose in front of the camera"
            continue
        R0, t = pose
        s, q = 0.0, np.zeros(3)
        d_l = np.zeros((nl, 3))
        dbeta_last = np.zeros(E)

        def state_energy(s, q, t, beta, d_l, beta_prev, lm_v, R0=R0, Pl0=Pl0, wl=wl, lm=lm):
            R = _quat_to_rot(q) @ R0
            Pl = Pl0 + Bl @ beta + d_l
            uv, _ = _project(Pl[pos[lm_v]], R, t, f0 * np.exp(s), cx, cy)
            el = wl * ((uv - lm) ** 2).sum()
            z = np.r_[beta - beta_prev, d_l.reshape(-1)]
            ec = z @ Sfull[7:, 7:] @ z
            er = cfg.w_r * (cfg.lambda_f * s * s + cfg.lambda_q * q @ q
                            + (beta**2 / sig2).sum())
            return el + ec + er

        ok = True
        for _it in range(cfg.iterations):
            R = _quat_to_rot(q) @ R0
            F = f0 * np.exp(s)
            if cfg.slide_min_yaw < 90 and len(cand):
                Pc = P0[cand] + np.tensordot(beta, B_all[:, cand], (0, 0)) + d_l[pos[cand]]
                uvc, _ = _project(Pc, R, t, F, cx, cy)
                yaw = rotation_to_euler(R)[0]
                lm_v = _slide_jaw(uvc[None], cand_r, cand_l, lm[None], lm_v[None], fixed_lm,
                                  np.array([yaw]), cfg.slide_min_yaw)[0]
            k = pos[lm_v]  # (68,) slots in l
            Pl = Pl0 + Bl @ beta + d_l
            P = Pl[k]
            uv, Xc = _project(P, R, t, F, cx, cy)
            r = (uv - lm).reshape(-1)  # (136,)
            d = -Xc[:, 2]
            # d(u, v) / d Xc: (68, 2, 3)
            dX = np.zeros((68, 2, 3))
            dX[:, 0, 0] = F / d
            dX[:, 0, 2] = F * Xc[:, 0] / d**2
            dX[:, 1, 1] = -F / d
            dX[:, 1, 2] = -F * Xc[:, 1] / d**2
            J = np.zeros((68, 2, nP))
            J[:, :, 0] = uv - np.array([cx, cy])  # d / d log fs
            J[:, :, 1:4] = dX @ (-_skew(P @ R.T))  # left rotation update
            J[:, :, 4:7] = dX
            dP = dX @ R  # (68, 2, 3) d uv / d model point
            J[:, :, iE] = dP @ Bl[k]
            for c in range(3):
                J[np.arange(68), :, 7 + E + 3 * k + c] = dP[:, :, c]
            J = J.reshape(136, nP)
            A = wl * J.T @ J + Sfull + np.diag(Rdiag)
            x_cur = np.zeros(nP)
            x_cur[iD] = d_l.reshape(-1)  # E_c's beta anchor is this iteration's beta
            g = wl * J.T @ r + Sfull @ x_cur
            g[0] += cfg.w_r * cfg.lambda_f * s
            g[1:4] += cfg.w_r * cfg.lambda_q * 0.5 * q
            g[iE] += cfg.w_r * beta / sig2
            try:
                step = -np.linalg.solve(A, g)
            except np.linalg.LinAlgError:
                ok = False
                break
            if not np.isfinite(step).all():
                ok = False
                break
            e_old = state_energy(s, q, t, beta, d_l, beta, lm_v)
            lam = 1.0
            for _ls in range(5):
                dq = step[1:4] * lam
                Rn = _quat_to_rot(0.5 * dq) @ _quat_to_rot(q)
                qn = _rot_to_quat(Rn)
                sn, tn = s + lam * step[0], t + lam * step[4:7]
                bn = beta + lam * step[iE]
                dn = d_l + lam * step[iD].reshape(nl, 3)
                e_new = state_energy(sn, qn, tn, bn, dn, beta, lm_v)
                if np.isfinite(e_new) and e_new <= e_old:
                    dbeta_last = bn - beta
                    s, q, t, beta, d_l = sn, qn, tn, bn, dn
                    break
                lam *= 0.5
            else:
                break  # no step lowers E: converged (or stuck) here
        R = _quat_to_rot(q) @ R0
        F = f0 * np.exp(s)
        # the eliminated vertices follow the kept ones and the last beta step exactly
        dP_full = np.zeros((V, 3))
        dP_full[l_idx] = d_l
        for c in range(3):
            dP_full[red.f_idx, c] = -(red.X_l @ d_l[:, c] + red.X_b[c] @ dbeta_last)
        verts = P0 + np.tensordot(beta, B_all, (0, 0)) + dP_full
        uv, _ = _project(verts[lm_v], R, t, F, cx, cy)
        ra = _rmse(uv, lm)
        if not ok or not (np.isfinite(verts).all() and np.isfinite(ra)):
            failure[i] = "non-finite non-rigid refinement"
            out_R[i], out_t[i] = R0, t
            continue
        nme = ra / w_eye
        if not nme < cfg.max_nme:
            failure[i] = (f"refined landmark error {nme:.3g} of the inter-ocular distance "
                          f"> {cfg.max_nme:g}")
        out_v[i], out_d[i] = verts.astype(np.float32), dP_full.astype(np.float32)
        out_b[i], out_fs[i], out_R[i], out_t[i] = beta, np.exp(s), R, t
        rmse_a[i] = ra
        lmv[i] = lm_v
    io = np.maximum(inter_ocular(np.nan_to_num(lm_all)), 1e-6)
    return NonrigidResult(
        vertices=out_v, vertex_offsets=out_d, beta=out_b.astype(np.float32),
        focal_scale=out_fs.astype(np.float32), focal=(out_fs * f0).astype(np.float32),
        rotation=out_R, translation=out_t, landmark_rmse_before=rmse_b.astype(np.float32),
        landmark_rmse_after=rmse_a.astype(np.float32),
        landmark_nme_before=(rmse_b / io).astype(np.float32),
        landmark_nme_after=(rmse_a / io).astype(np.float32),
        landmark_vertices=lmv.astype(np.int32), failure=failure, width=W_img, height=H_img)
