"""ICT-FaceKit builder: the real archive (shared assets) and a synthetic FaceXModel folder
that exercises every source kind (folder, tar.gz, zip, file://, local http) and bad input."""

from __future__ import annotations

import functools
import http.server
import json
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from facecorpus.core.errors import AssetUnavailableError
from facecorpus.meshops import ict
from facecorpus.meshops.assets import sha256_file
from facecorpus.meshops.model import ModelFormatError
from facecorpus.meshops.procedural import MULTIPIE_MIRROR
from facecorpus.meshops.uv import rasterize_uv, uv_coverage, uv_mirror_coverage, uv_mirror_map

# --------------------------------------------------------------------------- real archive


@pytest.fixture(scope="session")
def ict_built(ict_archive):
    """All three regions built once per session from the archive (and cached for others)."""
    t0 = time.perf_counter()
    models = ict.build_ict_regions(ict_archive, ("face", "narrow", "head"), cache=True)
    return models, time.perf_counter() - t0


@pytest.fixture(scope="session")
def ict_objs(ict_archive):
    names = ["identity000", "identity057", "identity099", "jawOpen", "eyeBlink_L"]
    return ict.read_ict_obj_vertices(ict_archive, names)


@pytest.mark.assets
@pytest.mark.slow
def test_ict_build_counts_and_time(ict_built, ict_archive):
    models, seconds = ict_built
    print(f"ICT-FaceKit face+narrow+head built in {seconds:.1f} s")
    assert seconds < 60.0
    m = models["face"]
    assert m.n_vertices == 9409 and m.n_id == 100 and m.n_exp == 53
    assert m.landmarks.shape == (68,) and m.triangles.shape == (9230 * 2, 3)
    assert m.exp_names[:3] == ("browDown_L", "browDown_R", "browInnerUp_L")
    assert "jawOpen" in m.exp_names and "PupilDilate_L" not in m.exp_names
    assert models["narrow"].n_vertices == 6706 and models["head"].n_vertices == 11248
    assert np.array_equal(m.landmarks, ict.LANDMARKS_68)
    # the cache file now exists and loads to the same model
    cached = ict.build_ict_facekit(ict_archive, "face")
    assert cached.content_hash() == m.content_hash()


@pytest.mark.assets
def test_one_hot_modes_reproduce_the_objs(ict_built, ict_objs):
    models, _ = ict_built
    for region, m in models.items():
        nv = m.n_vertices
        for name, obj in ict_objs.items():
            target = obj[:nv] * 10.0  # cm -> mm
            if name.startswith("identity"):
                a = np.zeros(m.n_id)
                a[int(name[8:])] = 1.0
                got = m.shape(alpha=a)
            else:
                b = np.zeros(m.n_exp)
                b[m.exp_names.index(name)] = 1.0
                got = m.shape(beta=b)
            err = np.abs(got.astype(np.float64) - target).max()
            assert err < 1e-5, (region, name, err)
    assert np.array_equal(models["face"].id_std, np.ones(100, np.float32))


@pytest.mark.assets
def test_ict_geometry_facts(ict_built, ict_archive):
    m = ict_built[0]["face"]
    v = m.vertices
    assert 170 < np.ptp(v[:, 0]) < 200  # ~18 cm wide face area, so mm
    # UVs: tile 0, 138 seam vertices with two UVs, centred on u = 0.5
    assert m.uv.min() >= 0 and m.uv.max() <= 1
    pairs = np.unique(np.c_[m.triangles.reshape(-1), m.uv_triangles.reshape(-1)], axis=0)
    assert (np.bincount(pairs[:, 0]) > 1).sum() == 138
    assert abs(0.5 * (m.uv[:, 0].min() + m.uv[:, 0].max()) - 0.5) < 1e-3
    # winding: consistent (every interior edge used once in each direction) and outward
    # (the vector area of the face mask points to +z, towards the camera)
    t = m.triangles
    edges = np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]])
    directed = {tuple(e) for e in edges.tolist()}
    assert len(directed) == len(edges)  # no directed edge twice: orientation is consistent
    fn = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]]).astype(np.float64)
    area_vec = fn.sum(0)
    assert area_vec[2] > 0.9 * np.linalg.norm(area_vec)
    # landmarks at plausible places: +x = subject's left
    p = v[m.landmarks]
    assert p[36, 0] < 0 < p[45, 0] and p[0, 0] < 0 < p[16, 0]
    assert p[8, 1] < p[57, 1] < p[51, 1] < p[33, 1] < p[30, 1] < p[27, 1]
    assert p[30, 2] == pytest.approx(p[:, 2].max())
    # mirrored landmark positions agree to within a couple of mm
    mirrored = p[MULTIPIE_MIRROR] * np.array([-1, 1, 1])
    assert np.abs(mirrored - p).max() < 3.0
    # contours: top to bottom, on their own side, README jawline inside the extended sets
    for c, sign in ((m.contour_right, -1), (m.contour_left, 1)):
        assert len(c) == 17 and np.all(np.diff(v[c, 1]) < 0) and np.all(sign * v[c, 0] > 0)
    assert set(ict.JAW_RIGHT) <= set(m.contour_right.tolist())
    assert set(ict.JAW_LEFT) <= set(m.contour_left.tolist())
    assert {"face", "narrow"} <= set(m.regions) and len(m.regions["narrow"]) == 6706
    # provenance: source digest and the MIT notice
    assert m.provenance.sha256 == sha256_file(ict_archive)
    assert "Permission is hereby granted" in m.provenance.license
    assert "USC Institute for Creative Technologies" in m.provenance.license


