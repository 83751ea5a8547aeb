"""Stage 2 (``tasks.photometric.levenberg_marquardt``): CPU cost vs quality over settings,
on captured inputs, every setting judged by ONE energy definition (#12).

    python benchmarks/sweep_lm.py [--n-synthetic 8] [--n-real 12] [--repeats 2]
        [--only NAME ...] [--profile NAME]

Inputs are captured by wrapping ``photometric.build`` (its arguments: the stage-1 fit,
photos, masks, texture prior, landmarks, FitConfig), exactly what the flow hands it:

- ``synthetic``: bench_fit's faces (``tasks.fit.synthetic_batch`` seed 11, 256 px, 1 px
  landmark noise) after the stage-1 fit, with their ground truth;
- ``real``: bench_pipeline's photo variants of the shared portraits through the plain stage
  loop (``bench_pipeline.reference``: detection, stage 1, masks, prior, stage 2).

Each setting rebuilds the Scene with its FitConfig (render size) and runs
``levenberg_marquardt`` (one torch thread, as in the flow); CPU-ms/image is
``time.process_time`` of build + solve, min over ``--repeats`` (after a warm-up). Quality
of every setting's result is evaluated in the shipped default's Scene (render size 128,
the default's energy weights): stage-2 energy, photometric L1 and landmark NME (model
landmarks vs the stage-1 targets, / inter-ocular); on synthetic faces also the rotation
error, landmark RMSE against the true landmarks and the mean model-space vertex error (mm)
against the true shape. Printed: medians per input set, and the energy ratio to the
``default`` row (the shipped FitConfig) per image (median and max).

A setting is a dict of FitConfig overrides plus solver-only keys: ``pixel_stride``
(levenberg_marquardt's gradient/H pixel subset), ``first`` = (FitConfig overrides,
iterations): the first iterations under those overrides (e.g. fewer modes), the rest
under the setting's own, and ``coarse`` = (size, iterations): ``first`` at that render size.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_lm  # its capture of the stage-2 inputs

SETTINGS: dict[str, dict] = {
    "default": {},  # the shipped FitConfig() (photometric_iters 5 since this sweep)
    "iters6": {"photometric_iters": 6},  # the default before it
    "R96": {"photometric_render_size": 96},
    "R80": {"photometric_render_size": 80},
    "R64": {"photometric_render_size": 64},
    "modes40": {"photometric_modes": 40},
    "modes60": {"photometric_modes": 60},
    "modes80": {"photometric_modes": 80},
    "stride3": {"photometric_hessian_stride": 3},
    "stride4": {"photometric_hessian_stride": 4},
    "iters5": {"photometric_iters": 5},
    "iters4": {"photometric_iters": 4},
    "px2": {"pixel_stride": 2, "photometric_hessian_stride": 1},
    "px2h2": {"pixel_stride": 2},
    "px3": {"pixel_stride": 3, "photometric_hessian_stride": 1},
    "c2f64x3": {"coarse": (64, 3)},
    "c2f64x4": {"coarse": (64, 4)},
    "c2f64x4+iters7": {"coarse": (64, 4), "photometric_iters": 7},
    "stride1": {"photometric_hessian_stride": 1},
    "tol3e-4": {"photometric_tol": 3e-4},
    "tol1e-3": {"photometric_tol": 1e-3},
    "iters5+tol3e-4": {"photometric_iters": 5, "photometric_tol": 3e-4},
    "iters5+ext3": {"photometric_iters": 5, "photometric_max_extension": 3.0},
    "iters4+ext3": {"photometric_iters": 4, "photometric_max_extension": 3.0},
    "c2f64x2": {"coarse": (64, 2)},
    "c2f96x3": {"coarse": (96, 3)},
    "c2f64x2+iters5": {"coarse": (64, 2), "photometric_iters": 5},
    "m80x3+iters5": {"first": ({"photometric_modes": 80}, 3), "photometric_iters": 5},
    "m40x2": {"first": ({"photometric_modes": 40}, 2)},
    "m40x2+iters5": {"first": ({"photometric_modes": 40}, 2), "photometric_iters": 5},
    "R96+modes80": {"photometric_render_size": 96, "photometric_modes": 80},
    "R96+stride3": {"photometric_render_size": 96, "photometric_hessian_stride": 3},
    "modes80+stride3": {"photometric_modes": 80, "photometric_hessian_stride": 3},
    "px2+modes80": {"pixel_stride": 2, "photometric_hessian_stride": 1,
                    "photometric_modes": 80},
    "c2f64x3+modes80": {"coarse": (64, 3), "photometric_modes": 80},
    "c2f64x3+px2": {"coarse": (64, 3), "pixel_stride": 2, "photometric_hessian_stride": 1},
}


def synthetic_inputs(n: int):
    """The captured ``photometric.build`` calls on bench_fit's faces, and the faces."""
    return bench_lm.synthetic_inputs(n, "build", None)


