"""Compare two pseudo-GT datasets of the same photos like for like: each sample's
``uv_pseudo_gt`` re-rendered with its own stored fit (unlit texture lookup, as the flow's
``rerender_psnr``), PSNR against the stored crop over the intersection of both runs' face masks
(the manifest's own PSNR uses each run's mask, which differ when the unwrap config changes).

    FACECORPUS_ASSETS=../shared python scripts/rerender_common_mask.py OUT_A/dataset OUT_B/dataset \
        [--model ict] [--decompose] [--groups 3]

``--decompose`` splits the re-render error into what the fit does and what happens after it
(#12: stage 2 as LM lost re-render PSNR although its energy was lower):

- ``roundtrip``: the photo unwrapped with the run's stored fit (``tasks.unwrap.unwrap_one``,
  the flow's ``unwrap`` settings) and re-rendered with the same fit, PSNR over the common mask
  ∩ pixels whose texels are all visible — the resampling loss of that fit alone, before the
  occlusion mask, the texture prior and the Poisson blend;
- ``offset``: mean |uv_pseudo_gt - uv_visible| over the texels the blend marks visible: the
  blend keeps the photo's gradients there but not its values (the prior is the boundary of
  the Poisson problem), so this smooth offset enters the re-render error;
- ``prior+mirror``: the fraction of the common mask whose texels came from the prior or the
  mirror.

Why the round trip says nothing about the fit's accuracy: unwrapping and re-rendering use the
same fit, so a wrong pose or scale still maps every pixel back onto itself (``--perturb``
re-runs the round trip of run A with its yaw +8 deg, its scale x0.96 and x1.04 and its x
translation +5 px to show it). ``--groups G`` prints medians per ``photo index % G`` (the
bench_pipeline corpus cycles through its G source photos).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import numpy as np

COLS = ["source_uri", "yaw", "pitch", "roll", "tx", "ty", "tz", "scale", "focal", "camera"]


def stored_fit(s: dict):
    """The one-image ``FitResult`` of a stored sample (pose, camera, coefficients)."""
    from facecorpus.tasks.fit import FitResult

    persp = s["camera"] == "perspective"
    t = [s["tx"], s["ty"], s["tz"]] if persp else [s["tx"], s["ty"]]
    f = {k: None for k in FitResult.__dataclass_fields__}
    f.update(camera=s["camera"], image_size=int(s["image"].shape[0]), yaw=np.r_[s["yaw"]],
             pitch=np.r_[s["pitch"]], roll=np.r_[s["roll"]],
             translation=np.array([t], np.float32), scale=np.r_[s["scale"]].astype(np.float32),
             focal=np.r_[s["focal"]].astype(np.float32),
             alpha=np.asarray(s["id_coeffs"])[None], beta=np.asarray(s["exp_coeffs"])[None])
    return FitResult(**f)


def render_texture(model, fit, tex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, C) unlit lookup of the (T, T, C) float ``tex`` through ``fit`` and (S, S) bool
    coverage."""
    from facecorpus.renderers.render import render

    amb = np.zeros(27, np.float32)
    amb[0::9] = 2 / np.sqrt(np.pi)  # irradiance 1: plain texture lookup
    r = render(fit.vertices(model, 0), model.triangles, fit.camera_for(0),
               outputs=("image", "mask"), uv=model.uv, uv_triangles=model.uv_triangles,
               uv_texture=np.asarray(tex, np.float32), sh=amb)
    return r.image[0], r.mask[0]


