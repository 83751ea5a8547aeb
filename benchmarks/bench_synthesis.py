"""Synthesis throughput: DR encode/decode, per-pair rendering against the render-crop-resize
reference, and end-to-end pairs/s through `facecorpus run synthesis` (Prefect + Dask, augment + render +
crop + compress + write) with 1 and 2 worker processes; optionally a long measured run extrapolated to the 690k-pair config.

    FACECORPUS_ASSETS=../shared .venv/bin/python benchmarks/bench_synthesis.py            # quick
    FACECORPUS_ASSETS=../shared .venv/bin/python benchmarks/bench_synthesis.py --big 50000

Model: ICT-FaceKit face area (9,409 vertices, 18,460 triangles) when the archive is found,
else the procedural test model. Sources: random model samples (textures procedural).
Each worker is a process with one numba thread, shards are handed out dynamically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_PAIRS = 690_004  # configs/srtc_690k.yaml: 36,316 faces x 19 poses


def _model_spec() -> str:
    try:
        from facecorpus.meshops.ict import load_ict_facekit

        load_ict_facekit("face")
        return "ict"
    except Exception as e:  # noqa: BLE001 - benchmark falls back to the test model
        print(f"(ICT-FaceKit unavailable: {e}; using the procedural model)")
        return "procedural"


def make_cfg(model: str, n_faces: int, workers: int, **out):
    from facecorpus.configs.synthesis import SynthesisConfig

    return SynthesisConfig.model_validate({
        "model": model, "seed": 0, "workers": workers,
        "subjects": {"source": "random", "n_random": 60, "n_groups": 2, "texture_size": 256},
        "augment": {"n_faces": n_faces},
        "output": {"faces_per_shard": 16, "uv_size": 84, **out},
    })


# --------------------------------------------------------------------------- DR
def bench_dr(model_spec: str, n: int = 20) -> dict:
    from facecorpus.meshops import dr
    from facecorpus.tasks.synthesis import load_model

    model = load_model(model_spec)
    rng = np.random.default_rng(0)
    meshes = [model.shape(rng.normal(size=model.n_id) * model.id_std) for _ in range(n)]
    ref = np.mean(meshes, 0)
    t = time.process_time()
    topo = dr.DRTopology(ref, model.triangles)
    t_fact = time.process_time() - t
    t = time.process_time()
    feats = [dr.encode(topo, v) for v in meshes]
    t_enc = (time.process_time() - t) / n
    t = time.process_time()
    outs = [dr.decode(topo, f, anchor_position=v[topo.anchors]) for f, v in zip(feats, meshes, strict=True)]
    t_dec = (time.process_time() - t) / n
    err = max(float(np.abs(o - v).max() / np.abs(v).max()) for o, v in zip(outs, meshes,
                                                                           strict=True))
    res = {"vertices": model.n_vertices, "factorize_ms": 1e3 * t_fact,
           "encode_ms": 1e3 * t_enc, "decode_ms": 1e3 * t_dec, "roundtrip_rel_err": err}
    print(f"DR ({model.n_vertices} vertices, CPU time): topology+factorisation "
          f"{res['factorize_ms']:.0f} ms once; encode {res['encode_ms']:.1f} ms/mesh; decode "
          f"{res['decode_ms']:.1f} ms/mesh "
          f"(reused factorisation); round trip max rel err {err:.1e}")
    return res


# --------------------------------------------------------------------------- rendering
def bench_render(model_spec: str, faces: int = 4) -> dict:
    """Ours (crop folded into the camera, rasterise at 128) vs the reference: the renderers'
    one-pass ``render`` at 512 with a framing camera, crop the foreground's bounding square,
    resize each output to 128."""
    import numba
    from facecorpus.renderers.cameras import framing_camera
    from facecorpus.renderers.render import render
    from facecorpus.tasks.augment import face_rng
    from facecorpus.tasks.render_views import render_views, sample_view_params
    from PIL import Image

    numba.set_num_threads(1)
    from facecorpus.tasks.synthesis import build_state

    ctx = build_state(make_cfg(model_spec, 8, 1))
    m = ctx.model
    subj = ctx.prepared.subjects
    S, big = 128, 512

    def ours(i):
        rng = face_rng(0, 2, i)
        p = sample_view_params(rng, ctx.yaws)
        bg = ctx.backgrounds.sample_many(rng, len(ctx.yaws), S)
        return render_views(subj.vertices[i], m.triangles, ctx.corner_uv, subj.textures[i],
                            ctx.ncc, p, bg, size=S)

    def reference(i):
        """The published way with the renderers' one-pass render: 512 px, crop, resize."""
        rng = face_rng(0, 2, i)
        p = sample_view_params(rng, ctx.yaws)
        bg = ctx.backgrounds.sample_many(rng, len(ctx.yaws), S)
        v = subj.vertices[i]
        cams = [framing_camera(v, big, big, yaw=p.yaw[k], pitch=p.pitch[k], roll=p.roll[k],
                               kind="perspective") for k in range(len(p.yaw))]
        out = render(v, m.triangles, cams, outputs=("image", "mask", "depth", "pncc"),
                     ncc=ctx.ncc, sh=p.sh, uv=m.uv, uv_triangles=m.uv_triangles,
                     uv_texture=subj.textures[i])
        res = []
        for k in range(len(p.yaw)):
            mk = out.mask[k]
            rows, cols = np.flatnonzero(mk.any(1)), np.flatnonzero(mk.any(0))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            side = max(r1 - r0, c1 - c0)
            y0, x0 = (r0 + r1 - side) // 2, (c0 + c1 - side) // 2
            crops = []
            for a in (out.image[k], out.pncc[k], mk[..., None].astype(np.float32),
                      out.depth[k][..., None]):
                pad = np.pad(a, ((side, side), (side, side), (0, 0)))
                c = pad[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
                if a.dtype == np.float32 and a is not out.depth[k][..., None]:
                    c = (np.clip(c, 0, 1) * 255 + 0.5).astype(np.uint8)
                im = Image.fromarray(c[..., 0] if c.shape[-1] == 1 else c)
                crops.append(np.asarray(im.resize((S, S), Image.BILINEAR)))
            m128 = crops[2] >= 128
            crops[0] = np.where(m128[..., None], crops[0], bg[k])
            res.append(crops)
        return res

    P = len(ctx.yaws)
    ours(0), reference(0)  # compile / warm caches
    # CPU time, not wall time: the number that does not move with other load on the machine
    t = time.process_time()
    for i in range(faces):
        ours(i)
    t_ours = (time.process_time() - t) / (faces * P)
    t = time.process_time()
    for i in range(faces):
        reference(i)
    t_ref = (time.process_time() - t) / (faces * P)
    print(f"render one pair (image+PNCC+mask+depth+background, 128x128, 1 thread): ours "
          f"{1e3 * t_ours:.2f} CPU-ms; reference render 512 + crop + resize "
          f"{1e3 * t_ref:.2f} CPU-ms ({t_ref / t_ours:.1f}x)")
    return {"ours_ms_per_pair": 1e3 * t_ours, "reference_ms_per_pair": 1e3 * t_ref}


# --------------------------------------------------------------------------- end to end
def run_processes(cfg, out: Path, workers: int) -> dict:
    """All shards of ``cfg`` through the CLI as a user runs it: ``facecorpus run synthesis``,
    Prefect + a Dask LocalCluster of ``workers`` processes (fresh output); wall time of the
    whole command, start-up and source preparation included."""
    import subprocess

    import yaml

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg_path = out.parent / f"{out.name}.yaml"
    d = cfg.model_dump(mode="json")
    d.update(workers=workers, task_runner="dask" if workers > 1 else "threads")
    cfg_path.write_text(yaml.safe_dump(d))
    load0 = os.getloadavg()
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "facecorpus.cli", "run", "synthesis", "--config",
                    str(cfg_path), "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    load1 = os.getloadavg()
    summary = json.loads((out / "summary.json").read_text())
    pairs = summary["pairs"]
    size = sum(p.stat().st_size for sub in ("views", "faces") for p in (out / sub).rglob("*")
               if p.is_file())  # the datasets only (not the run's prepared-sources cache)
    cpu = summary["cpu_seconds_in_shards"]
    return {"workers": workers, "pairs": pairs, "faces": summary["faces"], "wall_s": wall,
            "pairs_per_s": pairs / wall, "cpu_ms_per_pair": 1e3 * cpu / max(pairs, 1),
            "bytes_per_pair": size / max(pairs, 1), "phases": summary["phase_wall_seconds"],
            "rejected": summary["rejected_draws"], "loadavg_before": load0[0],
            "loadavg_after": load1[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=96, help="faces per end-to-end run (x19 pairs)")
    ap.add_argument("--big", type=int, default=0, help="also a measured run of >= this many pairs")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--compression", default="zstd", choices=("zstd", "blosc-lz4"))
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--skip", nargs="*", default=[], choices=("dr", "render", "e2e"))
    args = ap.parse_args(argv)

    spec = _model_spec()
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; "
          f"python {sys.version.split()[0]}; model {spec}")
    results: dict = {"model": spec, "cores": os.cpu_count()}
    if "dr" not in args.skip:
        results["dr"] = bench_dr(spec)
    if "render" not in args.skip:
        results["render"] = bench_render(spec)
    scratch = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-synth-"))
    try:
        comp = {"compression": args.compression, "compression_level": args.level}
        if "e2e" not in args.skip:
            runs = []
            for w in args.workers:
                r = run_processes(make_cfg(spec, args.faces, w, **comp), scratch / f"w{w}", w)
                runs.append(r)
                print(f"end to end, {w} worker(s): {r['pairs']} pairs in {r['wall_s']:.1f} s = "
                      f"{r['pairs_per_s']:.1f} pairs/s; {r['cpu_ms_per_pair']:.2f} CPU-ms/pair "
                      f"({r['bytes_per_pair'] / 1024:.0f} KiB/pair on disk; load avg "
                      f"{r['loadavg_before']:.1f} -> {r['loadavg_after']:.1f})")
            if len(runs) > 1:
                print(f"scaling {runs[0]['workers']} -> {runs[-1]['workers']} workers: "
                      f"{runs[-1]['pairs_per_s'] / runs[0]['pairs_per_s']:.2f}x")
            results["e2e"] = runs
        if args.big:
            w = max(args.workers)
            faces = -(-args.big // 19)
            r = run_processes(make_cfg(spec, faces, w, **comp), scratch / "big", w)
            eta = TARGET_PAIRS / r["pairs_per_s"]
            print(f"measured run: {r['pairs']} pairs, {w} workers, {r['wall_s']:.0f} s = "
                  f"{r['pairs_per_s']:.1f} pairs/s, {r['cpu_ms_per_pair']:.2f} CPU-ms/pair (load avg {r['loadavg_before']:.1f} -> "
                  f"{r['loadavg_after']:.1f}); extrapolated 690,004 pairs: {eta / 60:.1f} min "
                  f"(goal <= 60 min = 191.7 pairs/s); disk "
                  f"{r['bytes_per_pair'] * TARGET_PAIRS / 2**30:.1f} GiB")
            results["big"] = {**r, "extrapolated_690k_s": eta}
    finally:
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
