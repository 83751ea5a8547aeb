"""Benchmark of the non-rigid refinement (tasks/nonrigid.py) on synthetic faces deformed off
the model space by a smooth known field (the scene of tests/test_nonrigid.py), ICT-FaceKit
(procedural model when ICT is unavailable).

Reference measured in the same run: the stage-1 landmark fit (``fit_landmarks``) of the
same images, the step the refinement follows in the pipeline. Printed: the per-model
precompute (Schur complement of the Laplacian term, once per process), refinement time per
image warm, landmark RMSE before/after, and field correlation with the truth.

    FACECORPUS_ASSETS=../shared python benchmarks/bench_nonrigid.py [--n 8] [--model ict]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--model", default="ict")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from facecorpus.configs.nonrigid import NonrigidConfig
    from facecorpus.meshops.catalog import load_model
    from facecorpus.tasks import nonrigid
    from facecorpus.tasks.fit import fit_landmarks
    from test_nonrigid import FIT, S, make_scene

    try:
        model = load_model(args.model)
    except Exception as e:  # noqa: BLE001 - fall back to the procedural model
        print(f"{args.model} unavailable ({e}); procedural model")
        model = load_model("procedural")
    sc = make_scene(model, n=args.n, seed=0)
    cfg = NonrigidConfig(slide_min_yaw=90)
    t0 = time.perf_counter()
    fit = fit_landmarks(model, sc["landmarks"], S, FIT)
    t_fit = (time.perf_counter() - t0) / args.n
    nonrigid._CACHE.clear()
    t0 = time.perf_counter()
    nonrigid._reduced(model, fit.beta.shape[1], cfg.laplacian, cfg.lambda_d, cfg.field_unit)
    t_pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    nr = nonrigid.refine_nonrigid(model, fit, sc["landmarks"], S, cfg)
    t_nr = (time.perf_counter() - t0) / args.n
    d = nr.vertex_offsets - nr.vertex_offsets.mean(1, keepdims=True)
    D = sc["field"] - sc["field"].mean(1, keepdims=True)
    corr = np.corrcoef(d.ravel(), D.ravel())[0, 1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"model {model.name} V={model.n_vertices} E={fit.beta.shape[1]}; N={args.n}")
    print(f"reference stage-1 fit_landmarks: {t_fit * 1e3:.1f} ms/image")
    print(f"non-rigid precompute (once per model): {t_pre * 1e3:.0f} ms")
    print(f"non-rigid refinement: {t_nr * 1e3:.1f} ms/image "
          f"({t_nr / t_fit:.2f}x the stage-1 fit)")
    print(f"landmark RMSE px before {np.mean(nr.landmark_rmse_before):.3f} -> after "
          f"{np.mean(nr.landmark_rmse_after):.3f}; field correlation {corr:.3f}; "
          f"failures {sum(f is not None for f in nr.failure)}")


if __name__ == "__main__":
    main()
