"""The pseudo-GT pipeline end to end through the CLI, next to a plain loop of the same stages.

    python benchmarks/bench_pipeline.py --n 24 [--model ict] [--workers 2] [--scale 120]

Makes N distinct photos (the shared portraits and scikit-image's astronaut, each cropped,
flipped and colour-jittered differently: see scripts/incremental_rerun.py), then

1. ``facecorpus run pseudo-gt`` through Prefect on a LocalCluster of ``--workers`` processes
   (the default way a user runs it), and ``--no-prefect`` (one process);
2. the reference: the same photos through a plain single-process loop of the stage
   functions (``tasks.pseudo_gt.analyse`` per shard, the prior, ``tasks.pseudo_gt.finish``),
   nothing written — what orchestration, keys, I/O and commits add is the difference.

Prints photos/s, wall and CPU seconds per photo (CPU of this process and its children), and
the CLI runs' phase times from their summary.json.

With ``--scale M`` (M > N) every path also runs on M photos (the first N of them the same
photos) and the script prints each path's fixed CPU (process start-ups, imports, model and
graph loads, the Prefect server: the intercept) and its marginal CPU per photo (the slope:
what a corpus of many thousand photos pays per photo, where the fixed part vanishes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _cpu() -> np.ndarray:
    """(2,) user and system CPU seconds of this process and its waited-for children (the CLI
    run, its Dask workers and its Prefect server)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([a.ru_utime + b.ru_utime, a.ru_stime + b.ru_stime])


def make_photos(folder: Path, n: int) -> None:
    from incremental_rerun import sources, variant
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    src = sources()
    for k in range(n):
        Image.fromarray(variant(src[k % len(src)], k)).save(folder / f"p{k:03d}.png")


def cli(photos: Path, out: Path, model: str, extra: list[str], sets: list[str] = ()
        ) -> tuple[float, np.ndarray, dict]:
    cmd = [sys.executable, "-m", "facecorpus.cli", "run", "pseudo-gt", "--input", str(photos),
           "--out", str(out), "--model", model, "--set", "output.samples_per_shard=8", *extra]
    cmd += [a for kv in sets for a in ("--set", kv)]
    t0, c0 = time.perf_counter(), _cpu()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, _cpu() - c0, json.loads((out / "summary.json").read_text())


def reference(photos: Path, model: str, sets: list[str] = ()) -> tuple[float, np.ndarray, dict]:
    """Plain loop: every stage function on the same photos, in this process, nothing kept."""
    from facecorpus.configs import load_config, parse_set
    from facecorpus.flows import prior_store
    from facecorpus.tasks import pseudo_gt as st
    from facecorpus.tasks.inputs import hash_inputs, list_planned

    cfg = load_config(None, "pseudo_gt", {"model": model, **parse_set(list(sets))})
    with _cli_threads():
        return _reference(photos, cfg, prior_store, st, hash_inputs, list_planned)


def _cli_threads():
    """The thread settings the CLI's pseudo-GT job computes under (one OpenBLAS thread since
    #12), so that the reference measures the same computation; nothing on older code."""
    import contextlib

    try:
        from facecorpus.flows.executors import blas_threads
        from facecorpus.flows.pseudo_gt import PseudoGTJob
    except ImportError:
        return contextlib.nullcontext()
    return blas_threads(PseudoGTJob.blas_threads)


