"""How much of the drawn fringes of ``scripts/hard_cases.py`` a pseudo-GT run marks occluded.

Truth per fringe sample: the pixels where the fringe photo differs from its original (the
shared photo or the astronaut) by more than 25/255 in some channel, warped into the stored
crop by the manifest's affine and moved into UV by the stored ``uv_sampling_map`` (each
texel's strand share from its bilinear taps). Prints, per fringe sample, the recall of the
run's ``uv_occlusion_mask`` over the texels touching a strand and over those at least half
strand, the strand texels missed, and the texels flagged off the strands (the collar, the
jaw, the real hair: not errors by themselves, but what a change adds there).

    FACECORPUS_ASSETS=../shared python scripts/fringe_recall.py RUN/dataset
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    a = ap.parse_args()
    import polars as pl
    from PIL import Image
    from skimage.data import astronaut

    from facecorpus.datasets.reader import ShardDataset
    from facecorpus.renderers.interpolate import sample_bilinear
    from facecorpus.tasks.landmarks import warp_image

    shared = Path(os.environ.get("FACECORPUS_ASSETS", "../shared")) / "images"
    origs = {p.stem: p for p in shared.glob("*.jpg")}
    m = pl.read_parquet(f"{a.dataset}/manifest/*.parquet").sort("source_uri")
    ds = ShardDataset(a.dataset, fields=["uv_sampling_map", "image", "uv_occlusion_mask",
                                         "uv_visible_mask"], columns=["source_uri"])
    by_uri = {ds[i]["source_uri"]: ds[i] for i in range(len(ds))}
    for row in m.iter_rows(named=True):
        uri = row["source_uri"]
        name = Path(uri).stem
        if not name.endswith("_fringe"):
            continue
        base = name[: -len("_fringe")]
        orig = (astronaut() if base == "astronaut"
                else np.asarray(Image.open(origs[base]).convert("RGB")))
        s = by_uri[uri]
        A = np.array([[row[f"crop_a{r}{c}"] for c in range(3)] for r in range(2)])
        diff = np.abs(np.asarray(Image.open(uri).convert("RGB"), np.float32)
                      - orig.astype(np.float32)).max(-1)
        drawn = warp_image(diff, A, np.asarray(s["image"]).shape[0]) > 25
        smap = np.asarray(s["uv_sampling_map"])
        H, W = drawn.shape
        inside = (np.abs(smap[..., 0]) < 1) & (np.abs(smap[..., 1]) < 1)
        xy = np.stack([(smap[..., 0] + 1) * 0.5 * W, (smap[..., 1] + 1) * 0.5 * H], -1)
        share = sample_bilinear(drawn.astype(np.float32)[None, ..., None], xy[None],
                                inside[None])[0, ..., 0]
        occ = np.asarray(s["uv_occlusion_mask"]).squeeze().astype(bool)
        # the stored visible mask is after occlusion removal: what was seen includes the flags
        seen = np.asarray(s["uv_visible_mask"]).squeeze().astype(bool) | occ
        t, half = (share > 0) & seen, (share >= 0.5) & seen
        print(f"{name:30s} strand texels {t.sum():5d}: recall {(occ & t).sum() / t.sum():.3f}, "
              f">= half strand {(occ & half).sum() / max(half.sum(), 1):.3f}; missed "
              f"{(t & ~occ).sum()} ({(half & ~occ).sum()} >= half); flagged off the strands "
              f"{(occ & ~t).sum() / seen.sum():.3f} of the seen texels")


if __name__ == "__main__":
    main()
