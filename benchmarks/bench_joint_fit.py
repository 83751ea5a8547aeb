"""Benchmark of the joint fit of one subject's photos (tasks/joint_fit.py) on synthetic
subjects with 3 views each (the scene of tests/test_joint_fit.py: known identity, per-view
pose and expression, Gaussian landmark noise).

Reference measured in the same run: the per-photo stage-1 fit (``fit_landmarks``) of the
same photos, which the joint fit starts from. Printed: photos/s of each, and the identity
error (RMS vertex distance of the neutral shapes to the truth, mm): per-photo average vs
joint.

    python benchmarks/bench_joint_fit.py [--subjects 8] [--views 3] [--noise 2] [--model procedural]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--noise", type=float, default=2.0)
    ap.add_argument("--model", default="procedural")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from facecorpus.meshops.catalog import load_model
    from facecorpus.tasks.fit import fit_landmarks
    from facecorpus.tasks.joint_fit import fit_joint
    from test_joint_fit import CFG, S, identity_error, subjects_scene

    model = load_model(args.model)
    lm, subjects, alpha = subjects_scene(model, args.subjects, args.views, args.noise)
    n = len(lm)
    t0 = time.perf_counter()
    per = fit_landmarks(model, lm, S, CFG)
    t1 = time.perf_counter()
    joint = fit_joint(model, per, lm, subjects, CFG)
    t2 = time.perf_counter()
    e_per, e_joint = identity_error(model, per.alpha, alpha), identity_error(model, joint.alpha,
                                                                             alpha)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"model {model.name} (V={model.n_vertices}, K={per.alpha.shape[1]}, "
          f"E={per.beta.shape[1]}), {args.subjects} subjects x {args.views} views, "
          f"noise {args.noise} px")
    print(f"per-photo stage-1 fit (reference): {n / (t1 - t0):8.2f} photos/s")
    print(f"joint refit (after it)           : {n / (t2 - t1):8.2f} photos/s")
    print(f"identity error mm: per-photo mean {e_per.mean():.3f}  joint {e_joint.mean():.3f}"
          f"  ({(1 - e_joint.mean() / e_per.mean()) * 100:.0f} % lower); landmark nme "
          f"per-photo {per.landmark_nme.mean():.4f} joint {joint.landmark_nme.mean():.4f}")


if __name__ == "__main__":
    main()
