"""Training throughput on CPU and the share of step time spent waiting for data.

Writes a synthetic dataset through the datasets store, then runs the same Trainer loop
  - over the store with 0 and with 2 DataLoader workers, and
  - over the same arrays held in memory (TensorSource, 0 workers): the reference, whose data
    wait is only batch gathering,
and prints samples/s and data-wait fraction (time blocked in ``next(loader)`` / step time),
measured after a warm-up window.

    .venv/bin/python benchmarks/bench_train.py [--task pncc] [--size 64] [--steps 60]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time

import torch
from facecorpus.configs.train import TrainConfig
from facecorpus.training.data import TensorSource
from facecorpus.training.synthetic import make_synthetic, write_synthetic
from facecorpus.training.trainer import Trainer


def run(cfg: TrainConfig, data, out: str) -> dict:
    """Samples/s and data-wait fraction over all log windows but the first (warm-up)."""
    hist = [r for r in Trainer(cfg, data, out).fit() if r["split"] == "train"]
    samples = busy = wait = 0.0
    for prev, r in itertools.pairwise(hist):
        n = (r["step"] - prev["step"]) * cfg.batch_size
        t = n / r["samples_per_s"]
        samples, busy, wait = samples + n, busy + t, wait + r["data_wait_frac"] * t
    return {"samples_per_s": samples / busy, "data_wait_frac": wait / busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="pncc", choices=("pncc", "inpaint", "position"))
    ap.add_argument("--size", type=int, default=32, help="image / UV map side")
    ap.add_argument("--n", type=int, default=512, help="samples in the dataset")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=80, help="steps per run (first 1/4 is warm-up)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    try:
        root = os.path.join(tmp, "data")
        t0 = time.perf_counter()
        write_synthetic(root, args.task, n=args.n, size=args.size, samples_per_shard=128)
        print(f"dataset: {args.task}, {args.n} samples of {args.size}^2, written in "
              f"{time.perf_counter() - t0:.1f} s")
        arrays, manifest = make_synthetic(args.task, n=args.n, size=args.size)
        mem = TensorSource(arrays, manifest)
        log_every = max(1, args.steps // 4)
        base = {"task": args.task, "device": "cpu", "steps": args.steps, "batch_size": args.batch,
                    "model": {"width": args.width, "depth": args.depth}, "cpu_threads": args.threads,
                    "val_every": 0, "checkpoint_every": 0, "sample_every": 0, "log_every": log_every,
                    "val_filter": [{"column": "split", "value": "none"}]}
        print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
              f"{os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}; batch {args.batch}, "
              f"U-Net width {args.width} depth {args.depth}, {args.steps} steps per run")
        runs = [("in-memory tensors (reference)", mem, 0), ("store, 0 workers", root, 0),
                ("store, 2 workers", root, 2)]
        res: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
        for rep in range(args.repeats):  # interleaved: the machine may be shared
            for name, data, workers in runs:
                cfg = TrainConfig(**base, num_workers=workers)
                r = run(cfg, data, os.path.join(tmp, f"out-{rep}-{workers}-{len(res[name])}"))
                print(f"  [{rep}] {name:32s} {r['samples_per_s']:8.1f} samples/s   data wait "
                      f"{100 * r['data_wait_frac']:5.1f}%", flush=True)
                res[name].append(r)
        print(f"over {args.repeats} repeats (samples/s: best; data wait: range):")
        ref = max(r["samples_per_s"] for r in res[runs[0][0]])
        for name, _, _ in runs:
            sps = max(r["samples_per_s"] for r in res[name])
            w = [100 * r["data_wait_frac"] for r in res[name]]
            print(f"  {name:32s} {sps:8.1f} samples/s ({sps / ref:4.2f}x reference)   "
                  f"data wait {min(w):4.1f}-{max(w):4.1f}% of step time")
        # read-only throughput of the store path, for scale
        from facecorpus.training.data import StepBatchSampler, collate_batch, open_split

        split = open_split(root, ("image",) if args.task != "inpaint" else ("uv_visible",),
                           base["val_filter"][:0])
        sampler = iter(StepBatchSampler(len(split), args.batch, 0))
        t0 = time.perf_counter()
        k = 20
        for _ in range(k):
            collate_batch(split.dataset.__getitems__(next(sampler)))
        dt = time.perf_counter() - t0
        print(f"  store random-batch read alone: {k * args.batch / dt:8.1f} samples/s (1 process)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
