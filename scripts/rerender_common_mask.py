"""Compare two pseudo-GT datasets of the same photos like for like: each sample's
``uv_pseudo_gt`` re-rendered with its own stored fit (unlit texture lookup, as the flow's
``rerender_psnr``), PSNR against the stored crop over the intersection of both runs' face masks
(the manifest's own PSNR uses each run's mask, which differ when the unwrap config changes).

    FACECORPUS_ASSETS=../shared python scripts/rerender_common_mask.py OUT_A/dataset OUT_B/dataset [--model ict]
"""

from __future__ import annotations

import argparse

import numpy as np

COLS = ["source_uri", "yaw", "pitch", "roll", "tx", "ty", "tz", "scale", "focal", "camera"]


def rerender(model, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) float re-render and (S, S) bool coverage of one stored sample."""
    from facecorpus.renderers.render import render
    from facecorpus.tasks.fit import FitResult

    persp = s["camera"] == "perspective"
    t = [s["tx"], s["ty"], s["tz"]] if persp else [s["tx"], s["ty"]]
    f = {k: None for k in FitResult.__dataclass_fields__}
    f.update(camera=s["camera"], image_size=int(s["image"].shape[0]), yaw=np.r_[s["yaw"]],
             pitch=np.r_[s["pitch"]], roll=np.r_[s["roll"]],
             translation=np.array([t], np.float32), scale=np.r_[s["scale"]].astype(np.float32),
             focal=np.r_[s["focal"]].astype(np.float32),
             alpha=np.asarray(s["id_coeffs"])[None], beta=np.asarray(s["exp_coeffs"])[None])
    fit = FitResult(**f)
    amb = np.zeros(27, np.float32)
    amb[0::9] = 2 / np.sqrt(np.pi)
    tex = np.asarray(s["uv_pseudo_gt"]).astype(np.float32) / 255
    r = render(fit.vertices(model, 0), model.triangles, fit.camera_for(0),
               outputs=("image", "mask"), uv=model.uv, uv_triangles=model.uv_triangles,
               uv_texture=tex, sh=amb)
    return r.image[0], r.mask[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--model", default="ict")
    args = ap.parse_args()
    from facecorpus.datasets.reader import ShardDataset
    from facecorpus.meshops.catalog import load_model

    model = load_model(args.model)
    runs = [ShardDataset(r, columns=COLS) for r in (args.a, args.b)]
    by_uri = [{d[i]["source_uri"]: d[i] for i in range(len(d))} for d in runs]
    for uri in sorted(set(by_uri[0]) & set(by_uri[1])):
        a, b = by_uri[0][uri], by_uri[1][uri]
        photo = np.asarray(a["image"]).astype(np.float32) / 255
        (ra, ma), (rb, mb) = rerender(model, a), rerender(model, b)
        common = (np.asarray(a["mask"]).squeeze().astype(bool)
                  & np.asarray(b["mask"]).squeeze().astype(bool) & ma & mb)
        ps = [10 * np.log10(1 / max(float(((r[common] - photo[common]) ** 2).mean()), 1e-12))
              for r in (ra, rb)]
        print(f"{uri.split('/')[-1]:36s} common mask {common.mean():.3f} of the crop; "
              f"rerender PSNR {ps[0]:.2f} -> {ps[1]:.2f} dB")


if __name__ == "__main__":
    main()
