"""Photos of one subject fitted together (issue #13 item 4): one identity per subject.

Rows sharing a ``subject_id`` share the identity coefficients ``alpha``; expression
``beta_i`` and pose (yaw, pitch, roll, translation, scale or focal) stay per photo. Start:
the per-photo stage-1 fits (``tasks.fit.fit_landmarks``), ``alpha`` their mean. Then
Levenberg-Marquardt on the joint landmark energy of the subject's photos

    E = sum_i sum_k w_k |proj_i(X_i[v_ik]) - l_ik|^2 / sigma^2
        + |alpha / std_id|^2 + sum_i |beta_i / std_exp|^2,
    X_i = mean + A alpha + B beta_i,

with ``sigma`` = ``FitConfig.sigma_px`` (1 % of the image size when None), ``w_k`` =
``FitConfig.jaw_weight`` on the 17 jaw landmarks and 1 elsewhere, ``v_ik`` the landmark
vertices the per-photo fit settled on (its sliding-jaw correspondences, kept fixed). Plain
least squares (no Huber): photos of one subject are fitted together to pool evidence, an
outlier photo is rejected by the per-photo checks before. The pose block's Jacobian is taken
by central differences through ``FitResult.camera_for`` (so both camera kinds and their
conventions come from ``tasks.fit`` itself), the shape block's through the projection's
point Jacobian times the bases.

Shapes: N photos of one subject, K identity modes, E expression modes, 68 landmarks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from facecorpus.meshops.model import MorphableModel
from facecorpus.tasks.fit import FitResult, fit_landmarks, inter_ocular

_POSE = ("yaw", "pitch", "roll")


def _pose_vector(fit: FitResult, i: int) -> np.ndarray:
    s = fit.focal[i] if fit.camera == "perspective" else fit.scale[i]
    return np.r_[fit.yaw[i], fit.pitch[i], fit.roll[i], fit.translation[i], s].astype(
        np.float64)


def _with_pose(fit: FitResult, i: int, p: np.ndarray) -> FitResult:
    """A one-photo FitResult at pose vector ``p`` (for projecting only)."""
    nt = fit.translation.shape[1]
    f = fit.select([i])
    kw = {"yaw": np.array([p[0]]), "pitch": np.array([p[1]]), "roll": np.array([p[2]]),
          "translation": np.array([p[3:3 + nt]])}
    kw["focal" if fit.camera == "perspective" else "scale"] = np.array([p[3 + nt]])
    return dataclasses.replace(f, **kw)


def _project(fit: FitResult, i: int, p: np.ndarray, X: np.ndarray) -> np.ndarray:
    return _with_pose(fit, i, p).camera_for(0).project(X)[:, :2].astype(np.float64)


def fit_subject(model: MorphableModel, fit: FitResult, landmarks: np.ndarray, cfg,
                iters: int = 20) -> FitResult:
    """Refit one subject's photos with one shared identity (module docstring).

    Args:
        fit: the per-photo stage-1 fits of the N photos (all usable: no ``failure``).
        landmarks: (N, 68, 2) their target landmarks (pixels). cfg: ``FitConfig``.

    Returns:
        A :class:`FitResult` whose ``alpha`` rows are all equal; pose, ``beta``, landmark
        errors per photo. ``converged`` keeps the per-photo value and is False when no LM
        step lowered the joint energy.
    """
    N = len(fit)
    lm = np.asarray(landmarks, np.float64).reshape(N, 68, 2)
    K, E = fit.alpha.shape[1], fit.beta.shape[1]
    if N < 2:
        return fit
    A = np.asarray(model.id_basis[:K], np.float64)  # (K, V, 3)
    B = np.asarray(model.exp_basis[:E], np.float64)
    sid = np.maximum(np.asarray(model.id_std[:K], np.float64), 1e-12)
    sex = np.maximum(np.asarray(model.exp_std[:E], np.float64), 1e-12)
    sigma = cfg.sigma_px or 0.01 * fit.image_size
    w = np.ones(68)
    w[:17] = cfg.jaw_weight
    sw = np.sqrt(np.repeat(w, 2)) / sigma  # (136,) residual weights
    lmv = (np.asarray(fit.landmark_vertices, np.int64) if fit.landmark_vertices is not None
           else np.tile(np.asarray(model.landmarks, np.int64), (N, 1)))
    mean = np.asarray(model.vertices, np.float64)
    P = 3 + fit.translation.shape[1] + 1
    alpha = np.asarray(fit.alpha, np.float64).mean(0)
    beta = np.asarray(fit.beta, np.float64).copy()
    pose = np.stack([_pose_vector(fit, i) for i in range(N)])
    n_x = K + N * (E + P)

    def points(i, a, b):
        v = lmv[i]
        return (mean[v] + np.tensordot(a, A[:, v], (0, 0)) + np.tensordot(b, B[:, v], (0, 0)))

    def energy(a, b, ps):
        e = (a / sid) @ (a / sid) + ((b / sex) ** 2).sum()
        for i in range(N):
            r = (_project(fit, i, ps[i], points(i, a, b[i])) - lm[i]).reshape(-1) * sw
            e += r @ r
        return e

    mu, e_cur, improved = 1e-3, energy(alpha, beta, pose), False
    for _ in range(iters):
        J = np.zeros((N * 136, n_x))
        r = np.zeros(N * 136)
        for i in range(N):
            X = points(i, alpha, beta[i])
            rows = slice(136 * i, 136 * (i + 1))
            uv = _project(fit, i, pose[i], X)
            r[rows] = (uv - lm[i]).reshape(-1) * sw
            # d uv_k / d X_k (68, 2, 3) by central differences (the camera is affine or
            # pinhole in X: exact up to rounding for the first, O(h^2) for the second)
            h = 1e-3
            dX = np.zeros((68, 2, 3))
            for c in range(3):
                d = np.zeros(3)
                d[c] = h
                dX[:, :, c] = (_project(fit, i, pose[i], X + d)
                               - _project(fit, i, pose[i], X - d)) / (2 * h)
            Ji = np.einsum("kuc,mkc->kum", dX, A[:, lmv[i]]).reshape(136, K)
            J[rows, :K] = Ji * sw[:, None]
            o = K + i * (E + P)
            Je = np.einsum("kuc,mkc->kum", dX, B[:, lmv[i]]).reshape(136, E)
            J[rows, o:o + E] = Je * sw[:, None]
            for q in range(P):
                hp = 1e-3 * max(1.0, abs(pose[i, q]))
                d = np.zeros(P)
                d[q] = hp
                J[rows, o + E + q] = ((_project(fit, i, pose[i] + d, X)
                                       - _project(fit, i, pose[i] - d, X)).reshape(-1)
                                      / (2 * hp)) * sw
        prior = np.zeros(n_x)
        prior[:K] = 1 / sid**2
        g = J.T @ r
        g[:K] += alpha / sid**2
        for i in range(N):
            o = K + i * (E + P)
            prior[o:o + E] = 1 / sex**2
            g[o:o + E] += beta[i] / sex**2
        H = J.T @ J + np.diag(prior)
        for _try in range(8):
            try:
                step = -np.linalg.solve(H + mu * np.diag(np.diag(H) + 1e-9), g)
            except np.linalg.LinAlgError:
                mu *= 10
                continue
            a2 = alpha + step[:K]
            b2, p2 = beta.copy(), pose.copy()
            for i in range(N):
                o = K + i * (E + P)
                b2[i] += step[o:o + E]
                p2[i] += step[o + E:o + E + P]
            e2 = energy(a2, b2, p2)
            if np.isfinite(e2) and e2 < e_cur:
                done = e_cur - e2 < cfg.tol * (1 + e_cur)
                alpha, beta, pose, e_cur, improved = a2, b2, p2, e2, True
                mu = max(mu / 10, 1e-9)
                break
            mu *= 10
        else:
            break
        if done:
            break
    out = dataclasses.replace(fit.select(np.arange(N)))
    nt = fit.translation.shape[1]
    out.alpha = np.tile(alpha, (N, 1)).astype(fit.alpha.dtype)
    out.beta = beta.astype(fit.beta.dtype)
    out.yaw, out.pitch, out.roll = (pose[:, j].astype(fit.yaw.dtype) for j in range(3))
    out.translation = pose[:, 3:3 + nt].astype(fit.translation.dtype)
    if fit.camera == "perspective":
        out.focal = pose[:, 3 + nt].astype(fit.focal.dtype)
    else:
        out.scale = pose[:, 3 + nt].astype(fit.scale.dtype)
    rmse = np.array([np.sqrt(((_project(out, i, _pose_vector(out, i), points(i, alpha, beta[i]))
                               - lm[i]) ** 2).sum(-1).mean()) for i in range(N)])
    out.landmark_rmse = rmse.astype(np.float32)
    out.landmark_nme = (rmse / np.maximum(inter_ocular(lm), 1e-6)).astype(np.float32)
    out.converged = np.asarray(fit.converged, bool) & improved
    return out


def fit_joint(model: MorphableModel, fit: FitResult, landmarks: np.ndarray,
              subjects, cfg) -> FitResult:
    """Every subject's photos refitted with one identity (:func:`fit_subject`); photos with
    an empty subject id, alone in their subject or with a failed per-photo fit keep it. A
    subject whose joint fit raises gets a ``failure`` on each of its photos (the caller's
    fit checks reject them); the other subjects are unaffected.

    Args:
        fit: per-photo stage-1 fits (N); landmarks: (N, 68, 2); subjects: (N,) str.

    Returns:
        A :class:`FitResult` (N), rows in the input order.
    """
    subjects = np.asarray([str(s) for s in subjects])
    out = fit.select(np.arange(len(fit)))
    fails = fit.failure
    for s in sorted(set(subjects) - {""}):
        idx = np.flatnonzero((subjects == s) & np.array([f is None for f in fails]))
        if len(idx) < 2:
            continue
        try:
            j = fit_subject(model, fit.select(idx), np.asarray(landmarks)[idx], cfg)
        except Exception as e:  # noqa: BLE001 - one subject's failure rejects its photos only
            for i in idx:
                out.failure[i] = f"joint fit of subject {s!r} failed ({type(e).__name__}: {e})"
            continue
        for fld in dataclasses.fields(out):
            v = getattr(out, fld.name)
            if isinstance(v, np.ndarray) and v.shape[:1] == (len(fit),):
                v[idx] = getattr(j, fld.name)
    return out


def fit_photos(model: MorphableModel, landmarks: np.ndarray, image_size: int, subjects,
               cfg) -> FitResult:
    """Per-photo stage 1 then :func:`fit_joint`: the pure batch function of the joint fit."""
    fit = fit_landmarks(model, landmarks, image_size, cfg)
    return fit_joint(model, fit, landmarks, subjects, cfg)
