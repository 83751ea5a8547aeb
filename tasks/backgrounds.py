"""Backgrounds behind rendered faces: built-in procedural ones or crops from an image folder.

Every background is a pure function of a ``numpy.random.Generator`` so that the synthesis
flow can derive it from (seed, face index, pose index) and stay deterministic whatever the
scheduling. Backgrounds are (S, S, 3) uint8 sRGB.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from facecorpus.core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def procedural_backgrounds(rng: np.random.Generator, n: int, size: int = 128) -> np.ndarray:
    """``n`` smooth random backgrounds: a colour gradient plus up to five soft blobs and grain.

    Drawn on a 32 x 32 grid for all ``n`` at once and upsampled (the content is
    low-frequency anyway), then a fine luminance grain is added at full size: about 0.1 ms
    per background.

    Args:
        rng: the generator to draw from (one per face).
        n: number of backgrounds.
        size: side S of the square outputs.

    Returns:
        (n, S, S, 3) uint8.
    """
    from PIL import Image

    s, K = 32, 5
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
    c0, c1 = rng.uniform(0.05, 0.95, size=(2, n, 1, 1, 3)).astype(np.float32)
    ang = rng.uniform(0.0, 2.0 * np.pi, size=(n, 1, 1)).astype(np.float32)
    t = 0.5 + 0.5 * ((xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang)) * 1.41421356
    img = c0 * (1.0 - t[..., None]) + c1 * t[..., None]  # (n, s, s, 3)
    # Soft blobs mimic out-of-focus clutter; low frequency keeps them from looking like
    # facial features to a network.
    cx, cy = rng.uniform(-0.2, 1.2, size=(2, n, K, 1, 1)).astype(np.float32)
    rad = rng.uniform(0.1, 0.5, size=(n, K, 1, 1)).astype(np.float32)
    col = rng.uniform(0.0, 1.0, size=(n, K, 1, 1, 3)).astype(np.float32)
    amp = (rng.uniform(0.2, 0.7, size=(n, K, 1, 1))
           * (rng.random((n, K, 1, 1)) < 0.7)).astype(np.float32)
    for k in range(K):
        w = np.exp(-((xx - cx[:, k]) ** 2 + (yy - cy[:, k]) ** 2) / (2.0 * rad[:, k] ** 2))
        w = (w * amp[:, k])[..., None]
        img = img * (1.0 - w) + col[:, k] * w
    small = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    grain = rng.integers(-5, 6, size=(n, size, size, 1), dtype=np.int16)
    for i in range(n):
        big = np.asarray(Image.fromarray(small[i]).resize((size, size), Image.BILINEAR),
                         dtype=np.int16)
        out[i] = np.clip(big + grain[i], 0, 255)
    return out


def procedural_background(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One background (S, S, 3) uint8: :func:`procedural_backgrounds` with n = 1."""
    return procedural_backgrounds(rng, 1, size)[0]


@dataclass
class ImageFolderBackgrounds:
    """Random square crops from the images of a folder (sorted, so indices are stable).

    Images are decoded lazily and kept (downscaled so the short side is at most
    ``max_side``) in a per-process cache shared by threads.
    """

    folder: str
    max_side: int = 512
    _paths: list[Path] = field(default_factory=list, init=False, repr=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        root = Path(self.folder)
        if not root.is_dir():
            raise InputError(f"{root}: background folder does not exist")
        self._paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in background folder")

    def __len__(self) -> int:
        return len(self._paths)

    def _image(self, i: int) -> np.ndarray:
        with self._lock:
            img = self._cache.get(i)
        if img is not None:
            return img
        from PIL import Image

        p = self._paths[i]
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                scale = self.max_side / min(im.size)
                if scale < 1.0:
                    im = im.resize((max(1, round(im.width * scale)),
                                    max(1, round(im.height * scale))), Image.BILINEAR)
                img = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decoder failure is bad input: name it
            raise InputError(f"{p}: unreadable background image ({e})") from None
        with self._lock:
            self._cache[i] = img
        return img

    def sample(self, rng: np.random.Generator, size: int = 128) -> np.ndarray:
        """A random square crop (random scale, position, horizontal flip), (S, S, 3) uint8."""
        from PIL import Image

        img = self._image(int(rng.integers(len(self._paths))))
        h, w = img.shape[:2]
        side = max(1, round(min(h, w) * rng.uniform(0.3, 1.0)))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize((size, size),
                                                                         Image.BILINEAR)
        out = np.asarray(crop, dtype=np.uint8)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


class BackgroundSource:
    """``procedural`` or an image folder, behind one ``sample(rng, size)`` call."""

    def __init__(self, kind: str = "procedural", folder: str | None = None):
        if kind == "procedural":
            self._folder = None
        elif kind == "folder":
            if not folder:
                raise InputError("background kind 'folder' needs a folder path")
            self._folder = ImageFolderBackgrounds(folder)
        else:
            raise InputError(f"unknown background kind {kind!r} (procedural | folder)")
        self.kind = kind

    def sample(self, rng: np.random.Generator, size: int = 128) -> np.ndarray:
        """One background (S, S, 3) uint8."""
        return self.sample_many(rng, 1, size)[0]

    def sample_many(self, rng: np.random.Generator, n: int, size: int = 128) -> np.ndarray:
        """``n`` backgrounds (n, S, S, 3) uint8 from one generator."""
        if self._folder is None:
            return procedural_backgrounds(rng, n, size)
        return np.stack([self._folder.sample(rng, size) for _ in range(n)])