@pytest.mark.assets
def test_ict_symmetry_and_uv_mirror_coverage(ict_built):
    m = ict_built[0]["face"]
    from facecorpus.meshops.geometry import symmetry_map

    idx, res = symmetry_map(m.vertices)
    assert np.array_equal(idx, m.symmetry)
    print(f"ICT face symmetry residual: max {res.max():.4f} mm, mean {res.mean():.5f} mm")
    assert res.max() < 0.06  # the README-measured 0.005 cm
    assert np.mean(idx[idx] == np.arange(m.n_vertices)) > 0.999
    # mirror-consistent triangulation: the mirror image of every triangle is a triangle
    tris = {tuple(sorted(t)) for t in m.triangles.tolist()}
    assert all(tuple(sorted(t)) in tris for t in m.symmetry[m.triangles].tolist())
    S = 256
    raster = rasterize_uv(m.uv, m.uv_triangles, S)
    mm = uv_mirror_map(m, S)
    cov = uv_mirror_coverage(mm, raster)
    print(f"ICT face UV coverage {uv_coverage(m.uv, m.uv_triangles, S):.4f}; "
          f"UV mirror map covers {cov:.4f} of covered texels at {S}x{S}")
    assert cov > 0.98
    # the layout is nearly mirror-symmetric about u = 0.5: most mirror texels are near the flip
    rows, cols = np.nonzero(mm[..., 0] >= 0)
    near_flip = np.abs(mm[rows, cols, 1] - (S - 1 - cols)) <= 3
    assert near_flip.mean() > 0.8


# ------------------------------------------------------------------ synthetic FaceXModel
G = 97  # 97 x 97 grid = 9409 face-area vertices


def _write_obj(path: Path, v: np.ndarray, vt: np.ndarray | None = None, faces=None,
               header: str = "") -> None:
    lines = [header] if header else []
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
    if vt is not None:
        lines += [f"vt {u:.6f} {w:.6f}" for u, w in vt]
    if faces is not None:
        lines += ["f " + " ".join(f"{a + 1}/{a + 1}" for a in f) for f in faces]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def fake_model_dir(tmp_path_factory) -> Path:
    """A FaceXModel-shaped folder: 26,719 vertices, 9,230 face-area polygons, 3 identities,
    2 expressions; values in cm."""
    root = tmp_path_factory.mktemp("fake") / "FaceXModel"
    root.mkdir()
    rng = np.random.default_rng(0)
    s = np.linspace(-1, 1, G)
    X, Y = np.meshgrid(s, s)
    grid = np.stack([8 * X, 10 * Y, 5 * (1 - X**2) + 5], -1).reshape(-1, 3)
    rest = rng.normal(size=(ict.N_VERTICES - G * G, 3)) * 5
    neutral = np.concatenate([grid, rest])
    vt = np.concatenate([np.stack([(X.reshape(-1) + 1) / 2, (Y.reshape(-1) + 1) / 2], -1),
                         np.full((len(rest), 2), 0.5)])
    quads = [[i * G + j, i * G + j + 1, (i + 1) * G + j + 1, (i + 1) * G + j]
             for i in range(G - 1) for j in range(G - 1)]
    quads += quads[:14]  # 9,230 face-area polygons
    hdr = "# ICT FaceKit\n# Permission is hereby granted, free of charge (test header)"
    _write_obj(root / "generic_neutral_mesh.obj", neutral, vt, quads, hdr)
    for k in range(3):
        _write_obj(root / f"identity{k:03d}.obj", neutral + rng.normal(size=neutral.shape) * 0.3)
    for name in ("jawOpen", "mouthClose"):
        _write_obj(root / f"{name}.obj", neutral + rng.normal(size=neutral.shape) * 0.2)
    (root / "vertex_indices.json").write_text(json.dumps(
        {"expressions": ["jawOpen", "mouthClose"], "idx_to_landmark_verts": list(ict.LANDMARKS_68)}))
    return root


def _reference(folder: Path, name: str) -> np.ndarray:
    return ict.read_ict_obj_vertices(folder, name)[name][: G * G] * 10.0


