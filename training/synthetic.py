"""Small synthetic, learnable datasets for the three tasks (tests, benchmarks, smoke runs).

Each target is a deterministic function of the inputs, so a trainer that works drives the
validation loss well below its starting value:

- ``pncc``: image = smooth random colour field; pncc[..., c] = 255 - image[..., (c+1) % 3];
  mask = image brightness > 30%.
- ``position``: uv_position (float16, "mm") = 120 * image**2 - 40 per channel (needs the
  float normalisation the trainer applies).
- ``inpaint``: uv_pseudo_gt = left-right symmetric smooth field; uv_visible_mask removes a
  random rectangle from one side plus a few small holes; uv_visible = pseudo-GT * mask.
"""

from __future__ import annotations

import numpy as np

FIELDS_BY_TASK = {
    "pncc": ("image", "pncc", "mask"),
    "position": ("image", "uv_position"),
    "inpaint": ("uv_visible", "uv_visible_mask", "uv_pseudo_gt"),
}


def smooth_fields(rng: np.random.Generator, n: int, size: int, channels: int = 3,
                  waves: int = 4) -> np.ndarray:
    """(n, size, size, channels) float32 in [0, 1]: sums of random low-frequency cosines."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.zeros((n, size, size, channels), np.float32)
    for _ in range(waves):
        f = rng.uniform(0.5, 3.0, (n, 1, 1, channels, 2))
        ph = rng.uniform(0, 2 * np.pi, (n, 1, 1, channels))
        a = rng.uniform(0.3, 1.0, (n, 1, 1, channels))
        out += a * np.cos(2 * np.pi * (f[..., 0] * yy[..., None] + f[..., 1] * xx[..., None]) + ph)
    lo = out.min(axis=(1, 2), keepdims=True)
    hi = out.max(axis=(1, 2), keepdims=True)
    return (out - lo) / np.maximum(hi - lo, 1e-6)


def make_synthetic(task: str, n: int = 64, size: int = 32, seed: int = 0,
                   val_fraction: float = 0.25) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Arrays ``{field: (n, ...)}`` and manifest rows (with ``split`` train/val) for a task."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    if task in ("pncc", "position"):
        img = smooth_fields(rng, n, size)
        arrays["image"] = (img * 255 + 0.5).astype(np.uint8)
        imgf = arrays["image"].astype(np.float32) / 255
        if task == "pncc":
            arrays["pncc"] = 255 - arrays["image"][..., [1, 2, 0]]
            arrays["mask"] = (imgf.mean(-1) > 0.3).astype(np.uint8)
        else:
            arrays["uv_position"] = (120 * imgf**2 - 40).astype(np.float16)
    elif task == "inpaint":
        half = smooth_fields(rng, n, size)[:, :, : (size + 1) // 2]
        gt = np.concatenate([half, half[:, :, : size // 2][:, :, ::-1]], axis=2)
        mask = np.ones((n, size, size), np.uint8)
        for i in range(n):
            h = rng.integers(size // 3, size)
            w = rng.integers(size // 6, size // 2)
            top = rng.integers(0, size - h + 1)
            if rng.random() < 0.5:
                mask[i, top:top + h, :w] = 0
            else:
                mask[i, top:top + h, size - w:] = 0
            for _ in range(3):
                s = rng.integers(2, max(3, size // 8))
                r, c = rng.integers(0, size - s, 2)
                mask[i, r:r + s, c:c + s] = 0
        arrays["uv_pseudo_gt"] = (gt * 255 + 0.5).astype(np.uint8)
        arrays["uv_visible_mask"] = mask
        arrays["uv_visible"] = arrays["uv_pseudo_gt"] * mask[..., None]
    else:
        raise ValueError(f"unknown task {task!r}")
    n_val = round(n * val_fraction)
    yaw = rng.uniform(-80, 80, n).astype(np.float32)
    manifest = [{"sample_id": f"syn-{task}-{i:05d}", "source_uri": f"synthetic://{task}/{i}",
                 "subject_id": f"s{i:05d}", "group": "synthetic", "yaw": float(yaw[i]),
                 "pitch": 0.0, "roll": 0.0, "split": "val" if i >= n - n_val else "train"}
                for i in range(n)]
    return arrays, manifest


def write_synthetic(root: str, task: str, n: int = 64, size: int = 32, seed: int = 0,
                    samples_per_shard: int = 32) -> str:
    """Write :func:`make_synthetic` data as a facecorpus dataset (through DatasetWriter)."""
    from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec

    arrays, manifest = make_synthetic(task, n, size, seed)
    units = {"image": "srgb", "pncc": "ncc*255", "mask": "bool", "uv_position": "mm",
             "uv_visible": "srgb", "uv_visible_mask": "bool", "uv_pseudo_gt": "srgb"}
    schema = DatasetSchema(
        fields={k: FieldSpec(shape=tuple(a.shape[1:]), dtype=str(a.dtype), units=units[k])
                for k, a in arrays.items()},
        samples_per_shard=samples_per_shard, producer=f"training.synthetic.{task}",
        config_hash=f"synthetic-{task}-{n}-{size}-{seed}", attrs={})
    w = DatasetWriter(root, schema)
    for sid, start in enumerate(range(0, n, samples_per_shard)):
        sl = slice(start, start + samples_per_shard)
        w.write_shard(sid, {k: a[sl] for k, a in arrays.items()}, manifest[sl])
    return root
