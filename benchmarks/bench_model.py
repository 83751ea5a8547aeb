"""Morphable-model layer throughput, each next to a reference measured in the same run.

    FACECORPUS_ASSETS=../shared .venv/bin/python benchmarks/bench_model.py

- OBJ reading: meshops.objio (numpy + regex) vs trimesh.load (reference) on the ICT neutral OBJ.
- ICT-FaceKit face-region build from the .tar.xz archive (160 OBJs), end to end.
- UV rasterization (numba) vs a per-triangle numpy reference, 512 x 512.
- Area-weighted vertex normals, a batch of 16 shapes: sparse incidence product vs np.add.at.
- UV mirror map at 256 x 256 (closest point on the mesh per texel).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np


def best_of(fn, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def raster_reference(uv, tris, S):
    """Per-triangle numpy rasterizer (same pixel-centre rule), the reference."""
    px, py = uv[:, 0] * S, (1 - uv[:, 1]) * S
    face = np.full((S, S), -1, np.int32)
    for f, (a, b, c) in enumerate(tris):
        xs, ys = px[[a, b, c]], py[[a, b, c]]
        c0, c1 = max(int(np.ceil(xs.min() - 0.5)), 0), min(int(np.floor(xs.max() - 0.5)), S - 1)
        r0, r1 = max(int(np.ceil(ys.min() - 0.5)), 0), min(int(np.floor(ys.max() - 0.5)), S - 1)
        if c1 < c0 or r1 < r0:
            continue
        X, Y = np.meshgrid(np.arange(c0, c1 + 1) + 0.5, np.arange(r0, r1 + 1) + 0.5)
        area = (xs[1] - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (ys[1] - ys[0])
        if abs(area) < 1e-14:
            continue
        w0 = ((xs[1] - X) * (ys[2] - Y) - (xs[2] - X) * (ys[1] - Y)) / area
        w1 = ((xs[2] - X) * (ys[0] - Y) - (xs[0] - X) * (ys[2] - Y)) / area
        inside = (w0 >= -1e-7) & (w1 >= -1e-7) & (1 - w0 - w1 >= -1e-7)
        face[r0:r1 + 1, c0:c1 + 1][inside] = f
    return face


def main() -> None:
    import trimesh
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.meshops.ict import build_ict_facekit, default_ict_source
    from facecorpus.meshops.objio import read_obj
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.meshops.uv import _CACHE, rasterize_uv, uv_mirror_map

    print(f"machine: {os.cpu_count()} cores")
    archive = default_ict_source()
    if archive is not None:
        with tarfile.open(archive) as tf:
            data = tf.extractfile("FaceXModel/generic_neutral_mesh.obj").read()
        t_ours, mesh = best_of(lambda: read_obj(data))
        t_ref, _ = best_of(lambda: trimesh.load(io.BytesIO(data), file_type="obj",
                                                process=False, maintain_order=True))
        nv = len(mesh.vertices)
        print(f"OBJ read ({nv} v, {len(mesh.face_sizes)} polygons, {len(data) / 1e6:.1f} MB): "
              f"objio {t_ours * 1e3:.0f} ms ({nv / t_ours / 1e6:.2f} Mv/s), "
              f"trimesh.load {t_ref * 1e3:.0f} ms -> x{t_ref / t_ours:.1f}")
        t0, c0 = time.perf_counter(), time.process_time()
        model = build_ict_facekit(archive, "face", cache=False)
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        print(f"ICT-FaceKit face build from {Path(archive).name} (160 OBJs): {t_build:.1f} s "
              f"wall, {c_build:.1f} s CPU (load average {os.getloadavg()[0]:.1f})")
    else:
        print("ICT archive absent (set FACECORPUS_ASSETS): OBJ/ICT rows skipped; using procedural")
        model = procedural_model(n=101)

    S = 512
    _CACHE.clear()
    rasterize_uv(model.uv[:3], np.array([[0, 1, 2]]), 8)  # numba compile outside the timing
    _CACHE.clear()
    t_r, r = best_of(lambda: (_CACHE.clear(), rasterize_uv(model.uv, model.uv_triangles, S))[1])
    t_ref, ref = best_of(lambda: raster_reference(model.uv.astype(np.float64),
                                                  model.uv_triangles, S), n=1)
    agree = np.mean((r.texel_face >= 0) == (ref >= 0))
    print(f"rasterize_uv {S}x{S}, {len(model.uv_triangles)} triangles: numba {t_r * 1e3:.1f} ms, "
          f"numpy reference {t_ref * 1e3:.0f} ms -> x{t_ref / t_r:.0f} (coverage agreement "
          f"{agree:.5f})")

    batch = np.stack([model.vertices + np.float32(i) for i in range(16)])
    t_n, n1 = best_of(lambda: vertex_normals(batch, model.triangles))

    def add_at():
        t = model.triangles
        v = batch.astype(np.float64)
        fn = np.cross(v[:, t[:, 1]] - v[:, t[:, 0]], v[:, t[:, 2]] - v[:, t[:, 0]])
        acc = np.zeros_like(v)
        for k in range(3):
            np.add.at(acc, (slice(None), t[:, k]), fn)
        return acc / np.linalg.norm(acc, axis=-1, keepdims=True)

    t_a, n2 = best_of(add_at)
    print(f"vertex_normals batch 16 x {model.n_vertices} v: sparse {t_n * 1e3:.1f} ms, "
          f"np.add.at {t_a * 1e3:.1f} ms -> x{t_a / t_n:.1f} (max diff {np.abs(n1 - n2).max():.1e})")

    t_m, mm = best_of(lambda: uv_mirror_map(model, 256), n=1)
    cov = (mm[..., 0] >= 0).sum() / max(1, (rasterize_uv(model.uv, model.uv_triangles, 256)
                                            .texel_face >= 0).sum())
    print(f"uv_mirror_map 256x256: {t_m:.2f} s (coverage {cov:.4f})")


if __name__ == "__main__":
    main()
