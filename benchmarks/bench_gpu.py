"""GPU-path benchmarks (issue #12 item 5), one prepared script for a session that is lent a
GPU; on CPU tensors it checks every path and prints CPU numbers (GPU columns: not measured).

    .venv/bin/python benchmarks/bench_gpu.py [--section all|poisson|raster|fit|train]
        [--device auto] [--model ict|procedural] ...

Sections (each reference is measured in the same process, on the same inputs):

- ``poisson``: the torch Poisson solver (meshops.poisson_torch) against the numba CPU solver
  and cv2.seamlessClone on the same maps (``bench_blend.uv_like``: an irregular blob with
  holes, textured source, smooth target). The torch solver solves the whole batch in one
  call, numba one batched call on every core, cv2 one call per map at its default threads.
  Reported: ms/map (wall, best of ``repeats``; CUDA synchronised), maps/s, the max relative
  residual of the exact system (``poisson_residual``, float64) and the speed-up of the torch
  solver over seamlessClone per map (the issue's goal on a GPU: >= 4x).
- ``raster``: renderers.raster_torch on ``--device`` (and on CPU tensors) against the numba
  rasterizer: images/s for a batch of ``--raster-n`` mean faces at several poses, and the
  share of covered pixels whose face id agrees with numba's.
- ``fit``: stage 1 (``fit_landmarks``; CPU only: ``fit.device`` moves stage 2) and stage 2
  (Adam, ``photometric_iters``) photos/s on synthetic faces with known truth: numba
  rasterizer on CPU (today's path, the reference), torch rasterizer on CPU tensors, torch
  rasterizer on ``--device``; median rotation error (degrees) and mean L1 beside each.
- ``train``: Trainer samples/s on in-memory tensors (``training.data.TensorSource``) with
  ``precision`` fp32 / bf16 and ``channels_last`` off / on on CUDA (both only act on CUDA;
  on CPU one fp32 row).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def best_of(fn, repeats: int, sync) -> tuple[float, object]:
    """(best wall seconds over ``repeats`` after one warm-up call, the last result)."""
    fn()  # warm-up: JIT, CUDA context, allocator
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return min(ts), res


def bench_poisson(args, dev: str) -> None:
    import cv2
    import torch
    from bench_blend import cv2_args, uv_like
    from facecorpus.meshops.poisson import poisson_blend, poisson_residual
    from facecorpus.meshops.poisson_torch import poisson_blend_torch

    name = device_name(dev)
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


def device_name(dev: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if dev.startswith("cuda") else (
        platform.processor() or platform.machine())


def syncer(dev: str):
    import torch

    return torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)


def load(spec: str):
    from facecorpus.meshops.catalog import load_model

    if spec == "procedural":
        from facecorpus.meshops.procedural import procedural_model

        return procedural_model(n=41)
    return load_model(spec)


def bench_raster(args, dev: str) -> None:
    import torch
    from facecorpus.renderers.cameras import framing_camera
    from facecorpus.renderers.raster import rasterize
    from facecorpus.renderers.raster_torch import rasterize_torch

    model = load(args.model)
    v = np.asarray(model.vertices, np.float32)
    rng = np.random.default_rng(0)
    poses = np.c_[rng.uniform(-80, 80, args.raster_n), rng.uniform(-20, 20, args.raster_n),
                  rng.uniform(-15, 15, args.raster_n)]
    tris = np.asarray(model.triangles)
    print(f"raster: {args.model} ({len(v)} vertices, {len(tris)} triangles), "
          f"{args.raster_n} images, perspective; load {os.getloadavg()[0]:.2f}")
    for size in args.raster_sizes:
        sv = np.stack([framing_camera(v, size, size, yaw=y, pitch=p, roll=r,
                                      kind="perspective").project(v) for y, p, r in poses])
        t_nb, ref = best_of(lambda sv=sv, size=size: rasterize(sv, tris, size, size),
                            args.repeats, lambda: None)
        rows = [(f"numba (CPU, {os.cpu_count()} cores)", t_nb, None)]
        for d in dict.fromkeys(["cpu", dev]):
            sv_t = torch.as_tensor(sv, device=d)
            tris_t = torch.as_tensor(tris, device=d)
            t, got = best_of(lambda sv_t=sv_t, tris_t=tris_t, size=size: rasterize_torch(
                sv_t, tris_t, size, size), args.repeats, syncer(d))
            p2f = got.pix_to_face.cpu().numpy()
            agree = ((p2f == ref.pix_to_face) & ref.mask).sum() / ref.mask.sum()
            same_cov = bool(((p2f >= 0) == ref.mask).all())
            rows.append((f"torch ({d})", t, (f"same face {100 * agree:.3f}% of covered px, "
                                              f"coverage identical {same_cov}")))
        for label, t, extra in rows:
            print(f"  {size:4d}^2 {label:>26}: {1e3 * t / args.raster_n:8.2f} ms/image "
                  f"{args.raster_n / t:8.1f} images/s ({t_nb / t:5.2f}x numba)"
                  + (f"; {extra}" if extra else ""))
    if not dev.startswith("cuda"):
        print("  torch (cuda): not measured (no CUDA device)")


def bench_fit(args, dev: str) -> None:
    from facecorpus.configs.fit import FitConfig
    from facecorpus.tasks.fit import (
        fit_landmarks,
        refine_photometric,
        rotation_error_deg,
        synthetic_batch,
    )

    model = load(args.model)
    N, S = args.fit_n, args.fit_size
    sb = synthetic_batch(model, N, S, seed=1, noise_px=2.0)
    # the device path is Adam's (LM, the CPU default, builds its Jacobians in numpy/numba)
    base = FitConfig(slide_min_yaw=90, photometric_iters=args.photometric_iters,
                     photometric_solver="adam")
    albedo = np.repeat(sb.uv_texture[None], N, 0)
    print(f"fit: {args.model}, {N} synthetic photos {S}^2, stage 2 Adam "
          f"{args.photometric_iters} steps at {base.photometric_render_size}^2; load "
          f"{os.getloadavg()[0]:.2f}")
    t1, fit1 = best_of(lambda: fit_landmarks(model, sb.noisy_landmarks, S, base), 1,
                       lambda: None)
    e1 = rotation_error_deg(fit1, sb.truth)
    print(f"  stage 1 (CPU, 1 torch thread): {N / t1:8.2f} photos/s; median rotation "
          f"error {np.median(e1):.2f} deg; on a device: not implemented (stage 1 stays on "
          f"the CPU)")
    runs = [("numba raster, cpu (reference)", "cpu", "numba"), ("torch raster, cpu", "cpu", "torch")]
    if dev != "cpu":
        runs.append((f"torch raster, {dev}", dev, "torch"))
    ref = None
    for label, d, r in runs:
        opts = FitConfig(**{**base.model_dump(), "device": d, "rasterizer": r})  # validated
        t, out = best_of(lambda opts=opts: refine_photometric(
            model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks, opts),
                         args.repeats, syncer(d))
        ref = ref or t
        e2 = rotation_error_deg(out, sb.truth)
        print(f"  stage 2 {label:>30}: {N / t:8.2f} photos/s ({ref / t:5.2f}x reference); "
              f"median rotation error {np.median(e2):.3f} deg, mean L1 "
              f"{np.nanmean(out.photometric_error):.4f}")
    if not dev.startswith("cuda"):
        print("  stage 2 torch raster, cuda: not measured (no CUDA device)")


def bench_train(args, dev: str) -> None:
    from bench_train import run
    from facecorpus.configs.train import TrainConfig
    from facecorpus.training.data import TensorSource
    from facecorpus.training.synthetic import make_synthetic

    arrays, manifest = make_synthetic(args.task, n=args.train_n, size=args.train_size)
    mem = TensorSource(arrays, manifest)
    d = "cuda" if dev.startswith("cuda") else "cpu"
    base = {"task": args.task, "device": d, "steps": args.train_steps,
            "batch_size": args.batch, "model": {"width": args.width, "depth": args.depth},
            "val_every": 0, "checkpoint_every": 0, "sample_every": 0,
            "log_every": max(1, args.train_steps // 4), "num_workers": 0,
            "val_filter": [{"column": "split", "value": "none"}]}
    print(f"train: {args.task}, {args.train_size}^2, batch {args.batch}, U-Net width "
          f"{args.width} depth {args.depth}, {args.train_steps} steps, in-memory data; "
          f"load {os.getloadavg()[0]:.2f}")
    combos = ([("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
              if d == "cuda" else [("fp32", False)])
    tmp = tempfile.mkdtemp(prefix="bench-gpu-train-")
    try:
        ref = None
        for k, (prec, cl) in enumerate(combos):
            cfg = TrainConfig(**base, precision=prec, channels_last=cl,
                              cpu_threads=0 if d == "cuda" else 1)
            r = run(cfg, mem, os.path.join(tmp, str(k)))
            ref = ref or r["samples_per_s"]
            print(f"  {d} precision {prec} channels_last {cl!s:5}: "
                  f"{r['samples_per_s']:8.1f} samples/s ({r['samples_per_s'] / ref:4.2f}x "
                  f"fp32 NCHW)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if d != "cuda":
        print("  cuda fp32/bf16 x channels_last off/on: not measured (no CUDA device)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", default="all",
                    choices=("all", "poisson", "raster", "fit", "train"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=32, help="poisson: maps")
    ap.add_argument("--size", type=int, default=256, help="poisson: map side")
    ap.add_argument("--model", default="ict", help="raster, fit: ict | procedural | a spec")
    ap.add_argument("--raster-n", type=int, default=8)
    ap.add_argument("--raster-sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--fit-n", type=int, default=8)
    ap.add_argument("--fit-size", type=int, default=256)
    ap.add_argument("--photometric-iters", type=int, default=40)
    ap.add_argument("--task", default="pncc", choices=("pncc", "inpaint", "position"))
    ap.add_argument("--train-n", type=int, default=256)
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for CPU tensors (0: torch's default; 2 "
                    "oversubscribe a shared 2-core box: 3-17x slower rasterizing, measured)")
    args = ap.parse_args()
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev} ({device_name(dev)}); torch {torch.__version__}; {os.cpu_count()} "
          f"cores, {torch.get_num_threads()} torch threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not dev.startswith("cuda"):
        print("no CUDA device: torch paths run on CPU tensors (GPU figures not measured)")
    sections = ("poisson", "raster", "fit", "train") if args.section == "all" else (
        args.section,)
    for sec in sections:
        globals()[f"bench_{sec}"](args, dev)


if __name__ == "__main__":
    main()
