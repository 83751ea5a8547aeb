"""Stage 2 alone (``tasks.photometric.levenberg_marquardt``, the shipped FitConfig: 6
iterations + step extension) on captured real inputs, against a reference copy of the module
in the same process.

    python benchmarks/bench_lm.py --reference OLD_photometric.py [--inputs synthetic real]
        [--n 8] [--repeats 3]

``OLD_photometric.py`` is an earlier ``tasks/photometric.py`` (e.g. ``git show
COMMIT:tasks/photometric.py > /tmp/old.py``), loaded as its own module. Inputs, captured by
wrapping ``photometric.levenberg_marquardt`` (its Scene and start Params, exactly what the
flow hands it):

- ``synthetic``: bench_fit's faces (``tasks.fit.synthetic_batch`` seed 11, 256 px, 1 px
  landmark noise) after the stage-1 fit;
- ``real``: bench_pipeline's N photo variants of the shared portraits through the plain
  stage loop (``bench_pipeline.reference``: detection, stage 1, masks, prior, stage 2).

Both solvers run alternately ``--repeats`` times on the same inputs (one torch thread, as in
the flow); printed: CPU-ms per image (min over repeats) of each, the speed-up, whether the
returned parameters are byte-identical, and the largest relative difference of the final
stage-2 energy (each image's energy at each result, evaluated by this module's code).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def capture(run, name: str = "levenberg_marquardt", keep=None) -> list:
    """``keep(*args)`` (default: the args) of every ``photometric.<name>`` call inside
    ``run()``; the function itself still runs."""
    from facecorpus.tasks import photometric

    got, orig = [], getattr(photometric, name)

    def cap(*a):
        got.append(keep(*a) if keep else a)
        return orig(*a)

    setattr(photometric, name, cap)
    try:
        run()
    finally:
        setattr(photometric, name, orig)
    return got


def _lm_call(sc, p, *a):
    """A levenberg_marquardt call's (Scene, a copy of its start Params, the other args)."""
    from facecorpus.tasks import photometric

    return sc, photometric.Params(*(getattr(p, f).clone() for f in p.__dataclass_fields__)), a


def synthetic_inputs(n: int, name: str = "levenberg_marquardt", keep=_lm_call):
    """The captured calls of stage 2 on bench_fit's faces, and the faces (SyntheticBatch)."""
    from facecorpus.configs.fit import FitConfig
    from facecorpus.meshops.ict import load_ict_facekit
    from facecorpus.tasks import fit as F

    model = load_ict_facekit()
    sb = F.synthetic_batch(model, n, 256, seed=11, noise_px=1.0)
    fit = F.fit_landmarks(model, sb.noisy_landmarks, 256, FitConfig(slide_min_yaw=90))
    albedo = np.repeat(sb.uv_texture[None], n, 0)
    return capture(lambda: F.refine_photometric(model, fit, sb.image, sb.mask, albedo,
                                                sb.noisy_landmarks, FitConfig()),
                   name, keep), sb


def real_inputs(n: int, name: str = "levenberg_marquardt", keep=_lm_call):
    """The captured calls of stage 2 on bench_pipeline's n photo variants (plain loop)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import bench_pipeline as bp

    with tempfile.TemporaryDirectory() as d:
        bp.make_photos(Path(d), n)
        return capture(lambda: bp.reference(Path(d), "ict"), name, keep)


def final_energy(P, sc, p) -> np.ndarray:
    """(N,) stage-2 energy of every image at ``p`` (module ``P``'s own evaluation)."""
    import torch
    from facecorpus.renderers.raster import rasterize

    k = sc.R / sc.S
    out = np.full(p.angles.shape[0], np.nan)
    with torch.no_grad():
        for i in range(len(out)):
            q = p.row(i)
            geo = P._geometry(sc, q)
            if torch.isfinite(geo[2]).all():
                p2f = rasterize((geo[2] * torch.tensor([k, k, 1.0]))[None].numpy(), sc.tris,
                                sc.R, sc.R, perspective_correct=sc.persp).pix_to_face[0]
                out[i] = P._evaluate(sc, i, q, *geo, p2f).energy
    return out


def main() -> None:
    # One OpenBLAS thread, as the flow's pseudo-GT job computes (PseudoGTJob.blas_threads):
    # with a pool, every small BLAS call of numpy/scipy spins its idle threads, which
    # inflated the absolute ms of both sides here.
    from facecorpus.flows.executors import blas_threads
    from facecorpus.flows.pseudo_gt import PseudoGTJob

    with blas_threads(PseudoGTJob.blas_threads):
        _main()


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="an earlier tasks/photometric.py")
    ap.add_argument("--inputs", nargs="+", choices=["synthetic", "real"],
                    default=["synthetic", "real"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    from facecorpus.tasks import photometric as ours

    spec = importlib.util.spec_from_file_location("photometric_reference", args.reference)
    ref = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ref  # its dataclasses look their module up
    spec.loader.exec_module(ref)
    torch.set_num_threads(1)  # fit.photometric_threads
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; reference "
          f"{args.reference}")
    for kind in args.inputs:
        problems = (synthetic_inputs(args.n)[0] if kind == "synthetic" else real_inputs(args.n))
        n_img = sum(p.angles.shape[0] for _, p, _ in problems)
        cpu = {"reference": [], "ours": []}
        res = {}
        for name, mod in [("reference", ref), ("ours", ours)] * (args.repeats + 1):
            c0, outs = time.process_time(), []
            for sc, p0, a in problems:
                # each side's own Scene and Params classes (their methods are part of the
                # solver), built fresh: per-run caches (basis layouts) count in every run
                sc_m = mod.Scene(**{f: getattr(sc, f) for f in mod.Scene.__dataclass_fields__
                                    if not f.startswith("_")})
                p = mod.Params(*(getattr(p0, f).clone() for f in p0.__dataclass_fields__))
                outs.append(mod.levenberg_marquardt(sc_m, p, *a))
            cpu[name].append(time.process_time() - c0)
            res[name] = outs
        # the first round is the warm-up (numba compile, caches)
        c_ref, c_our = (1e3 * min(cpu[k][1:]) / n_img for k in ("reference", "ours"))
        same, rel = True, []
        for (sc, _, _), r, o in zip(problems, res["reference"], res["ours"]):
            same &= all(torch.equal(getattr(r[0], f), getattr(o[0], f))
                        for f in r[0].__dataclass_fields__)
            same &= all(np.array_equal(x, y, equal_nan=True) for x, y in zip(r[1:], o[1:]))
            e_r, e_o = final_energy(ours, sc, r[0]), final_energy(ours, sc, o[0])
            rel.append((e_o - e_r) / np.abs(e_r))
        rel = np.concatenate(rel)
        print("  final energy, ours minus reference, relative, per image:",
              " ".join(f"{v:+.1e}" for v in rel))
        rel = np.abs(rel)
        print(f"{kind} ({n_img} images, {len(problems)} call(s)): reference {c_ref:.0f} "
              f"CPU-ms/image, ours {c_our:.0f} CPU-ms/image ({c_ref / c_our:.2f}x); results "
              f"byte-identical: {same}; final energy max relative difference "
              f"{np.nanmax(rel):.1e}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
