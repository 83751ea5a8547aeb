"""ICT-FaceKit (ICT Face Model Light, MIT licence) -> :class:`MorphableModel`.

Source: https://github.com/ICT-VGL/ICT-FaceKit (``FaceXModel/``: ``generic_neutral_mesh.obj``,
``identity000..099.obj``, 53 expression OBJs named in ``vertex_indices.json``). Every OBJ has
26,719 vertices in **centimetres**; this builder converts to millimetres (x 10).

Modes exactly as the model defines them (``Scripts/ict_face_model.py``): a shape is
``neutral + sum_k w_k (identity_k - neutral) + sum_j e_j (expression_j - neutral)``, identity
weights ~ N(0, 1) and expression weights in [0, 1]. So ``id_basis[k] = identity_k - neutral``
with ``id_std = 1`` (a one-hot identity coefficient reproduces ``identity_k.obj``), and
``exp_basis[j] = expression_j - neutral`` with ``exp_std = 1`` (a prior *scale* for blendshape
weights, not a Gaussian std).

Regions (vertex / polygon ranges from the ICT README; vertices of a region are a prefix of the
full mesh, so indices carry over unchanged):

- ``face``: full face area, vertices 0-9408, quads 0-9229, UV tile 0 (u in [0, 1]).
- ``narrow``: narrow face area, vertices 0-6705, quads 0-6559.
- ``head``: face + head and neck, vertices 0-11247, quads 0-11143; head/neck UVs live in UDIM
  tile 1 (u in [1, 2]), so this build packs both tiles side by side: ``u' = u / 2``.

Quads are fan-triangulated, keeping the OBJ's counter-clockwise-outside winding, with
mirror-consistent diagonals (the mirror image of every triangle is a triangle). UVs are per
corner (138 face-area seam vertices carry two UVs). Landmarks: the 68 Multi-PIE indices of the
README; contours: its *extended* jawlines, both ordered top to bottom (the README lists the
left one chin first; it is reversed here).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from facecorpus.core.errors import AssetUnavailableError
from facecorpus.meshops.assets import (
    assets_dir,
    cache_dir,
    fetch,
    is_url,
    sha256_file,
    sha256_tree,
)
from facecorpus.meshops.model import ModelFormatError, MorphableModel, Provenance
from facecorpus.meshops.objio import read_obj, read_obj_vertices, triangulate

log = logging.getLogger(__name__)

ICT_REPO_URL = "https://github.com/ICT-VGL/ICT-FaceKit"
# GitHub's archive of the repository's default branch: FaceXModel/ lies inside it.
ICT_DOWNLOAD_URL = ICT_REPO_URL + "/archive/refs/heads/master.tar.gz"
ICT_ARCHIVE_NAME = "ICT-FaceKit-FaceXModel.tar.xz"
ICT_MIRROR_SUBDIR = Path("models") / "ict-facekit"
BUILDER_VERSION = "ict-builder-2"

N_VERTICES = 26719
CM_TO_MM = 10.0
# region -> (number of vertices, number of polygons), both prefixes of the full mesh
REGIONS = {"narrow": (6706, 6560), "face": (9409, 9230), "head": (11248, 11144)}

LANDMARKS_68 = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272,
    4088, 3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942,
    4857, 1140, 2075, 1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751,
    3756, 3721, 3725, 3732, 5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957,
    5841, 5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966)
JAW_RIGHT = (1278, 1272, 12, 1834, 243, 781, 2199, 1447)
JAW_LEFT = (3661, 4390, 3022, 2484, 4036, 2253, 3490, 3496)
JAW_RIGHT_EXTENDED = (1280, 1278, 1275, 1272, 1248, 12, 820, 1834, 1902, 243, 844, 781, 1673,
                      2199, 801, 1447, 800)
JAW_LEFT_EXTENDED = (3041, 3661, 3042, 4390, 3880, 3022, 3085, 2484, 4102, 4036, 3061, 2253,
                     3466, 3490, 3493, 3496, 3498)

# The MIT notice every ICT-FaceKit OBJ carries (used if a source lacks the header).
ICT_LICENSE = """ICT FaceKit

Copyright (c) 2020 USC Institute for Creative Technologies

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""

_WANTED_SUFFIXES = (".obj", ".json")


