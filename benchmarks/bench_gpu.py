"""The torch Poisson solver (meshops.poisson_torch) against the numba CPU solver and
cv2.seamlessClone on the same maps, on the GPU when there is one (one prepared script for a
session that is lent a GPU; on CPU tensors it checks the path and prints CPU numbers).

    .venv/bin/python benchmarks/bench_gpu.py [--n 32] [--size 256] [--repeats 3] [--device auto]

Maps: ``bench_blend.uv_like`` (an irregular blob with holes, textured source, smooth target).
Each method gets the same maps; the torch solver solves the whole batch in one call (that is
its point), numba one batched call on every core, cv2 one call per map at its default
threads. Reported: ms/map (wall, best of ``repeats``; CUDA synchronised), maps/s, the max
relative residual of the exact system (``poisson_residual``, float64) and the speed-up of
the torch solver over seamlessClone per map (the issue's goal on a GPU: >= 4x).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import cv2
    import torch
    from bench_blend import cv2_args, uv_like
    from facecorpus.meshops.poisson import poisson_blend, poisson_residual
    from facecorpus.meshops.poisson_torch import poisson_blend_torch

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor()
    if not dev.startswith("cuda"):
        print("no CUDA device: the torch solver runs on CPU tensors (GPU figures not "
              "measured)")
    maps = [uv_like(args.size, seed) for seed in range(args.n)]
    T, S, M = (np.stack([m[i] for m in maps]) for i in range(3))
    c8 = [cv2_args(T[k], S[k], M[k]) for k in range(args.n)]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def run_torch():
        out = poisson_blend_torch(T, S, M, device=dev, return_info=True)
        sync()
        return out

    methods = {
        f"torch ({dev}, one batched call)": run_torch,
        f"numba (CPU, {os.cpu_count()} workers)": lambda: poisson_blend(T, S, M,
                                                                         return_info=True),
        "cv2.seamlessClone (uint8, per map)": lambda: [
            cv2.seamlessClone(a[0], a[1], a[2].copy(), a[3], cv2.NORMAL_CLONE) for a in c8],
    }
    print(f"{args.n} maps {args.size}^2 x 3, mask fraction {M.mean():.2f}; device {name}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    best = {}
    for label, fn in methods.items():
        fn()  # warm-up: JIT, CUDA context, allocator
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = fn()
            ts.append(time.perf_counter() - t)
        best[label] = 1e3 * min(ts) / args.n
        extra = ""
        if isinstance(res, tuple):
            out, info = res
            r = max(poisson_residual(out[k], T[k], S[k], M[k]) for k in range(min(4, args.n)))
            it = [i["iterations"] for i in info]
            extra = f"; residual {r:.1e}; iterations {min(it)}-{max(it)}"
        print(f"{label:>42}: {best[label]:8.2f} ms/map  {1e3 / best[label]:8.1f} maps/s{extra}")
    t_label = next(iter(best))
    cv_label = list(best)[-1]
    print(f"torch vs seamlessClone per map: {best[cv_label] / best[t_label]:.2f}x "
          f"(goal on a GPU: >= 4x)")


if __name__ == "__main__":
    main()
