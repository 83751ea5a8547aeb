"""Fast Wavefront OBJ reading with numpy (no per-vertex Python loop).

Only what morphable-model building needs: positions, texture coordinates and polygon
faces with their texture indices. Malformed input raises ModelFormatError naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.model import ModelFormatError

_V = re.compile(rb"^v[ \t]+([^\n#]*)", re.MULTILINE)
_VT = re.compile(rb"^vt[ \t]+([^\n#]*)", re.MULTILINE)
_F = re.compile(rb"^f[ \t]+([^\n#]*)", re.MULTILINE)


@dataclass(frozen=True, eq=False)
class ObjMesh:
    """Polygon mesh as read from an OBJ (0-based indices).

    vertices: (V, 3) float64; uv: (T, 2) float64 (empty if none); face_sizes: (P,) int64
    corners per polygon; face_v / face_vt: (sum(face_sizes),) int64 flat corner indices
    (face_vt is -1 where a corner has no texture index); header: the leading comment text.
    """

    vertices: np.ndarray
    uv: np.ndarray
    face_sizes: np.ndarray
    face_v: np.ndarray
    face_vt: np.ndarray
    header: str = ""

    def polygon_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.face_sizes)])


def _floats(lines: list[bytes], width: int, what: str, source: str) -> np.ndarray:
    if not lines:
        return np.zeros((0, width))
    try:
        flat = np.array(b" ".join(lines).split(), dtype=np.float64)
    except ValueError as e:
        raise ModelFormatError(source, what, f"unparsable number ({e})") from None
    if flat.size == width * len(lines):
        return flat.reshape(-1, width)
    # uneven lines (e.g. 'v x y z r g b' colours or 'vt u v w'): take the first `width`
    out = np.empty((len(lines), width))
    for i, ln in enumerate(lines):
        parts = ln.split()
        if len(parts) < width:
            raise ModelFormatError(source, what, f"line {i} has {len(parts)} values, need {width}")
        out[i] = [float(x) for x in parts[:width]]
    return out


_NOT_V_LINE = re.compile(rb"\n(?!v[ \t])")


def read_obj_vertices(data: bytes, source: str = "<obj>") -> np.ndarray:
    """(V, 3) float64 positions of an OBJ given as bytes (the fast path for morph targets).

    When all ``v`` lines form one contiguous block of ``v x y z`` lines (every exporter we
    know), that block is converted in one ``np.fromstring`` call; otherwise line by line.
    """
    start = 0 if data.startswith(b"v ") else data.find(b"\nv ") + 1
    if start > 0 or data.startswith(b"v "):
        m = _NOT_V_LINE.search(data, start)
        end = m.start() if m else len(data)
        block = data[start:end]
        n_lines = block.count(b"\n") + 1
        total = data.count(b"\nv ") + data.startswith(b"v ")
        if n_lines == total and b"#" not in block:
            flat = np.fromstring(block.replace(b"v", b" ").decode("ascii", "replace"),
                                 dtype=np.float64, sep=" ")
            if flat.size == 3 * n_lines:
                return flat.reshape(-1, 3)
    return _floats(_V.findall(data), 3, "v", source)


def read_obj(data: bytes, source: str = "<obj>") -> ObjMesh:
    """Parse an OBJ given as bytes into an :class:`ObjMesh` (negative indices resolved)."""
    v = read_obj_vertices(data, source)
    vt = _floats(_VT.findall(data), 2, "vt", source)
    flines = _F.findall(data)
    sizes = np.empty(len(flines), np.int64)
    corners: list[bytes] = []
    for i, ln in enumerate(flines):
        toks = ln.split()
        sizes[i] = len(toks)
        corners.extend(toks)
    if len(sizes) and sizes.min() < 3:
        raise ModelFormatError(source, "f", "a face has fewer than 3 corners")
    # corner tokens: v, v/vt, v//vn, v/vt/vn
    parts = [c.split(b"/") for c in corners]
    try:
        fv = np.array([int(p[0]) for p in parts], dtype=np.int64)
        fvt = np.array([int(p[1]) if len(p) > 1 and p[1] else 0 for p in parts], dtype=np.int64)
    except ValueError as e:
        raise ModelFormatError(source, "f", f"unparsable index ({e})") from None
    fv = np.where(fv < 0, len(v) + fv, fv - 1)
    fvt = np.where(fvt < 0, len(vt) + fvt, np.where(fvt == 0, -1, fvt - 1))
    if fv.size and (fv.min() < 0 or fv.max() >= len(v)):
        raise ModelFormatError(source, "f", f"vertex index out of range [1, {len(v)}]")
    if fvt.size and fvt.max() >= len(vt):
        raise ModelFormatError(source, "f", f"texture index out of range [1, {len(vt)}]")
    head = []
    for line in data[:8192].split(b"\n"):
        if not line.startswith(b"#"):
            if head:
                break
            continue
        head.append(line.decode("utf-8", "replace").strip("#").strip())
    return ObjMesh(v, vt, sizes, fv, fvt, "\n".join(h for h in head if h))


def triangulate(face_sizes: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Fan-triangulate polygons: (0, 1, 2), (0, 2, 3), ... keeps the winding.

    Args:
        face_sizes: (P,) corners per polygon; corners: (sum(face_sizes),) per-corner values
            (vertex or texture indices).

    Returns:
        (sum(face_sizes - 2), 3) the same per-corner values, one row per triangle, polygons
        in order.
    """
    sizes = np.asarray(face_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_tri = sizes - 2
    poly = np.repeat(np.arange(len(sizes)), n_tri)
    k = np.arange(n_tri.sum()) - np.repeat(np.cumsum(n_tri) - n_tri, n_tri)
    base = starts[poly]
    c = np.asarray(corners)
    return np.stack([c[base], c[base + k + 1], c[base + k + 2]], 1)
