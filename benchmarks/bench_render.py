"""Benchmark the CPU renderer: ms per view for PNCC alone and for RGB + PNCC + mask from one
raster pass, at 128^2 and 256^2, on 1 thread and on all cores, next to a plain numpy reference
rasterizer (per-triangle bounding-box tests, ``raster.rasterize_reference``) measured in the
same run.

Meshes: the ICT-FaceKit face region (9,409 vertices; needs ``$FACECORPUS_ASSETS``, else the
row is skipped with a message) and a 38,025-vertex mesh (the procedural fixture at n = 195,
75k triangles). Views sweep yaw over -60 ... 60 degrees (orthographic, the face filling 90%).

Usage: python benchmarks/bench_render.py [--repeats 30] [--reference-repeats 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numba
import numpy as np
from facecorpus.meshops.geometry import ncc, vertex_normals
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers.cameras import framing_camera
from facecorpus.renderers.raster import rasterize_reference
from facecorpus.renderers.render import render

SIZES = (128, 256)
YAWS = (-60, -30, 0, 30, 60)


def meshes():
    out = []
    if os.environ.get("FACECORPUS_ASSETS"):
        try:
            from facecorpus.meshops.ict import build_ict_facekit

            m = build_ict_facekit(region="face")
            out.append(("ICT face", m.vertices, m.triangles))
        except Exception as e:  # noqa: BLE001 - a benchmark row, not a pipeline
            print(f"# ICT face row skipped: {e}")
    else:
        print("# ICT face row skipped: FACECORPUS_ASSETS is not set")
    m = procedural_model(n=195, n_id=1, n_exp=1, n_albedo=0)
    out.append(("procedural n195", m.vertices, m.triangles))
    return out


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU time of this thread) in ms. On a shared machine the
    thread CPU time of a 1-thread run is the contention-free cost; wall time is what a caller
    waits for."""
    ts, cs = [], []
    for k in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        fn(k)
        ts.append(time.perf_counter() - t)
        cs.append(time.thread_time() - c)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts)), 1e3 * float(np.median(cs))


def reference_pncc(v, tris, code, cam):
    """Plain numpy: project, per-triangle bounding-box rasterization, gather-interpolate."""
    sv = cam.project(v.astype(np.float64))[None]
    fr = rasterize_reference(sv, tris, cam.height, cam.width, perspective_correct=False)
    p2f = fr.pix_to_face[0]
    hit = p2f >= 0
    img = np.zeros((cam.height, cam.width, 3), np.float32)
    img[hit] = np.einsum("pk,pkc->pc", fr.bary[0][hit], code[tris[p2f[hit]]])
    return img


def row(v, tris, code, vn, cams, repeats: int) -> tuple:
    """(pncc, rgb+pncc+mask, 16-view batch pncc per view): each (median, min) ms per view."""

    def pncc(k):
        render(v, tris, cams[k % len(cams)], outputs=("pncc",), ncc=code)

    def full(k):
        render(v, tris, cams[k % len(cams)], outputs=("image", "mask", "pncc"), ncc=code,
               vertex_normals=vn)

    batch = [cams[k % len(cams)] for k in range(16)]

    def batched(k):
        render(v, tris, batch, outputs=("pncc",), ncc=code)

    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n_b = max(3, repeats // 8)
    b = timed(batched, n_b)
    # minor page faults per batch call: fresh output memory is first-touched on every call
    # unless glibc keeps freed memory (see docs/benchmarks.md, Renderers)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n_b
    return timed(pncc, repeats), timed(full, repeats), tuple(x / 16 for x in b), faults


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--reference-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numba "
          f"{numba.__version__}, threads: 1 and {all_threads}")
    print("# ms per view: median wall (min wall) [median thread CPU, 1-thread rows only]")
    print(f"{'mesh':17s} {'V':>6s} {'F':>6s} {'size':>4s} {'thr':>3s} {'pncc':>21s} "
          f"{'rgb+pncc+mask':>21s} {'batch16 pncc':>21s} {'numpy ref':>9s} {'speed-up':>8s} "
          f"{'b16 faults/call':>8s}")

    def cell(t, threads):
        cpu = f"[{t[2]:5.2f}]" if threads == 1 else " " * 7
        return f"{t[0]:6.2f} ({t[1]:5.2f}) {cpu}"

    for name, v, tris in meshes():
        code = ncc(v)
        vn = vertex_normals(v, tris)
        for S in SIZES:
            cams = [framing_camera(v, S, S, yaw=y) for y in YAWS]
            # warm up (compile or load the numba cache) outside the timings
            render(v, tris, cams[0], outputs=("image", "mask", "pncc"), ncc=code,
                   vertex_normals=vn)
            ref = timed(lambda k, v=v, tris=tris, code=code, cams=cams:
                        reference_pncc(v, tris, code, cams[k % len(cams)]),
                        args.reference_repeats)[0]
            for threads in sorted({1, all_threads}):
                numba.set_num_threads(threads)
                p, f, b, faults = row(v, tris, code, vn, cams, args.repeats)
                print(f"{name:17s} {len(v):6d} {len(tris):6d} {S:4d} {threads:3d} "
                      f"{cell(p, threads)} {cell(f, threads)} {cell(b, threads)} "
                      f"{ref:9.1f} {ref / p[0]:7.0f}x {faults:8.0f}", flush=True)
            numba.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
