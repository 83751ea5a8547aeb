"""`write_preview(model, path)`: the PNG sheet people look at to check a morphable model.

Rows: shaded renders at yaw -90 ... 90 degrees in 10 degree steps, PNCC at the same yaws,
then the UV layout (wireframe over NCC in UV) and the UV position map (``uv_position``, each
axis normalised to [0, 1]). Orthographic cameras with one scale for every yaw, so sizes
compare across the row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

YAWS = tuple(range(-90, 91, 10))


def _cameras(vertices: np.ndarray, size: int, fill: float = 0.9):
    from facecorpus.renderers.cameras import Camera, euler_to_rotation

    rots = [euler_to_rotation(y) for y in YAWS]
    boxes = []
    for R in rots:
        X = vertices.astype(np.float64) @ R.T
        boxes.append((X.min(0), X.max(0)))
    extent = max(max(hi[0] - lo[0], hi[1] - lo[1]) for lo, hi in boxes)
    scale = fill * size / max(extent, 1e-9)
    cams = []
    for R, (lo, hi) in zip(rots, boxes, strict=True):
        c = (lo + hi) / 2
        cams.append(Camera.orthographic(size, size, scale, rotation=R,
                                        translation=(-scale * c[0], -scale * c[1])))
    return cams


def uv_layout_image(uv, uv_triangles, size: int, background=None) -> np.ndarray:
    """The UV layout: chart outlines (edges used by one UV triangle: borders and seams) drawn
    over ``background`` (S, S, 3) float (default black).

    Returns (S, S, 3) uint8 in the UV image convention (row r <-> v = 1 - (r + 0.5) / S).
    """
    from PIL import Image, ImageDraw

    bg = np.zeros((size, size, 3), np.float32) if background is None else background
    img = Image.fromarray((np.clip(bg, 0, 1) * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    t = np.asarray(uv_triangles, np.int64)
    e = np.sort(np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]]), axis=1)
    edges, counts = np.unique(e, axis=0, return_counts=True)
    p = np.asarray(uv, np.float64)[edges[counts == 1]]  # (E, 2, 2)
    px = np.stack([p[..., 0] * size, (1.0 - p[..., 1]) * size], -1)
    for (x0, y0), (x1, y1) in px:
        draw.line([(x0, y0), (x1, y1)], fill=(255, 255, 255))
    return np.asarray(img)


#: Preview light: ambient plus a key light from the upper front right (viewer's right).
PREVIEW_SH = np.tile(np.array([0.5, -0.2, 0.3, -0.2, 0, 0, -0.05, 0, 0], np.float32), 3)


def preview_images(model, size: int = 128) -> tuple[list[list[np.ndarray]], list[str]]:
    """The sheet's rows as arrays (for callers that compose their own sheet)."""
    from facecorpus.meshops.geometry import ncc, vertex_normals
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.render import render
    from facecorpus.renderers.uv_space import to_uv_space

    v = np.asarray(model.vertices, np.float32)
    code = ncc(v)
    out = render(v, model.triangles, _cameras(v, size), outputs=("image", "pncc"), ncc=code,
                 albedo=model.albedo_mean, sh=PREVIEW_SH, vertex_normals=vertex_normals(v, model.triangles),
                 background=(0.12, 0.12, 0.14))
    S = 2 * size
    raster = rasterize_uv(model.uv, model.uv_triangles, S)
    uv_ncc = to_uv_space(code, raster, model.triangles)
    layout = uv_layout_image(model.uv, model.uv_triangles, S, background=0.7 * uv_ncc)
    pos = to_uv_space(v, raster, model.triangles)
    lo, hi = v.min(0), v.max(0)
    uv_position = np.where(raster.mask[..., None], (pos - lo) / np.maximum(hi - lo, 1e-9), 0.0)
    rows = [list(out.image), list(out.pncc), [layout, uv_position]]
    labels = [f"yaw {y}" for y in YAWS]
    return rows, labels


def write_preview(model, path: str | os.PathLike, *, size: int = 128) -> Path:
    """Write the preview sheet of ``model`` (a MorphableModel) as a PNG at ``path``.

    Row 1: shaded renders (SH default light, the model's mean albedo or grey) at yaw -90 ...
    90; row 2: PNCC at the same yaws; row 3: UV layout over NCC-in-UV, and the UV position
    map. Written atomically (temporary file, then rename).
    """
    from facecorpus.sheets import contact_sheet

    rows, labels = preview_images(model, size)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")  # PIL picks the format by suffix
    contact_sheet(rows, tmp, cell=size, labels=labels)
    os.replace(tmp, path)
    return path
