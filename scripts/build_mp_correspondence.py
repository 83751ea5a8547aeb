"""Rebuild the shipped dense correspondence (mediapipe's 468 canonical points on a model's
surface, ``meshops/correspondence.py``) for one model spec:

    FACECORPUS_ASSETS=../shared python scripts/build_mp_correspondence.py \
        --canonical PATH/canonical_face_model.obj [--model ict]

``--canonical``: mediapipe's ``mediapipe/modules/face_geometry/data/canonical_face_model.obj``
from its source tree (the wheel does not ship it). Writes
``meshops/data/mp468_<content hash[:16]>.npz`` and prints what was kept.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    from facecorpus.meshops.catalog import load_model
    from facecorpus.meshops.correspondence import build_correspondence, read_canonical, shipped_path
    from facecorpus.tasks.landmarks import MP478_TO_68

    ap = argparse.ArgumentParser()
    ap.add_argument("--canonical", required=True)
    ap.add_argument("--model", default="ict")
    a = ap.parse_args()
    m = load_model(a.model)
    h = m.content_hash()
    c = build_correspondence(m.vertices, m.triangles, m.landmarks, read_canonical(a.canonical),
                             MP478_TO_68, model_hash=h)
    out = shipped_path(h)
    c.save(out)
    print(f"{a.model} ({h[:16]}): kept {len(c)} / 468 points, surface distance median "
          f"{np.median(c.distance):.2f} mm, max {c.distance.max():.2f} mm -> {out}")


if __name__ == "__main__":
    main()