def test_fake_folder_build_reproduces_objs(fake_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    m = ict.build_ict_facekit(fake_model_dir, "face")
    assert m.n_vertices == 9409 and m.n_id == 3 and m.exp_names == ("jawOpen", "mouthClose")
    assert m.triangles.shape == (9230 * 2, 3)
    for k in range(3):
        a = np.zeros(3)
        a[k] = 1
        err = np.abs(m.shape(alpha=a) - _reference(fake_model_dir, f"identity{k:03d}")).max()
        assert err < 1e-5
    b = np.array([0.0, 1.0])
    assert np.abs(m.shape(beta=b) - _reference(fake_model_dir, "mouthClose")).max() < 1e-5
    assert "test header" in m.provenance.license
    assert (tmp_path / "cache" / "models" / "ict-facekit-face.npz").is_file()


def test_cache_is_reused_and_rebuilt_when_the_source_changes(fake_model_dir, monkeypatch,
                                                             tmp_path):
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    first = ict.build_ict_facekit(fake_model_dir, "face")
    calls = []
    real_parse = ict._parse
    monkeypatch.setattr(ict, "_parse", lambda p: calls.append(p) or real_parse(p))
    again = ict.build_ict_facekit(fake_model_dir, "face")
    assert calls == [] and again.content_hash() == first.content_hash()
    ict.build_ict_facekit(fake_model_dir, "face", force=True)
    assert len(calls) == 1


def _archives(folder: Path, tmp: Path) -> dict[str, Path]:
    out = {}
    decoy = tmp / "decoy.obj"
    decoy.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    out["tgz"] = tmp / "ICT-FaceKit-master.tar.gz"
    with tarfile.open(out["tgz"], "w:gz") as tf:
        tf.add(decoy, "ICT-FaceKit-master/Blender/decoy.obj")  # other OBJs in the repo
        tf.add(folder, "ICT-FaceKit-master/FaceXModel")
    out["zip"] = tmp / "facexmodel.zip"
    with zipfile.ZipFile(out["zip"], "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.write(decoy, "repo/Blender/decoy.obj")
        for p in sorted(folder.iterdir()):
            zf.write(p, f"repo/FaceXModel/{p.name}")
    return out


@pytest.fixture(scope="module")
def fake_archives(fake_model_dir, tmp_path_factory):
    return _archives(fake_model_dir, tmp_path_factory.mktemp("arch"))


def test_archive_and_url_sources_agree(fake_model_dir, fake_archives, tmp_path, monkeypatch):
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    ref = ict.build_ict_facekit(fake_model_dir, "face", cache=False).content_hash()
    for kind, path in fake_archives.items():
        assert ict.build_ict_facekit(path, "face", cache=False).content_hash() == ref, kind
    url = fake_archives["tgz"].as_uri()
    assert ict.build_ict_facekit(url, "face", cache=False).content_hash() == ref

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(fake_archives["tgz"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{fake_archives['tgz'].name}"
        m = ict.build_ict_facekit(url, "face", cache=False)
        assert m.content_hash() == ref and m.provenance.source == url
        assert list((tmp_path / "cache" / "downloads").glob("*ICT-FaceKit-master.tar.gz"))
        with pytest.raises(AssetUnavailableError, match="download failed"):
            ict.build_ict_facekit(url + ".missing", "face", cache=False)
    finally:
        server.shutdown()
        server.server_close()


def test_no_source_reachable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACECORPUS_ASSETS", raising=False)
    monkeypatch.setenv("FACECORPUS_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError, match="no source reachable"):
        ict.build_ict_facekit(None, "face")
    with pytest.raises(AssetUnavailableError, match="no such file"):
        ict.build_ict_facekit(tmp_path / "nowhere.tar.xz", "face")
    with pytest.raises(ValueError, match="region"):
        ict.build_ict_facekit(tmp_path, "ears")


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize("breakage, field", [
    ("truncate", None), ("no_neutral", "generic_neutral_mesh.obj"), ("short", "v"),
    ("nan", "v"), ("no_expression", "mouthClose.obj"), ("bad_json", None),
])
def test_malformed_sources_raise_model_format_error(fake_model_dir, fake_archives, tmp_path,
                                                    breakage, field):
    if breakage == "truncate":
        data = fake_archives["tgz"].read_bytes()
        src = tmp_path / "cut.tar.gz"
        src.write_bytes(data[: len(data) // 2])
    else:
        src = _copy(fake_model_dir, tmp_path / "FaceXModel")
        if breakage == "no_neutral":
            (src / "generic_neutral_mesh.obj").unlink()
        elif breakage == "short":
            lines = (src / "identity001.obj").read_text().splitlines()
            (src / "identity001.obj").write_text("\n".join(lines[:-5]) + "\n")
        elif breakage == "nan":
            lines = (src / "identity002.obj").read_text().splitlines()
            lines[7] = "v nan 0 0"
            (src / "identity002.obj").write_text("\n".join(lines) + "\n")
        elif breakage == "no_expression":
            (src / "mouthClose.obj").unlink()
        elif breakage == "bad_json":
            (src / "vertex_indices.json").write_text("{not json")
    with pytest.raises(ModelFormatError) as info:
        ict.build_ict_facekit(src, "face", cache=False)
    e = info.value
    assert str(src) in str(e)  # the message names the file
    if field is not None:
        assert e.field == field
    if breakage in ("short", "nan"):
        assert "identity00" in e.path