def ict_cache_path(region: str = "face") -> Path:
    """``$FACECORPUS_CACHE/models/ict-facekit-<region>.npz``."""
    return cache_dir() / "models" / f"ict-facekit-{region}.npz"


def default_ict_source() -> Path | None:
    """The local mirror ``$FACECORPUS_ASSETS/models/ict-facekit/<archive>``, if present."""
    d = assets_dir()
    if d is None:
        return None
    p = d / ICT_MIRROR_SUBDIR / ICT_ARCHIVE_NAME
    return p if p.is_file() else None


# ------------------------------------------------------------------------- reading sources
def _iter_folder(folder: Path) -> Iterator[tuple[str, bytes]]:
    root = _find_model_root(folder)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in _WANTED_SUFFIXES:
            yield p.name, p.read_bytes()


def _find_model_root(folder: Path) -> Path:
    if (folder / "generic_neutral_mesh.obj").is_file():
        return folder
    hits = sorted(folder.rglob("generic_neutral_mesh.obj"))
    if not hits:
        raise ModelFormatError(folder, "generic_neutral_mesh.obj",
                               "missing: not an ICT-FaceKit FaceXModel folder")
    return hits[0].parent


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """Stream the FaceXModel files out of a tar (any compression) or zip archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(_WANTED_SUFFIXES)]
            root = _archive_root(names, path)
            for n in names:
                if n.rsplit("/", 1)[0] == root or (not root and "/" not in n):
                    yield n.rsplit("/", 1)[-1], zf.read(n)
        return
    root = None
    pending: dict[str, list[tuple[str, bytes]]] = {}
    try:
        # streaming mode: no seeks back through the xz stream
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isfile() or not m.name.endswith(_WANTED_SUFFIXES):
                    continue
                parent, _, base = m.name.rpartition("/")
                if root is not None and parent != root:
                    continue
                fh = tf.extractfile(m)
                if fh is None:
                    continue
                if root is None:
                    # Until a file only FaceXModel holds shows which folder it is, keep
                    # candidates per folder (a repository archive has other OBJs too).
                    pending.setdefault(parent, []).append((base, fh.read()))
                    if _is_model_file(base):
                        root = parent
                        yield from pending.pop(parent)
                        pending.clear()
                    continue
                yield base, fh.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ModelFormatError(path, None, f"not a readable archive, or truncated ({e})") from None


def _is_model_file(base: str) -> bool:
    """Names only a FaceXModel folder holds: they fix which folder of an archive is read
    (a repository archive also carries other OBJ/JSON files)."""
    return base in ("generic_neutral_mesh.obj", "vertex_indices.json") or (
        base.startswith("identity") and base[8:11].isdigit() and base.endswith(".obj"))


def _archive_root(names: list[str], path: Path) -> str:
    for n in names:
        if _is_model_file(n.rpartition("/")[2]):
            return n.rpartition("/")[0]
    raise ModelFormatError(path, "generic_neutral_mesh.obj", "missing from the archive")


def resolve_ict_source(source: str | os.PathLike | None) -> tuple[Path, str]:
    """Turn a user source (folder, archive, URL, or None) into a local path and a label.

    None means: the local mirror under ``$FACECORPUS_ASSETS``; else a download from the
    public repository (unless ``FACECORPUS_OFFLINE=1``).

    Raises:
        AssetUnavailableError: nothing reachable, with what was tried.
    """
    if source is None:
        mirror = default_ict_source()
        if mirror is not None:
            return mirror, str(mirror)
        why = "absent" if os.environ.get("FACECORPUS_ASSETS") else "FACECORPUS_ASSETS unset"
        tried = [f"$FACECORPUS_ASSETS/{ICT_MIRROR_SUBDIR}/{ICT_ARCHIVE_NAME} ({why})"]
        if os.environ.get("FACECORPUS_OFFLINE", "") not in ("", "0"):
            raise AssetUnavailableError(
                "ICT-FaceKit: no source reachable; tried " + "; ".join(tried)
                + f"; downloads disabled (FACECORPUS_OFFLINE). Get it from {ICT_REPO_URL}")
        try:
            return fetch(ICT_DOWNLOAD_URL, timeout=20.0), ICT_DOWNLOAD_URL
        except AssetUnavailableError as e:
            raise AssetUnavailableError(
                "ICT-FaceKit: no source reachable; tried " + "; ".join(tried) + f"; {e}. "
                "Set FACECORPUS_ASSETS to a folder holding "
                f"{ICT_MIRROR_SUBDIR}/{ICT_ARCHIVE_NAME} or pass --source.") from None
    s = str(source)
    if is_url(s):
        return fetch(s), s
    p = Path(s).expanduser()
    if not p.exists():
        raise AssetUnavailableError(f"ICT-FaceKit source {p}: no such file or folder")
    return p, str(p.resolve())


def _source_digest(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


# --------------------------------------------------------------------------------- building
def build_ict_facekit(source: str | os.PathLike | None = None, region: str = "face", *,
                      cache: bool = True, force: bool = False) -> MorphableModel:
    """Build (or load from the cache) the ICT-FaceKit model for one region.

    Args:
        source: a FaceXModel folder, an archive (.tar.xz/.tar.gz/.zip) holding one, a URL
            (http(s)/file) of such an archive, or None for the local mirror / the public
            repository (see :func:`resolve_ict_source`).
        region: ``face`` (default), ``narrow`` or ``head``.
        cache: read/write ``$FACECORPUS_CACHE/models/ict-facekit-<region>.npz``.
        force: rebuild even if a matching cache file exists.

    Returns:
        A validated MorphableModel (mm): 100 identity modes, 53 expression modes.

    Raises:
        AssetUnavailableError: no source reachable. ModelFormatError: a malformed source.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown ICT-FaceKit region '{region}'; choose one of {sorted(REGIONS)}")
    cpath = ict_cache_path(region)
    if cache and not force and cpath.is_file():
        try:
            cached = MorphableModel.load(cpath)
        except ModelFormatError as e:
            log.warning("ignoring unreadable cache %s (%s)", cpath, e)
        else:
            if _cache_matches(cached, source):
                return cached
    path, label = resolve_ict_source(source)
    t0 = time.perf_counter()
    model = _build(path, label, region)
    log.info("built ICT-FaceKit %s model from %s in %.1f s", region, label,
             time.perf_counter() - t0)
    if cache:
        model.save(cpath)
    return model


