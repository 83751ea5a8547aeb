"""Loaders for user-supplied model files, each written here in its published layout, plus
malformed files and a malicious pickle."""

from __future__ import annotations

import os
import pickle
import sys
import types

import h5py
import numpy as np
import pytest
import scipy.io
from facecorpus.cli import main
from facecorpus.meshops.loaders import (
    load_3ddfa_bfm,
    load_bfm2009,
    load_bfm2017,
    load_deep3d_bfm_front,
    load_flame,
    load_model_file,
)
from facecorpus.meshops.model import ModelFormatError
from facecorpus.meshops.procedural import procedural_model
from facecorpus.meshops.safe_pickle import RefusedPickleError, safe_loads

K, E = 4, 3


@pytest.fixture(scope="module")
def base():
    """Small ground truth: geometry (mm), bases (mm per unit), landmarks."""
    m = procedural_model(n=21, n_id=K, n_exp=E, seed=1)
    return m


def _flat(a):  # (N, 3) -> (3N,) interleaved x, y, z
    return a.reshape(-1)


def _cols(b):  # (K, N, 3) -> (3N, K)
    return b.reshape(b.shape[0], -1).T


def write_bfm2009(path, m, **override):
    d = {"shapeMU": (_flat(m.vertices) * 1e3)[:, None].astype(np.float32),
         "shapePC": (_cols(m.id_basis) * 1e3).astype(np.float32),
         "shapeEV": m.id_std[:, None].astype(np.float32),
         "texMU": (_flat(m.albedo_mean) * 255)[:, None].astype(np.float32),
         "texPC": (_cols(m.albedo_basis) * 255).astype(np.float32),
         "texEV": m.albedo_std[:, None].astype(np.float32),
         "tl": (m.triangles + 1).astype(np.float64)}  # MATLAB: 1-based doubles
    d.update(override)
    scipy.io.savemat(path, {k: v for k, v in d.items() if v is not None})
    return path


def test_bfm2009(base, tmp_path):
    p = write_bfm2009(tmp_path / "01_MorphableModel.mat", base)
    m = load_bfm2009(p, landmarks=base.landmarks)
    np.testing.assert_allclose(m.vertices, base.vertices, atol=1e-3)
    np.testing.assert_allclose(m.id_basis, base.id_basis, atol=1e-5)
    np.testing.assert_allclose(m.id_std, base.id_std)
    np.testing.assert_allclose(m.albedo_mean, base.albedo_mean, atol=1e-5)
    assert np.array_equal(m.triangles, base.triangles) and m.n_exp == 0
    assert np.array_equal(m.symmetry, base.symmetry)
    assert m.uv.shape == (base.n_vertices, 2) and 0 <= m.uv.min() and m.uv.max() <= 1
    assert load_model_file(p, landmarks=base.landmarks).content_hash() == m.content_hash()
    with pytest.raises(ModelFormatError, match="landmarks"):
        load_bfm2009(p)
    # BFMLandmarks' .anl: '%' comments, 1-based indices
    anl = tmp_path / "Landmarks68_BFM.anl"
    anl.write_text("%68 Landmark points\n" + "\n".join(str(i + 1) for i in base.landmarks) + "\n")
    assert np.array_equal(load_bfm2009(p, landmarks=anl).landmarks, base.landmarks)
    anl.write_text("%short\n1\n2\n")
    with pytest.raises(ModelFormatError, match="68"):
        load_bfm2009(p, landmarks=anl)
    lm = tmp_path / "lm.npy"
    np.save(lm, base.landmarks)
    assert main(["model", "build", "file", "--source", str(p), "--landmarks", str(lm),
                 "--out", str(tmp_path / "bfm.npz")]) == 0
    assert load_model_file(tmp_path / "bfm.npz").content_hash() == m.content_hash()
    # winding: triangles listed clockwise are re-wound to face +z
    p2 = write_bfm2009(tmp_path / "cw.mat", base, tl=(base.triangles[:, [0, 2, 1]] + 1.0))
    m2 = load_bfm2009(p2, landmarks=base.landmarks)
    assert np.array_equal(m2.triangles, base.triangles) and "re-wound" in m2.provenance.notes


def write_bfm2017(path, m, drop=None, nan=None):
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = _flat(m.vertices).astype(np.float32)
        f["shape/model/pcaBasis"] = _cols(m.id_basis).astype(np.float32)
        f["shape/model/pcaVariance"] = (m.id_std**2).astype(np.float32)
        f["shape/representer/points"] = m.vertices.T.astype(np.float32)
        f["shape/representer/cells"] = m.triangles.T.astype(np.int32)
        f["color/model/mean"] = _flat(m.albedo_mean).astype(np.float32)
        f["color/model/pcaBasis"] = _cols(m.albedo_basis).astype(np.float32)
        f["color/model/pcaVariance"] = (m.albedo_std**2).astype(np.float32)
        f["expression/model/mean"] = np.zeros(3 * m.n_vertices, np.float32)
        f["expression/model/pcaBasis"] = _cols(m.exp_basis).astype(np.float32)
        f["expression/model/pcaVariance"] = (m.exp_std**2).astype(np.float32)
        if drop:
            del f[drop]
        if nan:
            a = f[nan][()]
            a.reshape(-1)[3] = np.nan
            del f[nan]
            f[nan] = a
    return path


