"""Regenerate a pseudo-GT corpus the way a nightly job does, and show what a rerun recomputes.

    python scripts/incremental_rerun.py --out runs/incremental [--n 12] [--model ict]

Makes N photos (the shared portraits and scikit-image's astronaut, each cropped, flipped and
colour-jittered differently) in OUT/photos, runs ``facecorpus run pseudo-gt`` on them, then
adds 3 photos, changes the bytes of 1 and removes 1, and runs the same command again. Prints
which shards the rerun computed and why, checks that every other shard's files are
byte-identical, that ``facecorpus data verify`` passes and that inputs = accepted + rejected.
Exit 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def sources() -> list[np.ndarray]:
    from skimage.data import astronaut

    out = [astronaut()]
    shared = os.environ.get("FACECORPUS_ASSETS")
    for d in ([Path(shared) / "images"] if shared else []) + [Path(__file__).resolve().parents[2]
                                                               / "shared" / "images"]:
        if d.is_dir():
            out += [np.asarray(Image.open(p).convert("RGB")) for p in sorted(d.glob("*.jpg"))]
            break
    return out


def variant(img: np.ndarray, k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    h, w = img.shape[:2]
    s = rng.uniform(0.8, 1.0)
    ch, cw = int(h * s), int(w * s)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = img[y:y + ch, x:x + cw].astype(np.float32)
    if k % 2:
        out = out[:, ::-1]
    out = out * rng.uniform(0.85, 1.15, 3) + rng.uniform(-10, 10)
    return np.clip(out, 0, 255).astype(np.uint8)


def shard_files(root: Path) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if not p.is_file():
            continue
        if rel[0] in ("manifest", "rejected"):
            s = int(rel[1].split("-")[1].split(".")[0])
        elif len(rel) >= 3 and rel[1] == "c":
            s = int(rel[2])
        else:
            continue
        out.setdefault(s, {})[str(Path(*rel))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--model", default="ict")
    ap.add_argument("--per-shard", type=int, default=4)
    args = ap.parse_args(argv)
    out = Path(args.out)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    src = sources()
    for k in range(args.n + 3):
        if k < args.n:
            Image.fromarray(variant(src[k % len(src)], k)).save(photos / f"p{k:03d}.png")
    cmd = [sys.executable, "-m", "facecorpus.cli", "run", "pseudo-gt", "--input", str(photos),
           "--out", str(out / "run"), "--model", args.model, "--no-prefect",
           "--set", f"output.samples_per_shard={args.per_shard}"]
    run(cmd)
    root = out / "run" / "dataset"
    before = shard_files(root)
    # add 3, change 1 (first shard), remove 1 (second shard)
    for k in range(args.n, args.n + 3):
        Image.fromarray(variant(src[k % len(src)], k)).save(photos / f"p{k:03d}.png")
    changed = np.asarray(Image.open(photos / "p000.png")).copy()
    changed[:6, :6] = 255 - changed[:6, :6]
    Image.fromarray(changed).save(photos / "p000.png")
    (photos / f"p{args.per_shard:03d}.png").unlink()
    run(cmd)
    s = json.loads((out / "run" / "summary.json").read_text())
    after = shard_files(root)
    ran = set(s["shards_run_ids"])
    print(f"rerun computed shards {sorted(ran)}: {s['shards_run_why']}")
    untouched = [sid for sid in before if sid not in ran]
    same = [sid for sid in untouched if after.get(sid) == before[sid]]
    print(f"untouched shards {untouched}: byte-identical {same}")
    print(f"inputs {s['inputs']} = accepted {s['accepted']} + rejected {s['rejected']}: "
          f"{s['counts_add_up']}")
    v = subprocess.run([sys.executable, "-m", "facecorpus.cli", "data", "verify", str(root)])
    ok = (same == untouched and s["counts_add_up"] and v.returncode == 0
          and ran == {0, 1, max(before) + (0 if args.n % args.per_shard else 1)})
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