def _reference(photos, cfg, prior_store, st, hash_inputs, list_planned):
    t0, c0 = time.perf_counter(), _cpu()  # the model/detector load counts, as in a CLI run
    state = st.State.build(cfg)
    state.detector()
    t_a = time.perf_counter()
    inputs = hash_inputs(list_planned(str(photos)))
    chunks = [inputs[i:i + 8] for i in range(0, len(inputs), 8)]
    analyses = [st.analyse(state, c, cfg) for c in chunks]
    t_p = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:  # the prior builder reads analysis files
        import io

        import numpy as np

        paths = []
        for k, a in enumerate(analyses):
            buf = io.BytesIO()
            np.savez(buf, **a.arrays)
            p = Path(d) / f"a{k}.npz"
            p.write_bytes(buf.getvalue())
            paths.append(str(p))
        prior, _ = prior_store.build(cfg, state, paths)
    t_f = time.perf_counter()
    accepted = sum(len(st.finish(state, a, prior, cfg).rows) for a in analyses)
    t1 = time.perf_counter()
    phases = {"start": t_a - t0, "analyse": t_p - t_a, "prior": t_f - t_p, "finish": t1 - t_f}
    return t1 - t0, _cpu() - c0, {"accepted": accepted, "phase_wall_seconds": phases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--model", default="ict")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. fit.photometric_solver=lm)")
    ap.add_argument("--no-reference", action="store_true", help="only the two CLI runs")
    ap.add_argument("--scale", type=int, default=0, metavar="M",
                    help="also run every path on M > N photos; print fixed and marginal CPU")
    args = ap.parse_args(argv)
    if args.scale and args.scale <= args.n:
        ap.error("--scale must be larger than --n")
    sizes = [args.n] + ([args.scale] if args.scale else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "all", sizes[-1])
        runs = {}
        for n in sizes:
            photos = tmp / f"photos{n}"
            photos.mkdir()
            for f in sorted((tmp / "all").iterdir())[:n]:
                (photos / f.name).symlink_to(f)
            runs[n] = _paths(photos, tmp / f"out{n}", args)
    for n in sizes:
        _table(n, args, runs[n])
    if args.scale:
        _marginal(args.n, args.scale, runs)
    return 0


def _paths(photos: Path, out: Path, args) -> list[tuple]:
    rows = []
    w, c, s = cli(photos, out / "prefect", args.model, ["--workers", str(args.workers)], args.set)
    rows.append((f"CLI, Prefect + Dask ({args.workers} workers)", w, c, s))
    w, c, s = cli(photos, out / "local", args.model, ["--no-prefect"], args.set)
    rows.append(("CLI, --no-prefect (1 process)", w, c, s))
    if not args.no_reference:
        w, c, s = reference(photos, args.model, args.set)
        rows.append(("reference: plain loop of the stage functions", w, c, s))
    return rows


def _marginal(n: int, m: int, runs: dict) -> None:
    """The two sizes' CPU as a line: fixed = intercept, marginal = slope per photo."""
    print(f"\nfixed and marginal CPU from {n} and {m} photos (a corpus pays the marginal):")
    print(f"{'run':46s} {'fixed CPU-s':>11s} {'marginal CPU-s/photo':>21s} {'wall s/photo':>13s}")
    for (name, w1, c1, _), (_, w2, c2, _) in zip(runs[n], runs[m], strict=True):
        slope = (c2.sum() - c1.sum()) / (m - n)
        print(f"{name:46s} {c1.sum() - slope * n:11.1f} {slope:21.3f} {(w2 - w1) / (m - n):13.3f}")


def _table(n: int, args, rows: list[tuple]) -> None:
    print(f"{n} photos, model {args.model}" + "".join(f"; --set {kv}" for kv in args.set))
    print(f"{'run':46s} {'wall s':>7s} {'photos/s':>9s} {'CPU s/photo':>12s} "
          f"{'(user':>6s} {'sys)':>5s} {'photos/CPU-s':>12s} accepted  phases (wall s)")
    for name, w, c, s in rows:
        ph = ", ".join(f"{k} {v:.1f}" for k, v in s.get("phase_wall_seconds", {}).items())
        if "cpu_seconds_in_shards" in s:
            ph += f"; finish CPU-s in shards {s['cpu_seconds_in_shards']:.1f}"
        print(f"{name:46s} {w:7.1f} {n / w:9.2f} {c.sum() / n:12.3f} {c[0] / n:6.3f} "
              f"{c[1] / n:5.3f} {n / c.sum():12.3f} {s['accepted']:8d}  {ph}")
        if "medians" in s:
            md = s["medians"]
            print(f"{'':46s} quality medians: " + ", ".join(
                f"{k} {md[k]:.4g}" for k in ("landmark_nme", "photometric_error",
                                             "rerender_psnr", "visible_fraction") if k in md))


if __name__ == "__main__":
    sys.exit(main())