def build_ict_regions(source: str | os.PathLike | None = None,
                      regions=("face", "narrow", "head"), *, cache: bool = True
                      ) -> dict[str, MorphableModel]:
    """Build several regions from one read of the source (and cache each)."""
    for r in regions:
        if r not in REGIONS:
            raise ValueError(f"unknown ICT-FaceKit region '{r}'; choose from {sorted(REGIONS)}")
    path, label = resolve_ict_source(source)
    parsed = _parse(path)
    out = {}
    for r in regions:
        out[r] = _assemble(parsed, path, label, r)
        if cache:
            out[r].save(ict_cache_path(r))
    return out


def load_ict_facekit(region: str = "face", source: str | os.PathLike | None = None
                     ) -> MorphableModel:
    """The cached ICT-FaceKit model (built on first use)."""
    return build_ict_facekit(source, region)


def _cache_matches(cached: MorphableModel, source) -> bool:
    notes = cached.provenance.notes
    if f"builder={BUILDER_VERSION}" not in notes:
        return False
    if source is None:
        return True  # whatever the default source was, the cache is a build of it
    if is_url(str(source)) and not str(source).startswith("file:"):
        return cached.provenance.source == str(source)
    p = Path(str(source)[7:] if str(source).startswith("file://") else source)
    if not p.exists():
        return False
    return cached.provenance.sha256 == _source_digest(p)


def _build(path: Path, label: str, region: str) -> MorphableModel:
    return _assemble(_parse(path), path, label, region)


