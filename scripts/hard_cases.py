"""Write a folder of hard in-the-wild cases made from the shared photos and the astronaut:
pasted sunglasses, a microphone in front of the chin, a hair fringe, a face half cut off with
black padding, a small face, a mirrored profile-like crop, an RGBA PNG, and two faces side by
side. Occluders are drawn at mediapipe's 68 points of each photo, so they sit where a real one
would; they are plain drawings, so mediapipe's hand cue does not see them (the UV cues must).

    FACECORPUS_ASSETS=../shared python scripts/hard_cases.py OUTDIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_STATE = {}


def landmarks(img: np.ndarray) -> np.ndarray:
    """(68, 2) the largest face's points, by the flow's own detector (model: ict)."""
    from facecorpus.flows.pseudo_gt import load_config
    from facecorpus.tasks.pseudo_gt import State

    if "s" not in _STATE:
        _STATE["s"] = State.build(load_config(None, {"model": "ict"}))
    return _STATE["s"].detector().detect_all(img, "hard_cases")[0].points


def sunglasses(img, lm):
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for eye in (lm[36:42], lm[42:48]):
        c, w = eye.mean(0), np.ptp(eye[:, 0])
        d.ellipse([c[0] - 0.9 * w, c[1] - 0.6 * w, c[0] + 0.9 * w, c[1] + 0.6 * w],
                  fill=(20, 22, 28))
    a, b = lm[39], lm[42]
    d.line([tuple(a), tuple(b)], fill=(30, 30, 30), width=max(2, int(0.05 * np.ptp(lm[:, 0]))))
    return np.asarray(im)


def microphone(img, lm):
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    fw = np.ptp(lm[:, 0])
    c = lm[8] + [0.1 * fw, -0.05 * fw]
    r = 0.16 * fw
    d.rectangle([c[0] - 0.05 * fw, c[1], c[0] + 0.05 * fw, img.shape[0]], fill=(25, 25, 25))
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(70, 70, 75))
    for k in range(-3, 4):  # the grille
        d.line([(c[0] - r, c[1] + k * r / 4), (c[0] + r, c[1] + k * r / 4)], fill=(40, 40, 45))
    return np.asarray(im)


def fringe(img, lm, colour=(200, 160, 90)):
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    fw = np.ptp(lm[:, 0])
    brow_y = lm[17:27, 1].min()
    rng = np.random.default_rng(0)
    for x in np.linspace(lm[17, 0] - 0.05 * fw, lm[26, 0] + 0.05 * fw, 40):
        y0 = brow_y - 0.5 * fw
        y1 = brow_y - (0.05 + 0.15 * rng.random()) * fw
        pts = [(x + 0.03 * fw * np.sin(t * 3 + x), y0 + (y1 - y0) * t)
               for t in np.linspace(0, 1, 12)]
        shade = tuple(int(c * (0.8 + 0.3 * rng.random())) for c in colour)
        d.line(pts, fill=shade, width=max(2, int(0.02 * fw)))
    return np.asarray(im)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    a = ap.parse_args()
    from skimage.data import astronaut

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("FACECORPUS_ASSETS", "../shared")) / "images"
    photos = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(shared.glob("*.jpg"))}
    photos["astronaut"] = astronaut()
    names = sorted(photos)
    for k, name in enumerate(names):
        img = photos[name]
        lm = landmarks(img)
        Image.fromarray(sunglasses(img, lm)).save(out / f"{name}_sunglasses.jpg", quality=92)
        Image.fromarray(microphone(img, lm)).save(out / f"{name}_microphone.png")
        col = ((200, 160, 90), (60, 40, 25))[k % 2]
        Image.fromarray(fringe(img, lm, col)).save(out / f"{name}_fringe.jpg", quality=92)
    img = photos[names[0]]
    lm = landmarks(img)
    cut = img.copy()
    cut[:, : int(lm[30, 0])] = 0  # half outside the frame, black padding
    Image.fromarray(cut).save(out / "half_cut_padding.png")
    h, w = img.shape[:2]
    Image.fromarray(img).resize((w // 4, h // 4), Image.LANCZOS).save(out / "small_face.jpg")
    rgba = np.dstack([photos["astronaut"], np.full(photos["astronaut"].shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(out / "astronaut_rgba_opaque.png")
    a_, b_ = photos[names[0]], photos[names[1]]
    hh = min(a_.shape[0], b_.shape[0])
    two = np.concatenate([a_[:hh], b_[:hh]], 1)
    Image.fromarray(two).save(out / "two_faces.jpg", quality=92)
    print(f"{len(list(out.iterdir()))} photos in {out}")


if __name__ == "__main__":
    main()
