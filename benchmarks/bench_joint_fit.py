"""Benchmark of the joint fit of one subject's photos (tasks/joint_fit.py) on synthetic
subjects with 3 views each (the scene of tests/test_joint_fit.py: known identity, per-view
pose and expression, Gaussian landmark noise).

Reference measured in the same run: the per-photo stage-1 fit (``fit_landmarks``) of the
same photos, which the joint fit starts from. Printed: photos/s of each, and the identity
error (RMS vertex distance of the neutral shapes to the truth, mm): per-photo average vs
joint.

    python benchmarks/bench_joint_fit.py [--subjects 8] [--views 3] [--noise 2] [--model procedural]
    python benchmarks/bench_joint_fit.py --switches [--reps 3]

``--switches``: the flow-level cost per photo of the pseudo-GT switches (``nonrigid``,
``albedo``): one flow run (4 deformed faces of tests/test_nonrigid.py, procedural model,
perspective, stage 2 on) for the analysis, then ``tasks.pseudo_gt.finish`` of that shard with
each switch, best of ``--reps``; the reference is ``finish`` with none, same process.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np


def switches(reps: int) -> None:
    import glob
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from facecorpus.flows import prior_store
    from facecorpus.flows import pseudo_gt as P
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks import pseudo_gt as T
    from PIL import Image
    from test_nonrigid import make_scene

    sc = make_scene(procedural_model(), n=4)
    d = Path(tempfile.mkdtemp())
    rows = []
    for i in range(4):
        Image.fromarray((np.clip(sc["image"][i], 0, 1) * 255 + 0.5).astype(np.uint8)).save(
            d / f"f{i}.png")
        rows.append({"source_uri": f"f{i}.png",
                     "landmarks": sc["landmarks"][i].reshape(-1).tolist()})
    pq.write_table(pa.Table.from_pylist(rows), d / "in.parquet")
    base = {"model": "procedural", "workers": 1, "retries": 0, "output.samples_per_shard": 4,
            "fit.camera": "perspective", "fit.fov_deg": 40}
    cfg0 = P.load_config(None, base)
    P.run_local(cfg0, str(d / "in.parquet"), d / "out")
    paths = glob.glob(str(d / "out" / "_work" / "analysis-*.npz"))
    a = T.Analysis.from_bytes(Path(paths[0]).read_bytes())
    st = T.State.build(cfg0)
    prior = prior_store.build(cfg0, st, paths)[0]
    print(f"machine: {platform.node()}, {a.n} photos, procedural, 256² crop and UV, stage 2 "
          f"{cfg0.fit.photometric_iters} steps")
    for name, over in (("none (reference)", {}), ("nonrigid", {"nonrigid.enabled": True}),
                       ("albedo", {"albedo.enabled": True})):
        cfg = P.load_config(None, {**base, **over})
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            T.finish(st, a, prior, cfg)
            ts.append((time.perf_counter() - t0) / a.n)
        print(f"finish, {name:17s}: best {min(ts):.3f} s/photo  all "
              f"{', '.join(f'{t:.3f}' for t in ts)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switches", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--noise", type=float, default=2.0)
    ap.add_argument("--model", default="procedural")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    if args.switches:
        switches(args.reps)
        return
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
