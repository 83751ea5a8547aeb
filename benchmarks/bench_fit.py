"""Benchmark of the pseudo-GT fitting stages (stage-1 landmark fit, stage-2 photometric
refinement, unwrap) on synthetic ground truth from the ICT-FaceKit model (procedural model
when ICT is unavailable).

Reference measured in the same run, on the same energy: every image's stage-1 energy
(the same Huber landmark term on the 2D landmark distance, jaw weight, sigma and prior)
minimised by ``scipy.optimize.minimize(method="L-BFGS-B")`` with the exact gradient (torch
autograd), started from the same closed-form init, run to its own tolerances (ftol 1e-12,
gtol 1e-6, up to 2000 iterations). No sliding jaw in either: the synthetic landmarks are
fixed-vertex projections. Besides speed and accuracy against the truth, the energy each
solver reaches is printed (ours minus the reference's, per image).

    FACECORPUS_ASSETS=../shared python benchmarks/bench_fit.py [--n 16] [--size 256]

Stage 2 runs for both solvers in the same process on the same stage-1 fits (``--solver
both``, the default): Adam (``--photometric-iters`` steps) and Levenberg-Marquardt
(``--lm-iters``), each with wall and CPU ms per image, rotation error, landmark RMSE against
the noise-free landmarks, photometric L1 and the stage-2 energy it reached
(``tasks.photometric.energy``); ``--w-landmarks W`` adds both again with that
``photometric_w_landmarks``.

``--extremes`` (issue #16) runs instead one table over landmark-only synthetic faces
(``tasks.fit.synthetic_landmarks``: mediapipe-like dense points with correlated noise of
1.5 % of the face width + 0.4 % i.i.d., far-side points slid to the 2D silhouette, the 68
points = dense[MP478_TO_68] as the flow derives them): the current case (yaw +-60,
orthographic), yaw up to +-80, small faces (90 px wide before the crop), perspective
cameras with f = 1.5 W and f = 0.8 W; per case sparse68 vs dense, fixed vs estimated focal,
orthographic vs perspective fit, median/p90 rotation error against the truth, median NME
of the fitted 68 model landmarks against the truth's (rmse / inter-ocular) and ms per image (all fits in the same process, one torch thread):

    FACECORPUS_ASSETS=../shared python benchmarks/bench_fit.py --extremes [--n 24]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


class ReferenceEnergy:
    """The stage-1 energy of one image, written independently of tasks/fit.py:
    sum_k w_k huber(|P(v_k) - l_k| / sigma; 2) + |a|^2 / 2 + |b|^2 / 2 over the model's fixed
    landmark vertices, parameters [angles (3, rad), t (2, px), log s, a (K,), b (E,)]."""

    def __init__(self, model, lm, S, sigma, K, E, jaw_weight=0.5, delta=2.0):
        import torch

        t64 = torch.float64
        self.X0 = torch.as_tensor(model.vertices[model.landmarks], dtype=t64)
        self.idb = torch.as_tensor(model.id_basis[:K, model.landmarks], dtype=t64)
        self.exb = torch.as_tensor(model.exp_basis[:E, model.landmarks], dtype=t64)
        self.ids = torch.as_tensor(model.id_std[:K], dtype=t64)
        self.exs = torch.as_tensor(model.exp_std[:E], dtype=t64)
        self.lm = torch.as_tensor(lm, dtype=t64)
        self.w = torch.ones(68, dtype=t64)
        self.w[:17] = jaw_weight
        self.S, self.sigma, self.K, self.delta = S, sigma, K, delta

    def __call__(self, p):
        import torch
        from facecorpus.renderers.cameras import euler_to_rotation_torch

        K = self.K
        ang, t, ls, a, b = p[:3], p[3:5], p[5], p[6:6 + K], p[6 + K:]
        X = (self.X0 + torch.einsum("k,kpc->pc", a * self.ids, self.idb)
             + torch.einsum("e,epc->pc", b * self.exs, self.exb))
        R = euler_to_rotation_torch(*torch.rad2deg(ang))
        Y = X @ R.T
        s, c = ls.exp(), self.S / 2.0
        xy = torch.stack([c + s * Y[:, 0] + t[0], c - s * Y[:, 1] - t[1]], -1)
        r = (xy - self.lm).norm(dim=-1) / self.sigma
        d = self.delta
        hub = torch.where(r < d, 0.5 * r**2, d * (r - 0.5 * d))
        return (self.w * hub).sum() + 0.5 * ((a**2).sum() + (b**2).sum())

    def value_and_grad(self, x):
        import torch

        p = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        e = self(p)
        (g,) = torch.autograd.grad(e, p)
        return float(e.detach()), g.numpy()

    def hessian(self, x):
        import torch

        return torch.autograd.functional.hessian(self, torch.as_tensor(x)).numpy()


def reference_fit(energy: ReferenceEnergy, init, method: str = "L-BFGS-B"):
    """Per-image scipy minimisation of :class:`ReferenceEnergy`: "L-BFGS-B" with the exact
    gradient, or "trust-exact" (Newton trust region) with the exact gradient and Hessian.
    Returns (parameters (P,), energy, iterations)."""
    from scipy.optimize import minimize

    ang, t, s = init
    p0 = np.r_[ang, t, np.log(s), np.zeros(energy.K + len(energy.exs))]
    if method == "trust-exact":
        res = minimize(energy.value_and_grad, p0, jac=True, hess=energy.hessian,
                       method="trust-exact", options={"maxiter": 500, "gtol": 1e-6})
    else:
        res = minimize(energy.value_and_grad, p0, jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000, "maxfun": 4000, "ftol": 1e-12, "gtol": 1e-6})
    return res.x, float(res.fun), int(res.nit)


def ours_as_reference_params(fit, i, model):
    """Row i of a FitResult as a :class:`ReferenceEnergy` parameter vector."""
    from facecorpus.renderers.cameras import euler_to_rotation, rotation_to_euler

    y, p, r = rotation_to_euler(euler_to_rotation(fit.yaw[i], fit.pitch[i], fit.roll[i]))
    K = fit.alpha.shape[1]
    return np.r_[np.deg2rad([y, p, r]), fit.translation[i], np.log(fit.scale[i]),
                 fit.alpha[i] / model.id_std[:K], fit.beta[i] / model.exp_std[:fit.beta.shape[1]]]


def main() -> None:
    # One OpenBLAS thread, as the flow's pseudo-GT job computes (PseudoGTJob.blas_threads):
    # with a pool, every small BLAS call of numpy/scipy spins its idle threads, which
    # inflated the absolute ms of both sides here.
    from facecorpus.flows.executors import blas_threads
    from facecorpus.flows.pseudo_gt import PseudoGTJob

    with blas_threads(PseudoGTJob.blas_threads):
        _main()


def _main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--photometric-iters", type=int, default=40, help="Adam steps")
    ap.add_argument("--lm-iters", type=int, default=6, help="LM iterations")
    ap.add_argument("--solver", choices=["both", "adam", "lm"], default="both",
                    help="stage-2 solvers to run (both: Adam and LM, same process)")
    ap.add_argument("--no-stage1-reference", action="store_true",
                    help="skip the scipy stage-1 references (a minute on 2 cores)")
    ap.add_argument("--lm-max-extension", type=float, nargs="+", default=None,
                    help="run LM once per value of photometric_max_extension (1: plain LM)")
    ap.add_argument("--w-landmarks", type=float, default=None, help="also run every solver "
                    "with this photometric_w_landmarks")
    ap.add_argument("--extremes", action="store_true", help="the #16 table (see docstring)")
    args = ap.parse_args()
    from facecorpus.configs.fit import FitConfig
    from facecorpus.renderers.cameras import euler_to_rotation, rotation_to_euler
    from facecorpus.tasks import fit as F
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.unwrap import psnr, unwrap_batch

    try:
        from facecorpus.meshops.ict import load_ict_facekit

        model = load_ict_facekit()
    except Exception as e:  # noqa: BLE001 - benchmark falls back to the fixture
        print(f"ICT unavailable ({e}); procedural model")
        from facecorpus.meshops.procedural import procedural_model

        model = procedural_model()
    S, N = args.size, args.n
    if args.extremes:
        return extremes(model, N, S)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"model {model.name} ({model.n_vertices} vertices, K={model.n_id}, E={model.n_exp});"
          f" {N} images {S}x{S}")
    sb = F.synthetic_batch(model, N, S, seed=11, noise_px=1.0)
    opts = FitConfig(slide_min_yaw=90)
    F.fit_landmarks(model, sb.noisy_landmarks[:2], S, opts)  # warm-up
    t0 = time.perf_counter()
    fit = F.fit_landmarks(model, sb.noisy_landmarks, S, opts)
    t_ours = time.perf_counter() - t0
    err = F.rotation_error_deg(fit, sb.truth)
    rm = np.sqrt(((F.project_landmarks(model, fit) - sb.landmarks) ** 2).sum(-1).mean(-1))
    print(f"stage 1 (per-image Levenberg-Marquardt, batched): {N / t_ours:.2f} images/s "
          f"({t_ours:.3f} s, {1e3 * t_ours / N:.1f} ms/image); median rotation error "
          f"{np.median(err):.2f} deg, median landmark RMSE {np.median(rm):.2f} px; converged "
          f"{fit.converged.mean():.0%}, iterations median {np.median(fit.iterations):.0f} "
          f"(max {fit.iterations.max()})")

    import torch

    angles, t2, sc, _ = F.init_pose(model, sb.noisy_landmarks.astype(np.float64), S,
                                    "orthographic")
    energies = [ReferenceEnergy(model, sb.noisy_landmarks[i].astype(np.float64), S, 0.01 * S,
                                model.n_id, model.n_exp) for i in range(N)]
    with F.torch_threads(1):
        our_e = np.array([float(energies[i](torch.as_tensor(
            ours_as_reference_params(fit, i, model)))) for i in range(N)])
    labels = {"L-BFGS-B": "scipy L-BFGS-B per image, exact autograd gradient",
              "trust-exact": "scipy trust-exact per image, exact autograd gradient and Hessian"}
    for method, label in ({} if args.no_stage1_reference else labels).items():
        ref_err, ref_rm, ref_e, ref_it = [], [], [], []
        with F.torch_threads(1):  # the same single thread as ours
            t0 = time.perf_counter()
            ref_p = [reference_fit(energies[i], (angles[i], t2[i], sc[i]), method)
                     for i in range(N)]
            t_ref = time.perf_counter() - t0
        for i, (p, e, nit) in enumerate(ref_p):
            y, pi, r = rotation_to_euler(euler_to_rotation(*np.rad2deg(p[:3])))
            Rt = euler_to_rotation(sb.truth.yaw[i], sb.truth.pitch[i], sb.truth.roll[i])
            Re = euler_to_rotation(y, pi, r)
            ref_err.append(np.rad2deg(np.arccos(np.clip((np.trace(Rt.T @ Re) - 1) / 2, -1, 1))))
            K = model.n_id
            cam = F.Camera.orthographic(S, S, float(np.exp(p[5])), rotation=Re,
                                        translation=p[3:5])
            v = model.shape(p[6:6 + K] * model.id_std, p[6 + K:] * model.exp_std)
            ref_rm.append(np.sqrt(((cam.project(v[model.landmarks])[:, :2] - sb.landmarks[i])
                                   ** 2).sum(-1).mean()))
            ref_e.append(e)
            ref_it.append(nit)
        ref_e = np.array(ref_e)
        rel = (our_e - ref_e) / np.abs(ref_e)
        print(f"stage 1 reference ({label}, same energy, same init): {N / t_ref:.2f} images/s "
              f"({t_ref:.2f} s, {1e3 * t_ref / N:.1f} ms/image); median rotation error "
              f"{np.median(ref_err):.2f} deg, median landmark RMSE {np.median(ref_rm):.2f} px, "
              f"iterations median {np.median(ref_it):.0f}; ours {t_ref / t_ours:.1f}x faster; "
              f"energy ours minus reference, relative: median {np.median(rel):+.1e}, max "
              f"{rel.max():+.1e} (negative: ours lower)")
    print(f"stage 1 median energy (ours) {np.median(our_e):.3f}")

    albedo = np.repeat(sb.uv_texture[None], N, 0)
    from facecorpus.tasks import photometric

    rm1 = np.sqrt(((F.project_landmarks(model, fit) - sb.landmarks) ** 2).sum(-1).mean(-1))
    print(f"stage 2 input (stage 1): median rotation error {np.median(err):.2f} deg, median "
          f"landmark RMSE {np.median(rm1):.3f} px")
    # both solvers in this process, on the same stage-1 fits; each row's energy is the one
    # of its own config (the same energy when only solver and iterations differ)
    runs = [("adam", args.photometric_iters, {})]
    if args.solver in ("both", "lm"):
        runs += ([("lm", args.lm_iters, {})] if args.lm_max_extension is None else
                 [("lm", args.lm_iters, {"photometric_max_extension": v})
                  for v in args.lm_max_extension])
    runs += [(s, it, {**e, "photometric_w_landmarks": args.w_landmarks})
             for s, it, e in list(runs) if args.w_landmarks is not None]
    if args.solver == "lm":
        runs = [r for r in runs if r[0] == "lm"]
    for solver, iters, extra in runs:
        opts2 = FitConfig(photometric_solver=solver, photometric_iters=iters, **extra)
        F.refine_photometric(model, fit.select([0]), sb.image[:1], sb.mask[:1], albedo[:1],
                             sb.noisy_landmarks[:1], opts2)  # warm-up (numba, imports)
        t0, c0 = time.perf_counter(), time.process_time()
        out = F.refine_photometric(model, fit, sb.image, sb.mask, albedo, sb.noisy_landmarks,
                                   opts2)
        t_ph, c_ph = time.perf_counter() - t0, time.process_time() - c0
        e2 = photometric.energy(model, out, sb.image, sb.mask, albedo, sb.noisy_landmarks,
                                opts2)
        rm2 = np.sqrt(((F.project_landmarks(model, out) - sb.landmarks) ** 2).sum(-1).mean(-1))
        label = f"{solver} {iters} {'steps' if solver == 'adam' else 'iterations'}"
        label += "".join(f", {k.removeprefix('photometric_')}={v}" for k, v in extra.items())
        print(f"stage 2 ({label}, 128 px): {1e3 * t_ph / N:.0f} ms/image wall, "
              f"{1e3 * c_ph / N:.0f} CPU-ms/image; median rotation error "
              f"{np.median(F.rotation_error_deg(out, sb.truth)):.2f} deg, median landmark RMSE "
              f"{np.median(rm2):.3f} px, median photometric L1 "
              f"{np.median(out.photometric_error):.4f}, mean energy {np.mean(e2):.5f}, "
              f"iterations median {np.median(out.iterations - fit.iterations):.0f}")
    masks = np.stack([erode(m, 1) for m in sb.mask])
    t0 = time.perf_counter()
    u = unwrap_batch(sb.image, model, sb.truth, 256, masks)
    t_u = time.perf_counter() - t0
    amb_note = "(lit render: PSNR vs the unlit texture is not the must-show number)"
    print(f"unwrap (256^2 UV): {N / t_u:.2f} images/s {amb_note}; visible fraction median "
          f"{np.median(u.uv_visible_mask.reshape(N, -1).mean(1)):.3f}")
    sh = np.zeros(27, np.float32)
    sh[0::9] = 2 / np.sqrt(np.pi)
    sb2 = F.synthetic_batch(model, min(N, 8), S, seed=12, sh=sh)
    u2 = unwrap_batch(sb2.image, model, sb2.truth, 256,
                      np.stack([erode(m, 1) for m in sb2.mask]))
    ps = [psnr(u2.uv_visible[i], sb2.uv_texture, u2.uv_visible_mask[i])
          for i in range(len(sb2.image))]
    print(f"unwrap with true parameters (ambient light): PSNR min {min(ps):.1f} dB, "
          f"median {np.median(ps):.1f} dB on visible texels")


def extremes(model, N: int, S: int) -> None:
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks import fit as F

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; model {model.name}; {N} images {S}x{S} per case")
    cases = [
        ("yaw +-60, orthographic", {"yaw_max": 60}),
        ("yaw +-80, orthographic", {"yaw_max": 80}),
        ("small face 90 px, yaw +-60", {"yaw_max": 60, "face_px": 90}),
        ("f = 1.5 W, yaw +-60", {"yaw_max": 60, "camera": "perspective", "focal_factor": 1.5}),
        ("f = 0.8 W, yaw +-60", {"yaw_max": 60, "camera": "perspective", "focal_factor": 0.8}),
    ]
    fits = [("orthographic", "fixed"), ("perspective", "fixed"), ("perspective", "estimate")]
    print("| case | landmarks | camera | focal | rot. err. median | p90 | NME vs truth "
          "| f / f_true | ms / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    F.fit_landmarks(model, *_warm(F, model, S))
    for name, kw in cases:
        b = F.synthetic_landmarks(model, N, S, seed=7, **kw)
        for mode in ("sparse68", "dense"):
            for cam, foc in fits:
                opts = FitConfig(camera=cam, focal=foc, landmarks=mode)
                t0 = time.perf_counter()
                fit = F.fit_landmarks(model, b.landmarks, S, opts, dense=b.dense)
                dt = time.perf_counter() - t0
                e = F.rotation_error_deg(fit, b.truth)
                # landmark error against the truth's 68 model landmarks (not the noisy,
                # silhouette-slid targets), / the truth's inter-ocular distance
                lt = F.project_landmarks(model, b.truth)
                nme = (np.sqrt(((F.project_landmarks(model, fit) - lt) ** 2).sum(-1).mean(-1))
                       / F.inter_ocular(lt))
                fr = (f"{np.median(fit.focal / b.truth.focal):.2f}"
                      if cam == "perspective" and b.truth.focal[0] > 0 else "-")
                print(f"| {name} | {mode} | {cam} | {foc if cam == 'perspective' else '-'} "
                      f"| {np.median(e):.2f} | {np.percentile(e, 90):.2f} "
                      f"| {np.median(nme):.4f} | {fr} | {1e3 * dt / N:.0f} |",
                      flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


def _warm(F, model, S):
    b = F.synthetic_landmarks(model, 2, S, seed=0)
    return b.landmarks, S


if __name__ == "__main__":
    main()