def _parse(path: Path) -> dict:
    """Read every OBJ of a source once: neutral mesh, config, morph targets in float32 mm.

    Each target is stored as float32(target_mm): bases are then float32(target) -
    float32(neutral), which is exact (Sterbenz) for nearby values, so ``mean + basis`` gives
    back the target's float32 coordinates.
    """
    files = _iter_folder(path) if path.is_dir() else _iter_archive(path)
    neutral = None
    config = None
    shapes: dict[str, np.ndarray] = {}
    for name, data in files:
        src = f"{path}:{name}" if not path.is_dir() else str(path / name)
        if name == "vertex_indices.json":
            try:
                config = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelFormatError(src, None, f"bad JSON ({e})") from None
            if not isinstance(config, dict):
                raise ModelFormatError(src, None, "expected a JSON object")
        elif name == "generic_neutral_mesh.obj":
            neutral = read_obj(data, src)
            _check_count(neutral.vertices, src)
        elif name.endswith(".obj"):
            v = read_obj_vertices(data, src)
            _check_count(v, src)
            shapes[name[:-4]] = (v * CM_TO_MM).astype(np.float32)
    where = str(path)
    if neutral is None:
        raise ModelFormatError(where, "generic_neutral_mesh.obj", "missing")
    if config is None:
        raise ModelFormatError(where, "vertex_indices.json", "missing")
    return {"neutral": neutral, "config": config, "shapes": shapes,
            "sha256": _source_digest(path)}


def _assemble(parsed: dict, path: Path, label: str, region: str) -> MorphableModel:
    neutral, config, shapes = parsed["neutral"], parsed["config"], parsed["shapes"]
    where = str(path)
    nv, npoly = REGIONS[region]
    header = neutral.header
    exp_names = config.get("expressions")
    if not isinstance(exp_names, list) or not all(isinstance(s, str) for s in exp_names):
        raise ModelFormatError(f"{where}:vertex_indices.json", "expressions", "missing or not a list")
    id_names = sorted(n for n in shapes if n.startswith("identity"))
    if id_names != [f"identity{k:03d}" for k in range(len(id_names))] or not id_names:
        raise ModelFormatError(where, "identity*.obj", f"expected identity000..N, got {id_names[:3]}...")
    missing = [n for n in exp_names if n not in shapes]
    if missing:
        raise ModelFormatError(where, f"{missing[0]}.obj", f"missing ({len(missing)} expressions)")

    mean32 = (neutral.vertices[:nv] * CM_TO_MM).astype(np.float32)

    def deltas(names):
        out = np.empty((len(names), nv, 3), np.float32)
        for i, n in enumerate(names):
            np.subtract(shapes[n][:nv], mean32, out=out[i])
        return out

    id_basis = deltas(id_names)
    exp_basis = deltas(exp_names)

    offsets = neutral.polygon_offsets()
    end = offsets[npoly]
    sizes = neutral.face_sizes[:npoly]
    fv = neutral.face_v[:end]
    fvt = neutral.face_vt[:end]
    if fv.max() >= nv:
        raise ModelFormatError(where, "f", f"region '{region}' polygons use vertices >= {nv}")
    if (fvt < 0).any():
        raise ModelFormatError(where, "f", "region polygons without texture coordinates")
    from facecorpus.meshops.geometry import symmetry_map

    symmetry, residual = symmetry_map(mean32)
    order = _mirror_consistent_corner_order(sizes, fv, symmetry)
    fv, fvt = fv[order], fvt[order]
    triangles = triangulate(sizes, fv).astype(np.int32)
    tri_vt = triangulate(sizes, fvt)
    used_vt, uv_triangles = np.unique(tri_vt, return_inverse=True)
    uv = neutral.uv[used_vt].copy()
    if region == "head":
        uv[:, 0] = uv[:, 0] / 2.0  # UDIM tiles 0 and 1 side by side
    uv_triangles = uv_triangles.reshape(-1, 3).astype(np.int32)

    idx_all = np.arange(nv, dtype=np.int32)
    regions = {"face": idx_all if region != "head" else np.arange(REGIONS["face"][0], dtype=np.int32)}
    if region != "narrow":
        regions["narrow"] = np.arange(REGIONS["narrow"][0], dtype=np.int32)
    else:
        regions["narrow"] = idx_all
    if region == "head":
        regions["head"] = idx_all
    for key, name in (("idx_to_rigid_verts", "rigid"), ("idx_to_fitting_verts", "fitting")):
        if isinstance(config.get(key), list):
            ids = np.asarray(config[key], dtype=np.int64)
            regions[name] = np.unique(ids[(ids >= 0) & (ids < nv)]).astype(np.int32)

    landmarks = np.asarray(LANDMARKS_68, np.int32)
    if config.get("idx_to_landmark_verts") not in (None, list(LANDMARKS_68)):
        log.warning("%s: vertex_indices.json landmarks differ from the README's; using the README",
                    where)

    license_text = header if "Permission is hereby granted" in header else ICT_LICENSE
    model = MorphableModel(
        name=f"ict-facekit-{region}",
        vertices=mean32,
        triangles=triangles,
        uv=uv.astype(np.float32),
        uv_triangles=uv_triangles,
        id_basis=id_basis,
        id_std=np.ones(len(id_names), np.float32),
        exp_basis=exp_basis,
        exp_std=np.ones(len(exp_names), np.float32),
        exp_names=tuple(exp_names),
        landmarks=landmarks,
        contour_right=np.asarray(JAW_RIGHT_EXTENDED, np.int32),
        contour_left=np.asarray(JAW_LEFT_EXTENDED[::-1], np.int32),
        symmetry=symmetry,
        regions=regions,
        units="mm",
        provenance=Provenance(
            source=label,
            sha256=parsed["sha256"],
            license=license_text,
            notes=(f"builder={BUILDER_VERSION}; ICT-FaceKit ({ICT_REPO_URL}) region={region}; "
                   f"cm->mm x{CM_TO_MM:g}; id_std=1 (weights ~ N(0,1)), exp_std=1 (blendshape "
                   f"weights in [0,1]); symmetry residual max {float(residual.max()):.4f} mm"),
        ),
    )
    return model.validate(where)


