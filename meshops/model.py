"""The `MorphableModel` record: the one representation of a 3D morphable face model that
every stage uses.

Conventions (all stages rely on these; tests pin them):

- Units: **millimetres**. Loaders convert (ICT-FaceKit is in centimetres, BFM in
  micrometres-ish "units" of 1e-3 mm ... each loader documents its factor).
- Model space is right-handed: +x towards the subject's left (viewer's right when the face
  looks at the camera), +y up, +z out of the face towards the camera. The mean face is
  roughly centred at the origin.
- Shape: ``vertices = mean + sum_k alpha_k * id_basis[k] + sum_j beta_j * exp_basis[j]``.
  ``alpha_k`` are raw coefficients; ``id_std[k]`` is the prior standard deviation of
  ``alpha_k`` (so ``alpha / id_std`` is N(0, 1) under the prior). Same for expressions
  with ``exp_std`` (blendshape models such as ICT use weights in [0, 1]; their std is a
  prior scale, documented by the loader).
- UV layout with seams is stored OBJ-style as **per-corner UVs**: ``uv`` (T, 2) holds the
  texture coordinates and ``uv_triangles`` (F, 3) indexes into it corner by corner, so a
  seam vertex simply has different UV indices in the faces around it. u grows right,
  v grows **up** (OBJ convention); a UV image row r corresponds to v = 1 - (r + 0.5) / S.
- ``landmarks``: 68 vertex indices in the Multi-PIE order (0-16 jaw, 17-26 brows, 27-35
  nose, 36-47 eyes, 48-67 mouth). ``contour_right`` / ``contour_left``: ordered candidate
  vertex sets for the sliding jawline landmarks (right = subject's right, landmarks 0-7;
  left = landmarks 9-16), top to bottom.
- ``symmetry``: for every vertex, the index of its mirror vertex (mirror in x).
- ``regions``: named vertex-index sets (``face``, ``narrow``, ...), indices into this
  model's own vertex array.

Saved as ``.npz`` without pickle: every field is a plain numeric or unicode array;
dicts are flattened to ``regions__<name>`` keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from facecorpus.core.errors import FacecorpusError

FORMAT_VERSION = 1


class ModelFormatError(ValueError, FacecorpusError):
    """A model file is malformed. The message names the file and the field.

    Also a FacecorpusError, so the CLI reports it without a traceback."""

    def __init__(self, path: str | os.PathLike | None, field_name: str | None, reason: str):
        self.path = None if path is None else str(path)
        self.field = field_name
        self.reason = reason
        where = f"{self.path}" if self.path else "<in-memory model>"
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass(frozen=True, eq=False)
class Provenance:
    source: str = ""
    sha256: str = ""
    license: str = ""
    notes: str = ""


@dataclass(frozen=True, eq=False)
class MorphableModel:
    """A linear 3D morphable face model (shapes in the docstring of this module).

    Shapes: V vertices, F triangles, T UV coordinates, K identity modes, E expression
    modes, A albedo modes.
    """

    name: str
    vertices: np.ndarray  # (V, 3) float32, mm: mean shape
    triangles: np.ndarray  # (F, 3) int32, counter-clockwise seen from outside
    uv: np.ndarray  # (T, 2) float32 in [0, 1]
    uv_triangles: np.ndarray  # (F, 3) int32 indices into uv, per corner
    id_basis: np.ndarray  # (K, V, 3) float32, mm per unit coefficient
    id_std: np.ndarray  # (K,) float32
    exp_basis: np.ndarray  # (E, V, 3) float32
    exp_std: np.ndarray  # (E,) float32
    exp_names: tuple[str, ...]
    landmarks: np.ndarray  # (68,) int32
    contour_right: np.ndarray  # (Nr,) int32
    contour_left: np.ndarray  # (Nl,) int32
    symmetry: np.ndarray  # (V,) int32
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    albedo_mean: np.ndarray | None = None  # (V, 3) float32 in [0, 1], or None
    albedo_basis: np.ndarray | None = None  # (A, V, 3) float32
    albedo_std: np.ndarray | None = None  # (A,) float32
    units: str = "mm"
    provenance: Provenance = field(default_factory=Provenance)

    # ------------------------------------------------------------------ basics
    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def n_id(self) -> int:
        return int(self.id_basis.shape[0])

    @property
    def n_exp(self) -> int:
        return int(self.exp_basis.shape[0])

    @property
    def has_albedo(self) -> bool:
        return self.albedo_mean is not None

    def shape(self, alpha=None, beta=None) -> np.ndarray:
        """Vertices (V, 3) for identity coefficients ``alpha`` (K,) and expression ``beta`` (E,).

        Batched callers use the torch path in the fitting stage; this is the numpy reference.
        """
        v = self.vertices.astype(np.float64)
        if alpha is not None:
            a = np.asarray(alpha, dtype=np.float64)
            v = v + np.tensordot(a, self.id_basis[: a.shape[0]], axes=(0, 0))
        if beta is not None:
            b = np.asarray(beta, dtype=np.float64)
            v = v + np.tensordot(b, self.exp_basis[: b.shape[0]], axes=(0, 0))
        return v.astype(np.float32)

    def albedo(self, gamma=None) -> np.ndarray | None:
        """Per-vertex albedo (V, 3) for albedo coefficients ``gamma`` (A,), or None."""
        if self.albedo_mean is None:
            return None
        a = self.albedo_mean.astype(np.float64)
        if gamma is not None and self.albedo_basis is not None:
            g = np.asarray(gamma, dtype=np.float64)
            a = a + np.tensordot(g, self.albedo_basis[: g.shape[0]], axes=(0, 0))
        return a.astype(np.float32)

    # ------------------------------------------------------------- validation
    def validate(self, path: str | os.PathLike | None = None) -> MorphableModel:
        """Check shapes, dtypes, index ranges and finiteness; raise ModelFormatError."""
        V = self.vertices.shape[0] if self.vertices.ndim == 2 else -1

        def need(cond, fld, reason):
            if not cond:
                raise ModelFormatError(path, fld, reason)

        need(self.vertices.ndim == 2 and self.vertices.shape[1] == 3 and V > 0,
             "vertices", f"expected shape (V, 3), got {self.vertices.shape}")
        need(self.triangles.ndim == 2 and self.triangles.shape[1] == 3,
             "triangles", f"expected shape (F, 3), got {self.triangles.shape}")
        need(self.uv.ndim == 2 and self.uv.shape[1] == 2, "uv",
             f"expected shape (T, 2), got {self.uv.shape}")
        need(self.uv_triangles.shape == self.triangles.shape, "uv_triangles",
             f"expected shape {self.triangles.shape}, got {self.uv_triangles.shape}")
        for fld, basis, std in (("id", self.id_basis, self.id_std),
                                ("exp", self.exp_basis, self.exp_std)):
            need(basis.ndim == 3 and basis.shape[1:] == (V, 3), f"{fld}_basis",
                 f"expected shape (K, {V}, 3), got {basis.shape}")
            need(std.shape == (basis.shape[0],), f"{fld}_std",
                 f"expected shape ({basis.shape[0]},), got {std.shape}")
        need(len(self.exp_names) == self.exp_basis.shape[0], "exp_names",
             f"{len(self.exp_names)} names for {self.exp_basis.shape[0]} expression modes")
        need(self.landmarks.shape == (68,), "landmarks",
             f"expected 68 landmark indices, got shape {self.landmarks.shape}")
        need(self.symmetry.shape == (V,), "symmetry",
             f"expected shape ({V},), got {self.symmetry.shape}")
        for fld in ("vertices", "uv", "id_basis", "id_std", "exp_basis", "exp_std",
                    "albedo_mean", "albedo_basis", "albedo_std"):
            arr = getattr(self, fld)
            if arr is not None:
                need(np.issubdtype(arr.dtype, np.floating), fld, f"expected floats, got {arr.dtype}")
                need(bool(np.isfinite(arr).all()), fld, "contains NaN or infinite values")
        for fld, arr, n in (("triangles", self.triangles, V), ("uv_triangles", self.uv_triangles,
                            self.uv.shape[0]), ("landmarks", self.landmarks, V),
                            ("contour_right", self.contour_right, V),
                            ("contour_left", self.contour_left, V), ("symmetry", self.symmetry, V)):
            need(np.issubdtype(arr.dtype, np.integer), fld, f"expected integers, got {arr.dtype}")
            if arr.size:
                need(int(arr.min()) >= 0 and int(arr.max()) < n, fld,
                     f"indices out of range [0, {n})")
        for name, idx in self.regions.items():
            need(np.issubdtype(idx.dtype, np.integer) and (idx.size == 0 or
                 (idx.min() >= 0 and idx.max() < V)), f"regions__{name}", "bad vertex indices")
        if self.albedo_mean is not None:
            need(self.albedo_mean.shape == (V, 3), "albedo_mean",
                 f"expected shape ({V}, 3), got {self.albedo_mean.shape}")
            if self.albedo_basis is not None:
                need(self.albedo_basis.ndim == 3 and self.albedo_basis.shape[1:] == (V, 3),
                     "albedo_basis", f"expected shape (A, {V}, 3), got {self.albedo_basis.shape}")
                need(self.albedo_std is not None
                     and self.albedo_std.shape == (self.albedo_basis.shape[0],),
                     "albedo_std", "missing or wrong shape")
        return self

    # -------------------------------------------------------------------- io
    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (no pickle) atomically: temp file, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
            "name": np.array(self.name),
            "units": np.array(self.units),
            "exp_names": np.array(list(self.exp_names), dtype=np.str_),
            "provenance": np.array(json.dumps(dataclasses.asdict(self.provenance))),
        }
        for f in ("vertices", "triangles", "uv", "uv_triangles", "id_basis", "id_std",
                  "exp_basis", "exp_std", "landmarks", "contour_right", "contour_left",
                  "symmetry", "albedo_mean", "albedo_basis", "albedo_std"):
            arr = getattr(self, f)
            if arr is not None:
                arrays[f] = np.ascontiguousarray(arr)
        for name, idx in self.regions.items():
            arrays[f"regions__{name}"] = np.asarray(idx, dtype=np.int32)
        from facecorpus.core import atomic

        return atomic.save_npz(path, arrays, compressed=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MorphableModel:
        """Read an ``.npz`` written by :meth:`save`; never unpickles."""
        path = Path(path)
        try:
            npz = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelFormatError(path, None, "file not found") from None
        except ValueError as e:  # object arrays need pickle: refused
            raise ModelFormatError(path, None, f"refused: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, not a zip, ...
            raise ModelFormatError(path, None, f"not a readable .npz ({e})") from None
        with npz:
            try:
                keys = set(npz.files)
                def get(k, optional=False):
                    if k not in keys:
                        if optional:
                            return None
                        raise ModelFormatError(path, k, "missing")
                    try:
                        return npz[k]
                    except ValueError as e:
                        raise ModelFormatError(path, k, f"refused: {e}") from None
                    except Exception as e:  # noqa: BLE001 - any read failure is a bad file
                        raise ModelFormatError(path, k, f"unreadable ({e})") from None

                version = int(get("format_version"))
                if version != FORMAT_VERSION:
                    raise ModelFormatError(path, "format_version",
                                           f"unsupported version {version}")
                try:
                    prov = Provenance(**json.loads(str(get("provenance"))))
                except (TypeError, json.JSONDecodeError) as e:
                    raise ModelFormatError(path, "provenance", f"bad JSON ({e})") from None
                model = cls(
                    name=str(get("name")),
                    vertices=get("vertices"),
                    triangles=get("triangles"),
                    uv=get("uv"),
                    uv_triangles=get("uv_triangles"),
                    id_basis=get("id_basis"),
                    id_std=get("id_std"),
                    exp_basis=get("exp_basis"),
                    exp_std=get("exp_std"),
                    exp_names=tuple(str(s) for s in get("exp_names")),
                    landmarks=get("landmarks"),
                    contour_right=get("contour_right"),
                    contour_left=get("contour_left"),
                    symmetry=get("symmetry"),
                    regions={k[len("regions__"):]: get(k) for k in sorted(keys)
                             if k.startswith("regions__")},
                    albedo_mean=get("albedo_mean", True),
                    albedo_basis=get("albedo_basis", True),
                    albedo_std=get("albedo_std", True),
                    units=str(get("units")),
                    provenance=prov,
                )
            except ModelFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure is a bad file
                raise ModelFormatError(path, None, f"unreadable ({e})") from None
        return model.validate(path)

    def content_hash(self) -> str:
        """sha256 over every array and name that can change a fitted or rendered output
        (geometry, bases and their priors, landmarks, contours, symmetry, regions, albedo):
        identifies a model in dataset schemas and shard keys. Provenance text is left out."""
        h = hashlib.sha256()
        arrays = {f: getattr(self, f) for f in (
            "vertices", "triangles", "uv", "uv_triangles", "id_basis", "id_std", "exp_basis",
            "exp_std", "landmarks", "contour_right", "contour_left", "symmetry", "albedo_mean",
            "albedo_basis", "albedo_std")}
        arrays.update({f"region:{k}": v for k, v in sorted(self.regions.items())})
        for name, arr in arrays.items():
            if arr is not None:
                a = np.ascontiguousarray(arr)
                h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(a.tobytes())
        h.update(("exp_names:" + ",".join(self.exp_names) + ";units:" + self.units).encode())
        return h.hexdigest()