def test_bfm2017(base, tmp_path):
    p = write_bfm2017(tmp_path / "model2017-1_face12_nomouth.h5", base)
    m = load_bfm2017(p, landmarks=base.landmarks)
    np.testing.assert_allclose(m.vertices, base.vertices, atol=1e-5)
    np.testing.assert_allclose(m.id_std, base.id_std, rtol=1e-6)
    np.testing.assert_allclose(m.exp_basis, base.exp_basis, atol=1e-6)
    assert m.n_exp == E and m.albedo_basis.shape == base.albedo_basis.shape
    a = np.array([1.0, -0.5, 0.2, 0.0])
    np.testing.assert_allclose(m.shape(alpha=a), base.shape(alpha=a), atol=1e-4)


def write_deep3d(path, m, **override):
    d = {"meanshape": (_flat(m.vertices) / 100.0)[None].astype(np.float32),
         "idBase": (_cols(m.id_basis * m.id_std[:, None, None]) / 100.0).astype(np.float32),
         "exBase": (_cols(m.exp_basis) / 100.0).astype(np.float32),
         "meantex": (_flat(m.albedo_mean) * 255)[None].astype(np.float32),
         "texBase": (_cols(m.albedo_basis) * 255).astype(np.float32),
         "tri": (m.triangles + 1).astype(np.float64),
         "point_buf": np.ones((m.n_vertices, 8)),
         "keypoints": (m.landmarks + 1)[None].astype(np.float64)}
    d.update(override)
    scipy.io.savemat(path, {k: v for k, v in d.items() if v is not None})
    return path


def test_deep3d(base, tmp_path):
    p = write_deep3d(tmp_path / "BFM_model_front.mat", base)
    m = load_deep3d_bfm_front(p)
    np.testing.assert_allclose(m.vertices, base.vertices, atol=1e-4)
    assert np.array_equal(m.landmarks, base.landmarks)
    assert np.all(m.id_std == 1)
    a = np.array([0.5, 1.0, -1.0, 0.3])
    np.testing.assert_allclose(m.shape(alpha=a), base.shape(alpha=a * base.id_std), atol=1e-3)
    assert load_model_file(p).name == "deep3d-bfm-front"


def _fake_chumpy():
    """A stand-in `chumpy.ch.Ch` class so a test can write FLAME-style chumpy pickles."""
    mod = types.ModuleType("chumpy.ch")

    class Ch:
        pass

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    mod.Ch = Ch
    return mod


def write_flame(path, m, chumpy=True, **override):
    sd = np.concatenate([m.id_basis, m.exp_basis]).transpose(1, 2, 0) / 1000.0  # (N, 3, K+E)
    d = {"v_template": m.vertices.astype(np.float64) / 1000.0, "f": m.triangles.astype(np.uint32),
         "shapedirs": sd, "posedirs": np.zeros((m.n_vertices, 3, 36)),
         "weights": np.ones((m.n_vertices, 5)) / 5, "kintree_table": np.zeros((2, 5), np.int64),
         "bs_style": "lbs", "bs_type": "lrotmin"}
    d.update(override)
    mods = {}
    if chumpy:
        mods = {"chumpy": types.ModuleType("chumpy"), "chumpy.ch": _fake_chumpy()}
        sys.modules.update(mods)
        ch = mods["chumpy.ch"].Ch()
        ch.__dict__.update({"x": d["shapedirs"], "_dirty_vars": set()})
        d["shapedirs"] = ch
    try:
        path.write_bytes(pickle.dumps(d, protocol=2))
    finally:
        for k in mods:
            sys.modules.pop(k, None)
    return path


def test_flame_with_chumpy_arrays_and_without_chumpy(base, tmp_path):
    assert "chumpy" not in sys.modules
    p = write_flame(tmp_path / "generic_model.pkl", base)
    m = load_flame(p, landmarks=base.landmarks, n_shape=K, n_exp=E)
    assert "chumpy" not in sys.modules  # nothing imported it
    np.testing.assert_allclose(m.vertices, base.vertices, atol=1e-4)
    np.testing.assert_allclose(m.id_basis, base.id_basis, atol=1e-4)
    np.testing.assert_allclose(m.exp_basis, base.exp_basis, atol=1e-4)
    p2 = write_flame(tmp_path / "plain.pkl", base, chumpy=False)
    m2 = load_model_file(p2, landmarks=base.landmarks, n_shape=K, n_exp=E)
    np.testing.assert_allclose(m2.id_basis, m.id_basis)