def _mirror_consistent_corner_order(sizes: np.ndarray, corners: np.ndarray,
                                     symmetry: np.ndarray) -> np.ndarray:
    """Corner permutation that makes fan triangulation mirror-consistent.

    A quad is split along its (0, 2) diagonal. For each pair of mirror quads the lower-indexed
    one keeps that split and its partner starts its fan at corner 1 where needed, so that the
    mirror image of every triangle is a triangle (exact topological symmetry). Quads on the
    mirror plane and other polygons keep their order. Winding is unchanged (a rotation).

    Returns:
        (len(corners),) int64 index array into ``corners``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.arange(len(corners), dtype=np.int64)
    quads = np.flatnonzero(sizes == 4)
    if quads.size == 0:
        return order
    Q = corners[starts[quads][:, None] + np.arange(4)]
    index = {tuple(row): i for i, row in enumerate(np.sort(Q, axis=1).tolist())}
    M = symmetry[Q]
    partner = np.array([index.get(tuple(row), -1) for row in np.sort(M, axis=1).tolist()])
    for i in np.flatnonzero(partner > np.arange(len(Q))):
        j = partner[i]
        diag = {int(M[i, 0]), int(M[i, 2])}
        if diag == {int(Q[j, 0]), int(Q[j, 2])}:
            continue
        if diag == {int(Q[j, 1]), int(Q[j, 3])}:
            s0 = starts[quads[j]]
            order[s0:s0 + 4] = s0 + np.array([1, 2, 3, 0])
    return order


def _check_count(v: np.ndarray, src: str) -> None:
    if v.shape != (N_VERTICES, 3):
        raise ModelFormatError(src, "v", f"expected {N_VERTICES} vertices, got {len(v)}")
    if not np.isfinite(v).all():
        raise ModelFormatError(src, "v", "contains NaN or infinite values")


def read_ict_obj_vertices(source: str | os.PathLike, names) -> dict[str, np.ndarray]:
    """(26719, 3) float64 cm positions of some OBJs (e.g. ``["identity007", "jawOpen"]``)
    from a folder or archive, in one pass: for checking a built model against the originals."""
    path = Path(source)
    want = {(n if n.endswith(".obj") else n + ".obj") for n in ([names] if isinstance(names, str)
                                                              else names)}
    out = {}
    files = _iter_folder(path) if path.is_dir() else _iter_archive(path)
    for n, data in files:
        if n in want:
            out[n[:-4]] = read_obj_vertices(data, f"{path}:{n}")
            if len(out) == len(want):
                break
    missing = sorted(want - {k + ".obj" for k in out})
    if missing:
        raise ModelFormatError(path, missing[0], "missing")
    return out


__all__ = [
    "ICT_DOWNLOAD_URL",
    "ICT_REPO_URL",
    "LANDMARKS_68",
    "REGIONS",
    "build_ict_facekit",
    "ict_cache_path",
    "load_ict_facekit",
    "read_ict_obj_vertices",
    "resolve_ict_source",
]
