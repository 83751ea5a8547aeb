"""De-lit albedo through the pseudo-GT flow (issue #13 item 3): accuracy and cost.

The scene of ``tests/test_pseudo_gt_extras.py::lit``: one known albedo (the procedural
model's smooth UV texture) under four known coloured directional SH lights, stage 2 on, the
user texture prior = the albedo. The flow runs once per ``albedo.light`` setting (``stage2``:
the old behaviour, de-light with stage 2's SH; ``refit``: the albedo-space light estimate);
for every image the script prints ``uv_albedo`` PSNR against the known albedo on the stored
``uv_mask & uv_visible_mask`` and the diagnostics that locate the error:

- ``true SH``: the flow's own ``uv_pseudo_gt`` and fitted mesh, de-lit with the true light;
- ``gain``: the per-channel scale that best maps the stored albedo onto the truth, and the
  PSNR after it (what a light-level / white-balance error alone costs);
- ``oracle``: the photo unwrapped with the true mesh and camera (mask eroded 1 px, as
  ``tests/test_albedo.py``), de-lit with the true light;
- band-0 of the fitted and true light, and the per-image prior's mean gain over the albedo.

Cost: the ``finish`` step's seconds per photo of each setting, measured in this process on
the same analysed shard (best of ``--reps``). Prints ``uptime``'s load beside them.

    FACECORPUS_ASSETS=/work/shared .venv/bin/python benchmarks/bench_albedo_flow.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _load():
    return os.getloadavg()


def scene(T: int):
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch
    from test_albedo import _light

    sh = np.stack([_light(s) for s in range(4)])
    sh[:, 0::9] = 2 / np.sqrt(np.pi)
    model = procedural_model()
    parts = [synthetic_batch(model, 1, 256, seed=10, sh=sh[i], yaw_max=20, texture_size=T)
             for i in range(4)]
    return model, parts, sh


_CAPTURED: list = []


def _capture_delight(pgt, sh, model, verts, rots, **kw):
    from facecorpus.tasks.albedo import delight

    _CAPTURED.append((pgt.copy(), np.array(sh), np.array(verts), np.array(rots)))
    return delight(pgt, sh, model, verts, rots, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uv", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lights", default="stage2,refit")
    args = ap.parse_args()
    from facecorpus.datasets.store import open_dataset
    from facecorpus.flows import pseudo_gt as P
    from facecorpus.tasks import pseudo_gt as S
    from facecorpus.tasks.albedo import delight
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.unwrap import psnr, unwrap_one
    from test_pseudo_gt_extras import BASE, write_listing
    from test_pseudo_gt_extras import _u8 as u8

    T = args.uv
    model, parts, sh_true = scene(T)
    tex = parts[0].uv_texture
    work = Path(tempfile.mkdtemp(prefix="bench_albedo_"))
    (work / "in").mkdir()
    from PIL import Image

    Image.fromarray(u8(tex)).save(work / "in" / "tex.png")
    tex8 = np.asarray(Image.open(work / "in" / "tex.png"), np.float32) / 255
    listing = write_listing(work / "in", [p.image[0] for p in parts],
                            [p.landmarks[0] for p in parts])
    # the oracle: the photo unwrapped with the true mesh and camera, true light
    oracle = []
    for i, p in enumerate(parts):
        v = p.truth.vertices(model, 0)
        u = unwrap_one(p.image[0], v, p.truth.camera_for(0), model, T, erode(p.mask[0], 1))
        al = delight(u.uv_visible, sh_true[i:i + 1], model, v[None],
                     p.truth.camera_for(0).rotation[None], mask=u.uv_visible_mask)
        oracle.append(psnr(al.uv_albedo[0], tex, al.uv_mask[0]))
    print(f"load {_load()}")
    results = {}
    for light in args.lights.split(","):
        over = {**BASE, "unwrap.uv_size": T, "albedo.enabled": True, "prior.kind": "user",
                "prior.texture": str(work / "in" / "tex.png")}
        if light != "stage2" or _has_light_key():
            over["albedo.light"] = light
        cfg = P.load_config(None, over)
        _CAPTURED.clear()
        stages = dataclasses.replace(S.STAGES, delight=_capture_delight)
        out = work / f"out-{light}"
        s = P.run_local(cfg, listing, out, stages=stages)
        assert s["accepted"] == 4, s
        ds = open_dataset(str(out / "dataset"))
        man = ds.manifest.to_pydict()
        order = [int(u.rsplit("/f", 1)[-1][:-4]) for u in man["source_uri"]]
        idx = list(range(4))
        alb = ds.read("uv_albedo", idx).astype(np.float32) / 255
        irr = ds.read("uv_irradiance", idx).astype(np.float32)
        pgt = ds.read("uv_pseudo_gt", idx).astype(np.float32) / 255
        vis = ds.read("uv_visible", idx).astype(np.float32) / 255
        um = ds.read("uv_mask", idx)[..., 0] > 0
        vm = ds.read("uv_visible_mask", idx)[..., 0] > 0
        sh_fit2 = ds.read("sh", idx)
        rows = []
        for i in idx:
            k = order[i]
            m = um[i] & vm[i]
            cap = next(c for c in _CAPTURED if np.array_equal(c[0][0], (pgt[i] * 255 + .5)
                                                               .astype(np.uint8)))
            _, sh_used, verts, rots = cap
            a_true = delight(pgt[i][None], sh_true[k:k + 1], model, verts, rots, mask=vm[i][None])
            mt = a_true.uv_mask[0]
            g = (alb[i][m] * tex[m]).sum(0) / (alb[i][m] ** 2).sum(0)
            per = _prior_gain(tex8, vis[i], vm[i])
            rows.append({
                "image": k, "uv_albedo": psnr(alb[i], tex, m), "lit": psnr(pgt[i], tex, m),
                "true SH": psnr(a_true.uv_albedo[0], tex, mt),
                "after gain": psnr(np.clip(alb[i] * g, 0, 1), tex, m), "gain": g,
                "oracle": oracle[k], "relight": psnr(alb[i] * irr[i], pgt[i], um[i]),
                "band0 used": sh_used[0, 0::9], "band0 stage2": sh_fit2[i, 0::9],
                "band0 true": sh_true[k, 0::9], "prior gain": per,
                "mask frac": m.sum() / max(vm[i].sum(), 1)})
        results[light] = rows
        print(f"\n== albedo.light = {light} (load {_load()})")
        for r in sorted(rows, key=lambda r: r["image"]):
            print(f"image {r['image']}: uv_albedo {r['uv_albedo']:.1f} dB | lit {r['lit']:.1f}"
                  f" | true SH {r['true SH']:.1f} | after per-channel gain "
                  f"{r['after gain']:.1f} (gain {np.round(r['gain'], 3)}) | oracle "
                  f"{r['oracle']:.1f} | relight vs pgt {r['relight']:.1f} | M_uv/visible "
                  f"{r['mask frac']:.3f}")
            print(f"   band0 used {np.round(r['band0 used'], 3)} stage2 "
                  f"{np.round(r['band0 stage2'], 3)} true {np.round(r['band0 true'], 3)}; "
                  f"per-image prior gain {np.round(r['prior gain'], 3)}")
    if args.reps:
        timing(args, listing, work, T)


def _has_light_key() -> bool:
    from facecorpus.configs.pseudo_gt import AlbedoConfig

    return "light" in AlbedoConfig.model_fields


def _prior_gain(tex, vis, vm):
    """Mean per-channel ratio of the per-image prior (fit_to_visible) to the albedo."""
    from facecorpus.tasks.prior import TexturePrior

    p = TexturePrior(mean=tex, basis=None, std=None, source="user")
    per = p.fit_to_visible(vis[None], vm[None])[0]
    return per[vm].mean(0) / tex[vm].mean(0)


def timing(args, listing, work, T):
    """finish() seconds per photo of each light setting on one analysed shard."""
    from facecorpus.flows import pseudo_gt as P
    from facecorpus.tasks import pseudo_gt as S
    from test_pseudo_gt_extras import BASE

    cfgs = {}
    for light in ["off"] + args.lights.split(","):
        over = {**BASE, "unwrap.uv_size": T, "prior.kind": "user",
                "prior.texture": str(work / "in" / "tex.png"), "output.sheets": False}
        if light != "off":
            over["albedo.enabled"] = True
            if light != "stage2" or _has_light_key():
                over["albedo.light"] = light
        cfgs[light] = P.load_config(None, over)
    s = P.run_local(cfgs["off"], listing, work / "t-off")
    assert s["accepted"] == 4
    job = P.PseudoGTJob(cfgs["off"], listing, work / "t-off")
    spec = job.plan()[0]  # reads the stored prior and the saved analysis back
    state, analysis, prior = job.state, job.analysis(spec), job.prior.prior
    best = {k: np.inf for k in cfgs}
    for _ in range(args.reps):
        for k, cfg in cfgs.items():
            t = time.perf_counter()
            S.finish(state, analysis, prior, cfg)
            best[k] = min(best[k], time.perf_counter() - t)
    n = len(analysis.arrays["sample_uri"])
    print(f"\nfinish() s/photo, best of {args.reps}, {n} photos, uv {T} (load {_load()}):")
    for k, v in best.items():
        print(f"  {k:8s} {v / n:.3f}" + ("" if k == "off" else
                                        f"  (+{(v - best['off']) / n:.3f})"))


if __name__ == "__main__":
    main()