def rerender(model, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) float re-render and (S, S) bool coverage of one stored sample."""
    return render_texture(model, stored_fit(s),
                          np.asarray(s["uv_pseudo_gt"]).astype(np.float32) / 255)


def psnr(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    return 10 * np.log10(1 / max(float(((a[m] - b[m]) ** 2).mean()), 1e-12))


def roundtrip(model, s: dict, fit, mask: np.ndarray, uv_size: int, min_cos: float) -> float:
    """PSNR of the photo unwrapped with ``fit`` and re-rendered with it, over ``mask`` ∩ the
    pixels whose texels are all visible."""
    from facecorpus.tasks.unwrap import unwrap_one

    img = np.asarray(s["image"])
    u = unwrap_one(img, fit.vertices(model, 0), fit.camera_for(0), model, uv_size,
                   np.asarray(s["mask"]).squeeze().astype(bool), min_cos=min_cos)
    tex = np.asarray(u.uv_visible[0], np.float32)
    tex = tex / 255 if tex.max() > 1.5 else tex
    im, cov = render_texture(model, fit, tex)
    vis, _ = render_texture(model, fit, np.repeat(
        np.asarray(u.uv_visible_mask[0], np.float32)[..., None], 3, -1))
    return psnr(im, img.astype(np.float32) / 255, mask & cov & (vis[..., 0] > 0.999))


def decompose(model, s: dict, common: np.ndarray, uv_size: int, min_cos: float) -> dict:
    src = np.asarray(s["uv_source"])[..., 0]
    vis = src == 1
    pg = np.asarray(s["uv_pseudo_gt"]).astype(np.float32) / 255
    uv = np.asarray(s["uv_visible"]).astype(np.float32) / 255
    cls, _ = render_texture(model, stored_fit(s), (src == 1)[..., None].astype(np.float32))
    return {"roundtrip": roundtrip(model, s, stored_fit(s), common, uv_size, min_cos),
            "offset": float(np.abs(pg - uv)[vis].mean()),
            "prior+mirror": float((cls[..., 0][common] < 0.5).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--model", default="ict")
    ap.add_argument("--decompose", action="store_true",
                    help="split the error: fit round trip, blend offset, prior/mirror share")
    ap.add_argument("--perturb", action="store_true",
                    help="round trip of run A under deliberately wrong fits")
    ap.add_argument("--groups", type=int, default=0, help="medians per photo index %% G")
    args = ap.parse_args()
    from facecorpus.configs import load_config
    from facecorpus.datasets.reader import ShardDataset
    from facecorpus.meshops.catalog import load_model

    uc = load_config(None, "pseudo_gt", {"model": args.model}).unwrap
    model = load_model(args.model)
    runs = [ShardDataset(r, columns=COLS) for r in (args.a, args.b)]
    by_uri = [{d[i]["source_uri"]: i for i in range(len(d))} for d in runs]
    rows = []
    for uri in sorted(set(by_uri[0]) & set(by_uri[1])):
        a, b = runs[0][by_uri[0][uri]], runs[1][by_uri[1][uri]]
        photo = np.asarray(a["image"]).astype(np.float32) / 255
        (ra, ma), (rb, mb) = rerender(model, a), rerender(model, b)
        common = (np.asarray(a["mask"]).squeeze().astype(bool)
                  & np.asarray(b["mask"]).squeeze().astype(bool) & ma & mb)
        name = uri.split("/")[-1]
        row = {"name": name, "mask": float(common.mean()),
               "psnr": [psnr(r, photo, common) for r in (ra, rb)]}
        line = (f"{name:24s} common mask {row['mask']:.3f} of the crop; "
                f"rerender PSNR {row['psnr'][0]:.2f} -> {row['psnr'][1]:.2f} dB")
        if args.decompose:
            da, db = (decompose(model, s, common, uc.uv_size, uc.min_cos) for s in (a, b))
            for k in da:
                row[k] = [da[k], db[k]]
            line += (f"; roundtrip {da['roundtrip']:.2f} -> {db['roundtrip']:.2f} dB; offset "
                     f"{da['offset']:.4f} -> {db['offset']:.4f}; prior+mirror "
                     f"{da['prior+mirror']:.3f} -> {db['prior+mirror']:.3f}")
        if args.perturb:
            f = stored_fit(a)
            wrong = {"yaw+8": dataclasses.replace(f, yaw=f.yaw + 8),
                     "scale*0.96": dataclasses.replace(f, scale=f.scale * 0.96),
                     "scale*1.04": dataclasses.replace(f, scale=f.scale * 1.04),
                     "tx+5px": dataclasses.replace(
                         f, translation=f.translation + np.float32([[5] + [0] * (
                             f.translation.shape[1] - 1)]))}
            line += "; A round trip with " + ", ".join(
                f"{k} {roundtrip(model, a, w, common, uc.uv_size, uc.min_cos):.2f}"
                for k, w in wrong.items())
        print(line, flush=True)
        rows.append(row)
    keys = [k for k in ("psnr", "roundtrip", "offset", "prior+mirror") if k in rows[0]]

    def summary(label, sel):
        print(f"median {label} (n={len(sel)}): " + "; ".join(
            f"{k} {np.median([r[k][0] for r in sel]):.4g} -> "
            f"{np.median([r[k][1] for r in sel]):.4g}" for k in keys))

    summary("all", rows)
    if args.groups:
        idx = [int(m.group(1)) if (m := re.search(r"(\d+)", r["name"])) else 0 for r in rows]
        for g in range(args.groups):
            summary(f"group {g}", [r for r, i in zip(rows, idx) if i % args.groups == g])


if __name__ == "__main__":
    main()
