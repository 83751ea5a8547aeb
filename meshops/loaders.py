"""Loaders for licensed morphable models that users bring themselves.

Each reads the file's fields with the names, shapes and dtypes its publisher uses, converts to
millimetres and returns a validated :class:`MorphableModel`. Anything malformed (unreadable or
truncated file, missing key, wrong shape, NaN) raises :class:`ModelFormatError` naming the file
and the field. Pickle formats go through :mod:`facecorpus.meshops.safe_pickle`.

| format | file | units -> mm | coefficient prior |
|---|---|---|---|
| BFM 2009 | ``01_MorphableModel.mat``: shapeMU (3N,1), shapePC (3N,199), shapeEV (199,1), texMU, texPC, texEV (0-255), tl (F,3) 1-based | um: x 1e-3 | ``id_std = shapeEV`` (PCs orthonormal) |
| BFM 2017/2019 | ``.h5``: shape/model/{mean (3N,), pcaBasis (3N,K), pcaVariance (K,)}, shape/representer/cells (3,F); color/..., expression/... | mm | ``std = sqrt(pcaVariance)`` |
| Deep3DFaceRecon | ``BFM_model_front.mat``: meanshape (1,3N), idBase (3N,80), exBase (3N,64), meantex, texBase, tri (F,3) 1-based, keypoints (1,68) 1-based | dm: x 100 | bases already scaled by the std: ``std = 1`` |
| FLAME | ``generic_model.pkl``: v_template (V,3), f (F,3), shapedirs (V,3,300+100) | m: x 1000 | ``std = 1`` (FLAME's betas/psi are unit-variance) |
| 3DDFA | ``bfm_noneck_v3.pkl``: u (3N,1), w_shp (3N,40), w_exp (3N,10), tri (3,F) 0-based, keypoints (204,) into 3N | um: x 1e-3 | not stored: ``std = 1`` unless given |

None of these carry UVs: a cylindrical projection of the mean shape is generated (noted in the
provenance). Formats without 68 landmark indices (BFM 2009/2017, FLAME) need ``landmarks=``:
indices or a file (:func:`read_landmark_indices`; e.g. BFMLandmarks' ``Landmarks68_BFM.anl``).
Triangles are re-wound, if needed, so that they face +z (towards the camera) on average.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from facecorpus.meshops.assets import sha256_file
from facecorpus.meshops.model import ModelFormatError, MorphableModel, Provenance


# ------------------------------------------------------------------------------ helpers
class _Fields:
    """Checked access to a mapping of arrays loaded from ``path``."""

    def __init__(self, data, path: Path):
        self.data = data
        self.path = path

    def get(self, key: str, *, optional: bool = False, ndim: int | None = None,
            shape: tuple | None = None, integer: bool = False):
        if key not in self.data:
            if optional:
                return None
            raise ModelFormatError(self.path, key, "missing")
        a = self.data[key]
        from facecorpus.meshops.safe_pickle import to_array

        arr = to_array(a) if not isinstance(a, np.ndarray) else a
        if arr is None:
            try:
                arr = np.asarray(a)
            except (TypeError, ValueError) as e:
                raise ModelFormatError(self.path, key, f"not an array ({e})") from None
        if arr.dtype == object:
            raise ModelFormatError(self.path, key, "not a numeric array")
        if ndim is not None and arr.ndim != ndim:
            raise ModelFormatError(self.path, key, f"expected {ndim} dimensions, got shape {arr.shape}")
        if shape is not None:
            for want, got in zip(shape, arr.shape):
                if want is not None and want != got:
                    raise ModelFormatError(self.path, key, f"expected shape {shape}, got {arr.shape}")
        if integer:
            if not (np.issubdtype(arr.dtype, np.integer) or (np.issubdtype(arr.dtype, np.floating)
                    and np.isfinite(arr).all() and np.all(arr == np.round(arr)))):
                raise ModelFormatError(self.path, key, f"expected integer indices, got {arr.dtype}")
            return arr.astype(np.int64)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ModelFormatError(self.path, key, f"expected numbers, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ModelFormatError(self.path, key, "contains NaN or infinite values")
        return arr.astype(np.float64)



def _pickled_fields(path: Path) -> _Fields:
    """A pickled dict read through the restricted unpickler, as checked fields."""
    from facecorpus.meshops.safe_pickle import RefusedPickleError, safe_load

    try:
        d = safe_load(path)
    except FileNotFoundError:
        raise ModelFormatError(path, None, "file not found") from None
    except RefusedPickleError as e:
        raise ModelFormatError(path, None, f"refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise ModelFormatError(path, None, f"not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ModelFormatError(path, None, f"expected a dict, got {type(d).__name__}")
    return _Fields(d, path)

def _vec_to_vertices(a: np.ndarray, n: int, path, key) -> np.ndarray:
    """(3N,), (3N,1), (1,3N) -> (N, 3) (x, y, z interleaved, the BFM convention)."""
    flat = a.reshape(-1)
    if flat.size != 3 * n:
        raise ModelFormatError(path, key, f"expected {3 * n} values, got {flat.size}")
    return flat.reshape(n, 3)


def _basis(a: np.ndarray, n: int, path, key) -> np.ndarray:
    """(3N, K) column basis -> (K, N, 3)."""
    if a.ndim != 2 or a.shape[0] != 3 * n:
        raise ModelFormatError(path, key, f"expected shape ({3 * n}, K), got {a.shape}")
    return np.ascontiguousarray(a.T.reshape(a.shape[1], n, 3))


def _std(a: np.ndarray | None, k: int, path, key) -> np.ndarray:
    if a is None:
        return np.ones(k, np.float32)
    s = a.reshape(-1)
    if s.size < k:
        raise ModelFormatError(path, key, f"expected {k} values, got {s.size}")
    if (s[:k] < 0).any():
        raise ModelFormatError(path, key, "negative standard deviation/variance")
    return s[:k].astype(np.float32)


def _triangles(t: np.ndarray, n_vertices: int, path, key, one_based: bool) -> np.ndarray:
    if t.ndim != 2 or 3 not in t.shape:
        raise ModelFormatError(path, key, f"expected shape (F, 3) or (3, F), got {t.shape}")
    if t.shape[1] != 3:
        t = t.T
    t = t - (1 if one_based else 0)
    if t.size and (t.min() < 0 or t.max() >= n_vertices):
        raise ModelFormatError(path, key, f"indices out of range for {n_vertices} vertices")
    return np.ascontiguousarray(t, dtype=np.int32)


def cylindrical_uv(vertices: np.ndarray) -> np.ndarray:
    """(V, 2) float32 UVs from a cylindrical projection about the y axis (u = azimuth,
    v = height), normalised into [0.02, 0.98]: a stand-in layout for models without UVs."""
    v = np.asarray(vertices, dtype=np.float64)
    c = v.mean(0)
    depth = np.ptp(v[:, 2]) if len(v) > 1 else 1.0
    az = np.arctan2(v[:, 0] - c[0], v[:, 2] - (c[2] - depth))
    h = v[:, 1]

    def norm(x):
        rng = np.ptp(x)
        return 0.02 + 0.96 * (x - x.min()) / (rng if rng > 0 else 1.0)

    return np.stack([norm(az), norm(h)], 1).astype(np.float32)


def _assemble(path: Path, name: str, vertices, triangles, id_basis, id_std, *, exp_basis=None,
              exp_std=None, exp_names=None, albedo_mean=None, albedo_basis=None,
              albedo_std=None, landmarks=None, notes: str = "", license_text: str = ""
              ) -> MorphableModel:
    from facecorpus.meshops.geometry import symmetry_map

    V = vertices.shape[0]
    tri = triangles
    fn = np.cross(vertices[tri[:, 1]] - vertices[tri[:, 0]], vertices[tri[:, 2]] - vertices[tri[:, 0]])
    rewound = False
    if fn[:, 2].sum() < 0:  # faces must point to +z (the camera) on average
        tri = tri[:, [0, 2, 1]]
        rewound = True
    if landmarks is None:
        raise ModelFormatError(path, "landmarks",
                               "this format carries no 68-point landmark indices: pass landmarks= "
                               "(indices, or a .anl/.npy/.txt file)")
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = read_landmark_indices(landmarks)
    lm = np.asarray(landmarks, dtype=np.int64).reshape(-1)
    if lm.shape != (68,) or lm.min() < 0 or lm.max() >= V:
        raise ModelFormatError(path, "landmarks", f"expected 68 indices in [0, {V}), got {lm.shape}")
    if exp_basis is None:
        exp_basis = np.zeros((0, V, 3), np.float32)
        exp_std = np.zeros(0, np.float32)
        exp_names = ()
    symmetry, residual = symmetry_map(vertices)
    model = MorphableModel(
        name=name,
        vertices=vertices.astype(np.float32),
        triangles=tri.astype(np.int32),
        uv=cylindrical_uv(vertices),
        uv_triangles=tri.astype(np.int32),
        id_basis=id_basis.astype(np.float32),
        id_std=np.asarray(id_std, np.float32),
        exp_basis=exp_basis.astype(np.float32),
        exp_std=np.asarray(exp_std, np.float32),
        exp_names=tuple(exp_names) if exp_names is not None else tuple(
            f"exp{j:03d}" for j in range(exp_basis.shape[0])),
        landmarks=lm.astype(np.int32),
        contour_right=np.zeros(0, np.int32),
        contour_left=np.zeros(0, np.int32),
        symmetry=symmetry,
        regions={"face": np.arange(V, dtype=np.int32)},
        albedo_mean=None if albedo_mean is None else np.clip(albedo_mean, 0, 1).astype(np.float32),
        albedo_basis=None if albedo_basis is None else albedo_basis.astype(np.float32),
        albedo_std=None if albedo_std is None else np.asarray(albedo_std, np.float32),
        units="mm",
        provenance=Provenance(
            source=str(path), sha256=sha256_file(path), license=license_text,
            notes=(f"{notes}; uv: generated cylindrical projection (no UVs in the source)"
                   f"{'; triangles re-wound to face +z' if rewound else ''}; "
                   f"symmetry residual max {float(residual.max()):.3f} mm")),
    )
    return model.validate(path)


def read_landmark_indices(path: str | os.PathLike) -> np.ndarray:
    """68 landmark vertex indices from a file: ``.anl`` (BFMLandmarks' format: ``%`` comment
    lines, one **1-based** index per line, e.g. ``Landmarks68_BFM.anl`` for BFM 2009/2017),
    ``.npy`` or text (``#``/``%`` comments), both 0-based.

    Raises:
        ModelFormatError: unreadable file or not 68 non-negative integers.
    """
    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            lines = [ln.split("#")[0].strip() for ln in p.read_text().splitlines()]
            a = np.array([float(t) for ln in lines if ln and not ln.startswith("%")
                          for t in ln.replace(",", " ").split()])
            if p.suffix.lower() == ".anl":
                a = a - 1
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(p, "landmarks", f"unreadable ({e})") from None
    a = np.asarray(a).reshape(-1)
    if a.shape != (68,) or not np.all(a == np.round(a)) or (a < 0).any():
        raise ModelFormatError(p, "landmarks", f"expected 68 non-negative indices, got {a.shape}")
    return a.astype(np.int64)


def _load_mat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:  # MATLAB v7.3 = HDF5
        return _load_h5_flat(path)
    except FileNotFoundError:
        raise ModelFormatError(path, None, "file not found") from None
    except (ValueError, OSError, TypeError, EOFError, KeyError) as e:
        raise ModelFormatError(path, None, f"not a readable .mat file ({e})") from None


def _load_h5_flat(path: Path) -> dict:
    import h5py

    out: dict = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    a = obj[()]
                    # MATLAB v7.3 stores column-major: transpose back
                    out[name] = a.T if isinstance(a, np.ndarray) and a.ndim == 2 else a
            f.visititems(visit)
    except FileNotFoundError:
        raise ModelFormatError(path, None, "file not found") from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(path, None, f"not a readable HDF5 file ({e})") from None
    return out


# ------------------------------------------------------------------------------ formats
def load_bfm2009(path: str | os.PathLike, landmarks=None) -> MorphableModel:
    """Basel Face Model 2009 ``01_MorphableModel.mat`` (micrometres; no expressions)."""
    path = Path(path)
    f = _Fields(_load_mat(path), path)
    mu = f.get("shapeMU")
    n = mu.size // 3
    if mu.size % 3 or n == 0:
        raise ModelFormatError(path, "shapeMU", f"expected 3N values, got {mu.size}")
    vertices = _vec_to_vertices(mu, n, path, "shapeMU") * 1e-3
    pc = f.get("shapePC", ndim=2)
    idb = _basis(pc, n, path, "shapePC") * 1e-3
    ev = _std(f.get("shapeEV"), idb.shape[0], path, "shapeEV")
    tex_mu = f.get("texMU", optional=True)
    alb = alb_b = alb_s = None
    if tex_mu is not None:
        alb = _vec_to_vertices(tex_mu, n, path, "texMU") / 255.0
        tpc = f.get("texPC", ndim=2)
        alb_b = _basis(tpc, n, path, "texPC") / 255.0
        alb_s = _std(f.get("texEV"), alb_b.shape[0], path, "texEV")
    tri = _triangles(f.get("tl", integer=True), n, path, "tl", one_based=True)
    return _assemble(path, "bfm2009", vertices, tri, idb, ev, albedo_mean=alb,
                     albedo_basis=alb_b, albedo_std=alb_s, landmarks=landmarks,
                     notes="BFM 2009; um -> mm x1e-3; id_std = shapeEV; tex /255",
                     license_text="Basel Face Model 2009: licensed by the University of Basel "
                                  "to the user; not redistributable.")


def load_bfm2017(path: str | os.PathLike, landmarks=None) -> MorphableModel:
    """Basel Face Model 2017/2019 ``.h5`` (statismo layout, millimetres)."""
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except FileNotFoundError:
        raise ModelFormatError(path, None, "file not found") from None
    except (OSError, ValueError) as e:
        raise ModelFormatError(path, None, f"not a readable HDF5 file ({e})") from None
    with fh:
        def ds(key, optional=False):
            if key not in fh:
                if optional:
                    return None
                raise ModelFormatError(path, key, "missing")
            try:
                return fh[key][()]
            except (OSError, ValueError, KeyError) as e:
                raise ModelFormatError(path, key, f"unreadable ({e})") from None

        data = {k: ds(k, optional=True) for k in (
            "shape/model/mean", "shape/model/pcaBasis", "shape/model/pcaVariance",
            "shape/representer/cells", "color/model/mean", "color/model/pcaBasis",
            "color/model/pcaVariance", "expression/model/mean", "expression/model/pcaBasis",
            "expression/model/pcaVariance")}
    f = _Fields({k: v for k, v in data.items() if v is not None}, path)
    mu = f.get("shape/model/mean")
    n = mu.size // 3
    if mu.size % 3 or n == 0:
        raise ModelFormatError(path, "shape/model/mean", f"expected 3N values, got {mu.size}")
    vertices = _vec_to_vertices(mu, n, path, "shape/model/mean")
    idb = _basis(f.get("shape/model/pcaBasis", ndim=2), n, path, "shape/model/pcaBasis")
    var = f.get("shape/model/pcaVariance")
    id_std = np.sqrt(_std(var, idb.shape[0], path, "shape/model/pcaVariance"))
    tri = _triangles(f.get("shape/representer/cells", integer=True), n, path,
                     "shape/representer/cells", one_based=False)
    exb = exs = None
    if "expression/model/pcaBasis" in f.data:
        exb = _basis(f.get("expression/model/pcaBasis", ndim=2), n, path,
                     "expression/model/pcaBasis")
        exs = np.sqrt(_std(f.get("expression/model/pcaVariance"), exb.shape[0], path,
                           "expression/model/pcaVariance"))
        emu = f.get("expression/model/mean", optional=True)
        if emu is not None:
            vertices = vertices + _vec_to_vertices(emu, n, path, "expression/model/mean")
    alb = alb_b = alb_s = None
    if "color/model/mean" in f.data:
        alb = _vec_to_vertices(f.get("color/model/mean"), n, path, "color/model/mean")
        alb_b = _basis(f.get("color/model/pcaBasis", ndim=2), n, path, "color/model/pcaBasis")
        alb_s = np.sqrt(_std(f.get("color/model/pcaVariance"), alb_b.shape[0], path,
                             "color/model/pcaVariance"))
    return _assemble(path, "bfm2017", vertices, tri, idb, id_std, exp_basis=exb, exp_std=exs,
                     albedo_mean=alb, albedo_basis=alb_b, albedo_std=alb_s, landmarks=landmarks,
                     notes="BFM 2017/2019 (statismo h5); mm; std = sqrt(pcaVariance); "
                           "mean includes the expression mean",
                     license_text="Basel Face Model 2017/2019: licensed by the University of "
                                  "Basel to the user; not redistributable.")


def load_deep3d_bfm_front(path: str | os.PathLike) -> MorphableModel:
    """Deep3DFaceRecon's ``BFM_model_front.mat`` (decimetres; bases pre-scaled by the std)."""
    path = Path(path)
    f = _Fields(_load_mat(path), path)
    mu = f.get("meanshape")
    n = mu.size // 3
    if mu.size % 3 or n == 0:
        raise ModelFormatError(path, "meanshape", f"expected 3N values, got {mu.size}")
    vertices = _vec_to_vertices(mu, n, path, "meanshape") * 100.0
    idb = _basis(f.get("idBase", ndim=2), n, path, "idBase") * 100.0
    exb = _basis(f.get("exBase", ndim=2), n, path, "exBase") * 100.0
    alb = _vec_to_vertices(f.get("meantex"), n, path, "meantex") / 255.0
    alb_b = _basis(f.get("texBase", ndim=2), n, path, "texBase") / 255.0
    tri = _triangles(f.get("tri", integer=True), n, path, "tri", one_based=True)
    kp = f.get("keypoints", integer=True).reshape(-1) - 1
    if kp.shape != (68,):
        raise ModelFormatError(path, "keypoints", f"expected 68 indices, got {kp.shape}")
    return _assemble(path, "deep3d-bfm-front", vertices, tri, idb, np.ones(idb.shape[0]),
                     exp_basis=exb, exp_std=np.ones(exb.shape[0]), albedo_mean=alb,
                     albedo_basis=alb_b, albedo_std=np.ones(alb_b.shape[0]), landmarks=kp,
                     notes="Deep3DFaceRecon BFM_model_front; dm -> mm x100; bases already "
                           "multiplied by the std (std = 1); tex /255",
                     license_text="Derived from the Basel Face Model 2009 and FaceWarehouse "
                                  "expressions: licensed to the user; not redistributable.")


def load_flame(path: str | os.PathLike, landmarks=None, n_shape: int = 300,
               n_exp: int = 100) -> MorphableModel:
    """FLAME ``generic_model.pkl`` / ``flame2020`` pickles, read without chumpy (metres)."""
    path = Path(path)
    f = _pickled_fields(path)
    vt = f.get("v_template", ndim=2, shape=(None, 3))
    n = vt.shape[0]
    sd = f.get("shapedirs", ndim=3, shape=(n, 3, None))
    if sd.shape[2] < n_shape:
        raise ModelFormatError(path, "shapedirs", f"expected >= {n_shape} components, got {sd.shape[2]}")
    tri = _triangles(f.get("f", integer=True), n, path, "f", one_based=False)
    idb = np.moveaxis(sd[:, :, :n_shape], 2, 0) * 1000.0
    ne = min(n_exp, sd.shape[2] - n_shape)
    exb = np.moveaxis(sd[:, :, n_shape:n_shape + ne], 2, 0) * 1000.0
    return _assemble(path, "flame", vt * 1000.0, tri, idb, np.ones(n_shape), exp_basis=exb,
                     exp_std=np.ones(ne), landmarks=landmarks,
                     notes=f"FLAME; m -> mm x1000; shapedirs[:, :, :{n_shape}] identity, next "
                           f"{ne} expression; std = 1 (unit-variance betas/psi); pose "
                           "blendshapes and skinning not carried",
                     license_text="FLAME: licensed by MPI-IS to the user; not redistributable.")


def load_3ddfa_bfm(path: str | os.PathLike, triangles=None, id_std=None, exp_std=None
                   ) -> MorphableModel:
    """3DDFA's ``bfm_noneck_v3.pkl`` (BFM micrometres; keypoints index the 3N array)."""
    path = Path(path)
    f = _pickled_fields(path)
    u = f.get("u")
    n = u.size // 3
    if u.size % 3 or n == 0:
        raise ModelFormatError(path, "u", f"expected 3N values, got {u.size}")
    vertices = _vec_to_vertices(u, n, path, "u") * 1e-3
    idb = _basis(f.get("w_shp", ndim=2), n, path, "w_shp") * 1e-3
    exb = _basis(f.get("w_exp", ndim=2), n, path, "w_exp") * 1e-3
    if triangles is None:
        tri = _triangles(f.get("tri", integer=True), n, path, "tri", one_based=False)
    else:
        tri = _triangles(np.asarray(triangles), n, path, "triangles", one_based=False)
    kp = f.get("keypoints", integer=True).reshape(-1)
    if kp.shape != (204,) or np.any(kp[0::3] % 3 != 0):
        raise ModelFormatError(path, "keypoints", "expected 204 = 68 x (x, y, z) indices into 3N")
    lm = kp[0::3] // 3
    return _assemble(path, "3ddfa-bfm-noneck", vertices, tri, idb,
                     _std(None if id_std is None else np.asarray(id_std), idb.shape[0], path,
                          "id_std"),
                     exp_basis=exb,
                     exp_std=_std(None if exp_std is None else np.asarray(exp_std),
                                  exb.shape[0], path, "exp_std"),
                     landmarks=lm,
                     notes="3DDFA bfm_noneck_v3; um -> mm x1e-3; the file stores no prior "
                           "std (1 unless given)",
                     license_text="Derived from the Basel Face Model 2009: licensed to the user; "
                                  "not redistributable.")


def load_model_file(path: str | os.PathLike, **kwargs) -> MorphableModel:
    """Load any supported model file, choosing the loader from its extension and keys."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ModelFormatError(path, None, "file not found")
    if suffix == ".npz":
        return MorphableModel.load(path)
    if suffix in (".h5", ".hdf5"):
        return load_bfm2017(path, **kwargs)
    if suffix == ".mat":
        keys = set(_load_mat(path))
        if "shapeMU" in keys:
            return load_bfm2009(path, **kwargs)
        if "meanshape" in keys:
            return load_deep3d_bfm_front(path)
        raise ModelFormatError(path, None, "unknown .mat layout (neither BFM 2009 nor "
                                           "Deep3DFaceRecon BFM_model_front)")
    if suffix == ".pkl":
        from facecorpus.meshops.safe_pickle import RefusedPickleError, safe_load

        try:
            d = safe_load(path)
        except RefusedPickleError as e:
            raise ModelFormatError(path, None, f"refused: {e}") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed file
            raise ModelFormatError(path, None, f"not a readable pickle ({e})") from None
        if isinstance(d, dict) and "v_template" in d:
            return load_flame(path, **kwargs)
        if isinstance(d, dict) and "w_shp" in d:
            return load_3ddfa_bfm(path, **kwargs)
        raise ModelFormatError(path, None, "unknown .pkl layout (neither FLAME nor 3DDFA)")
    raise ModelFormatError(path, None, f"unsupported model file type '{suffix}'")