def write_3ddfa(path, m, **override):
    kp = np.stack([3 * m.landmarks, 3 * m.landmarks + 1, 3 * m.landmarks + 2], 1).reshape(-1)
    d = {"u": (_flat(m.vertices) * 1e3)[:, None].astype(np.float32),
         "w_shp": (_cols(m.id_basis) * 1e3).astype(np.float32),
         "w_exp": (_cols(m.exp_basis) * 1e3).astype(np.float32),
         "tri": m.triangles.T.astype(np.int32), "keypoints": kp.astype(np.int64)}
    d.update(override)
    path.write_bytes(pickle.dumps({k: v for k, v in d.items() if v is not None}, protocol=4))
    return path


def test_3ddfa(base, tmp_path):
    p = write_3ddfa(tmp_path / "bfm_noneck_v3.pkl", base)
    m = load_3ddfa_bfm(p)
    np.testing.assert_allclose(m.vertices, base.vertices, atol=1e-3)
    assert np.array_equal(m.landmarks, base.landmarks)
    np.testing.assert_allclose(m.exp_basis, base.exp_basis, atol=1e-5)
    assert load_model_file(p).name == "3ddfa-bfm-noneck"


# ------------------------------------------------------------------------------ bad input
def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    return p


@pytest.mark.parametrize("fmt", ["bfm2009", "bfm2017", "deep3d", "flame", "3ddfa"])
@pytest.mark.parametrize("breakage", ["truncated", "missing", "shape", "nan"])
def test_malformed_files_raise_model_format_error(base, tmp_path, fmt, breakage):
    key = {"bfm2009": "shapePC", "bfm2017": "shape/model/pcaBasis", "deep3d": "idBase",
           "flame": "shapedirs", "3ddfa": "w_shp"}[fmt]
    bad = {"missing": None, "shape": np.ones((7, 2), np.float32)}
    if fmt == "bfm2017":
        p = tmp_path / "m.h5"
        if breakage == "missing":
            write_bfm2017(p, base, drop=key)
        elif breakage == "nan":
            write_bfm2017(p, base, nan=key)
        elif breakage == "shape":
            write_bfm2017(p, base)
            with h5py.File(p, "a") as f:
                del f[key]
                f[key] = bad["shape"]
        else:
            _truncate(write_bfm2017(p, base))
        load = lambda: load_bfm2017(p, landmarks=base.landmarks)
    else:
        writer, loader, name = {
            "bfm2009": (write_bfm2009, lambda q: load_bfm2009(q, landmarks=base.landmarks), "a.mat"),
            "deep3d": (write_deep3d, load_deep3d_bfm_front, "b.mat"),
            "flame": (lambda q, m, **kw: write_flame(q, m, chumpy=False, **kw),
                      lambda q: load_flame(q, landmarks=base.landmarks, n_shape=K, n_exp=E), "c.pkl"),
            "3ddfa": (write_3ddfa, load_3ddfa_bfm, "d.pkl"),
        }[fmt]
        p = tmp_path / name
        if breakage == "truncated":
            _truncate(writer(p, base))
        elif breakage == "nan":
            good = writer(tmp_path / ("ok" + name), base)
            del good
            arr = {"bfm2009": _cols(base.id_basis) * 1e3, "deep3d": _cols(base.id_basis) / 100,
                   "flame": np.concatenate([base.id_basis, base.exp_basis]).transpose(1, 2, 0),
                   "3ddfa": _cols(base.id_basis) * 1e3}[fmt].astype(np.float64).copy()
            arr.reshape(-1)[5] = np.nan
            writer(p, base, **{key: arr})
        else:
            writer(p, base, **{key: bad[breakage]})
        load = lambda: loader(p)
    with pytest.raises(ModelFormatError) as info:
        load()
    e = info.value
    assert e.path == str(p)
    if breakage != "truncated":
        assert e.field == key, str(e)


# ------------------------------------------------------------------------- malicious pickle
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"v_template": _Payload(marker), "f": np.zeros((1, 3))}
    p = tmp_path / "generic_model.pkl"
    p.write_bytes(pickle.dumps(evil, protocol=2))
    # the payload is real: plain pickle would run it
    assert b"system" in p.read_bytes()
    for loader in (load_model_file, load_flame, load_3ddfa_bfm):
        with pytest.raises(ModelFormatError, match="refused") as info:
            loader(p)
        assert info.value.path == str(p)
    assert not marker.exists()
    for payload in (
        pickle.dumps(_Payload(marker)),
        b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.",
        b"csubprocess\nPopen\n((Vtouch\nV" + str(marker).encode() + b"\nltR.",
    ):
        with pytest.raises(RefusedPickleError):
            safe_loads(payload)
    assert not marker.exists()
    # copyreg._reconstructor may only build the inert stand-ins
    sneaky = b"ccopy_reg\n_reconstructor\n(cos\n_wrap_close\nc__builtin__\nobject\nNtR."
    with pytest.raises(RefusedPickleError):
        safe_loads(sneaky)
