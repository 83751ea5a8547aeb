"""Compare two pseudo-GT datasets of the same photos on the pixels both call clean face.

A run that removes more occluders fills more of the face from its prior, and a rerender
compared with the photo (occluders included) is penalised for exactly that. This compares
each sample's rerendered ``uv_pseudo_gt`` (as ``rerender_common_mask.py`` does) with the
stored crop over the pixels inside both runs' face masks that neither run marks occluded:
its image-space ``occlusion_mask`` and its ``uv_occlusion_mask`` rendered back into the crop.
It also prints each run's occluded share of the face, and the medians.

    FACECORPUS_ASSETS=../shared python scripts/clean_rerender.py OUT_A/dataset OUT_B/dataset [--model ict]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from rerender_common_mask import COLS, rerender


def occluded_pixels(model, s: dict) -> np.ndarray:
    """(S, S) bool crop pixels a run marks occluded (image cues + UV cues rendered back)."""
    uv_occ = np.asarray(s["uv_occlusion_mask"]).astype(np.float32)
    t = dict(s, uv_pseudo_gt=np.repeat(uv_occ, 3, -1) * 255)
    img, cov = rerender(model, t)
    return (np.asarray(s["occlusion_mask"]).squeeze().astype(bool)
            | (cov & (img[..., 0] > 0.5)))


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
    rows = []
    for uri in sorted(set(by_uri[0]) & set(by_uri[1])):
        a, b = by_uri[0][uri], by_uri[1][uri]
        photo = np.asarray(a["image"]).astype(np.float32) / 255
        (ra, ma), (rb, mb) = rerender(model, a), rerender(model, b)
        face = (np.asarray(a["mask"]).squeeze().astype(bool)
                & np.asarray(b["mask"]).squeeze().astype(bool) & ma & mb)
        oa, ob = occluded_pixels(model, a), occluded_pixels(model, b)
        clean = face & ~oa & ~ob
        ps = [10 * np.log10(1 / max(float(((r[clean] - photo[clean]) ** 2).mean()), 1e-12))
              for r in (ra, rb)]
        occ = [float((o & face).sum() / max(face.sum(), 1)) for o in (oa, ob)]
        rows.append((*ps, *occ))
        print(f"{uri.split('/')[-1]:36s} clean {clean.sum() / max(face.sum(), 1):.3f} of the "
              f"face; occluded {occ[0]:.3f} -> {occ[1]:.3f}; rerender PSNR {ps[0]:.2f} -> "
              f"{ps[1]:.2f} dB")
    m = np.median(np.array(rows), 0)
    print(f"median over {len(rows)}: occluded {m[2]:.3f} -> {m[3]:.3f}; "
          f"rerender PSNR on clean pixels {m[0]:.2f} -> {m[1]:.2f} dB")


if __name__ == "__main__":
    main()