def real_inputs(n: int):
    """The captured ``photometric.build`` calls on bench_pipeline's n photo variants."""
    return bench_lm.real_inputs(n, "build", None)


def solve(args, setting: dict):
    """Build + levenberg_marquardt of one captured problem under ``setting`` -> Params."""
    from facecorpus.tasks import photometric as P

    model, fit, images, masks, albedo, lms, opts = args
    st = dict(setting)
    px = st.pop("pixel_stride", 1)
    coarse = st.pop("coarse", None)
    first = st.pop("first", None)  # (FitConfig overrides, iterations) of a first pass
    if coarse:
        first = ({"photometric_render_size": coarse[0]}, coarse[1])
    o = opts.model_copy(update=st)
    kw = (o.photometric_modes, o.photometric_fit_shape, o.photometric_tol,
          o.photometric_hessian_stride, o.photometric_max_extension, px)
    iters = o.photometric_iters
    sc, p = P.build(model, fit, images, masks, albedo, lms, o)
    if first:
        upd, k = first
        o1 = o.model_copy(update=upd)
        sc_c, _ = P.build(model, fit, images, masks, albedo, lms, o1)
        p, *_ = P.levenberg_marquardt(sc_c, p, k, o1.photometric_modes, *kw[1:])
        iters -= k
    p, *_ = P.levenberg_marquardt(sc, p, iters, *kw)
    return p


def judge(args, p):
    """Per image (energy, L1, NME, projected landmarks (68, 2), shape (V, 3)) of Params
    ``p`` in the shipped default's Scene of this problem."""
    import torch
    from facecorpus.renderers.raster import rasterize
    from facecorpus.tasks import fit as F
    from facecorpus.tasks import photometric as P

    model, fit, images, masks, albedo, lms, opts = args
    sc, _ = P.build(model, fit, images, masks, albedo, lms, opts)
    k = sc.R / sc.S
    rows = []
    with torch.no_grad():
        for i in range(p.angles.shape[0]):
            q = p.row(i)
            X, n, sv = P._geometry(sc, q)
            if not torch.isfinite(sv).all():
                rows.append((np.nan, np.nan, np.nan, None, None))
                continue
            p2f = rasterize((sv * torch.tensor([k, k, 1.0]))[None].numpy(), sc.tris, sc.R,
                            sc.R, perspective_correct=sc.persp).pix_to_face[0]
            st = P._evaluate(sc, i, q, X, n, sv, p2f)
            lm = sv[sc.lm_idx, :2].numpy()
            tgt = sc.lm[i].numpy()
            rmse = np.sqrt(((lm - tgt) ** 2).sum(-1).mean())
            nme = rmse / max(F.inter_ocular(tgt[None])[0], 1e-6)
            rows.append((st.energy, st.l1, nme, lm, X.numpy()))
    return rows


def run_setting(problems, setting, repeats):
    cpu = []
    for _ in range(repeats):
        c0, outs = time.process_time(), []
        for a in problems:
            outs.append(solve(a, setting))
        cpu.append(time.process_time() - c0)
    return min(cpu), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-synthetic", type=int, default=8)
    ap.add_argument("--n-real", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS))
    ap.add_argument("--profile", choices=list(SETTINGS),
                    help="cProfile one run of this setting on the first real image only")
    args = ap.parse_args()
    import torch
    from facecorpus.flows.executors import blas_threads
    from facecorpus.flows.pseudo_gt import PseudoGTJob
    from facecorpus.renderers.cameras import euler_to_rotation

    torch.set_num_threads(1)  # fit.photometric_threads
    # the pseudo-GT job's one OpenBLAS thread: without it torch's einsums here ran ~5x
    # slower on the shared 2-core VM (threads contending), not what the flow pays
    with blas_threads(PseudoGTJob.blas_threads):
        _main(args, torch, euler_to_rotation)


def _main(args, torch, euler_to_rotation) -> None:
    names = args.only or list(SETTINGS)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    sets = {}
    if args.n_synthetic:
        got, sb = synthetic_inputs(args.n_synthetic)
        sets["synthetic"] = (got, sb)
    if args.n_real:
        sets["real"] = (real_inputs(args.n_real), None)
    print(f"captured; load {os.getloadavg()[0]:.2f}")
    if args.profile:
        a = sets["real"][0][0]
        one = (a[0], a[1].select([0]), a[2][:1], a[3][:1], a[4][:1], a[5][:1], a[6])
        solve(one, SETTINGS[args.profile])  # warm-up
        pr = cProfile.Profile()
        pr.enable()
        solve(one, SETTINGS[args.profile])
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    for kind, (problems, sb) in sets.items():
        n_img = sum(len(a[1]) for a in problems)
        run_setting(problems[:1], {}, 1)  # warm-up: numba compile, imports
        base = None
        print(f"\n{kind}: {n_img} images, {len(problems)} call(s)")
        hdr = "| setting | CPU-ms/image | median E | E / default median, max | median L1 | median NME |"
        if sb is not None:
            hdr += " rot. err. deg | lm RMSE px (truth) | vertex err. mm |"
        print(hdr)
        for name in names:
            c, outs = run_setting(problems, SETTINGS[name], args.repeats)
            rows = [r for a, p in zip(problems, outs) for r in judge(a, p)]
            e = np.array([r[0] for r in rows])
            l1 = np.array([r[1] for r in rows])
            nme = np.array([r[2] for r in rows])
            if name == "default":
                base = e
            ratio = e / base if base is not None else np.full_like(e, np.nan)
            line = (f"| {name} | {1e3 * c / n_img:.0f} | {np.nanmedian(e):.5f} | "
                    f"{np.nanmedian(ratio):.4f}, {np.nanmax(ratio):.4f} | "
                    f"{np.nanmedian(l1):.5f} | {np.nanmedian(nme):.5f} |")
            if sb is not None:
                p = outs[0]
                ang = np.rad2deg(p.angles.numpy())
                Re = euler_to_rotation(ang[:, 0], ang[:, 1], ang[:, 2])
                Rt = euler_to_rotation(sb.truth.yaw, sb.truth.pitch, sb.truth.roll)
                tr = np.einsum("nij,nij->n", Re, Rt)
                rot = np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))
                lmr = [np.sqrt(((r[3] - sb.landmarks[i]) ** 2).sum(-1).mean())
                       for i, r in enumerate(rows)]
                model = problems[0][0]
                K, E = sb.truth.alpha.shape[1], sb.truth.beta.shape[1]
                Xt = (model.vertices[None]
                      + np.einsum("nk,kvc->nvc", sb.truth.alpha, model.id_basis[:K])
                      + np.einsum("ne,evc->nvc", sb.truth.beta, model.exp_basis[:E]))
                verr = [np.linalg.norm(r[4] - Xt[i], axis=-1).mean()
                        for i, r in enumerate(rows)]
                line += (f" {np.median(rot):.3f} | {np.median(lmr):.3f} | "
                         f"{np.median(verr):.3f} |")
            print(line + f"  (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
