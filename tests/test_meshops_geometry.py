"""Normals, NCC, symmetry map, export and decimation on meshes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from facecorpus.meshops.geometry import (
    decimate,
    export_mesh,
    face_normals,
    ncc,
    split_seams,
    symmetry_map,
    vertex_normals,
)
from facecorpus.meshops.procedural import procedural_model


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=41, n_id=3, n_exp=3)


def _reference_normals(v, t):
    acc = np.zeros_like(v, dtype=np.float64)
    for tri in t:
        a, b, c = v[tri]
        n = np.cross(b - a, c - a)  # |n| = 2 area: area weighting
        for i in tri:
            acc[i] += n
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


def test_vertex_normals_match_loop_reference_and_batch(model):
    v, t = model.vertices.astype(np.float64), model.triangles
    ref = _reference_normals(v, t)
    got = vertex_normals(v, t)
    assert got.shape == v.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-6)
    batch = np.stack([v, model.shape(alpha=[5.0, -3.0, 2.0]), v * 2.0])
    nb = vertex_normals(batch, t)
    assert nb.shape == batch.shape
    for i in range(3):
        np.testing.assert_allclose(nb[i], vertex_normals(batch[i], t), atol=1e-6)
    np.testing.assert_allclose(nb[2], nb[0], atol=1e-6)  # scale invariant


def test_sphere_normals_are_radial():
    s = trimesh.creation.icosphere(subdivisions=3)
    n = vertex_normals(s.vertices, s.faces)
    radial = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", n, radial).min() > 0.999
    fn = face_normals(s.vertices, s.faces)
    assert np.allclose(np.linalg.norm(fn, axis=1), 1.0, atol=1e-6)


def test_ncc_range(model):
    c = ncc(model.vertices)
    np.testing.assert_allclose(c.min(0), 0.0, atol=1e-7)
    np.testing.assert_allclose(c.max(0), 1.0, atol=1e-6)
    flat = np.c_[np.arange(5.0), np.arange(5.0), np.zeros(5)]
    assert np.all(ncc(flat)[:, 2] == 0.5)


def test_symmetry_map_exact_and_residual(model):
    idx, res = symmetry_map(model.vertices)
    assert np.array_equal(idx, model.symmetry)
    assert res.max() == 0.0
    rng = np.random.default_rng(0)
    noisy = model.vertices + rng.normal(scale=0.01, size=model.vertices.shape).astype(np.float32)
    idx2, res2 = symmetry_map(noisy)
    assert np.mean(idx2 == model.symmetry) > 0.99
    assert 0.005 < res2.max() < 0.2


def test_export_obj_with_seam_uvs_and_ply(model, tmp_path):
    sv, st, suv, src = split_seams(model.vertices, model.triangles, model.uv, model.uv_triangles)
    n_seam = len(sv) - model.n_vertices
    np.testing.assert_array_equal(sv, model.vertices[src])
    np.testing.assert_array_equal(sv[st], model.vertices[model.triangles])
    np.testing.assert_array_equal(suv[st], model.uv[model.uv_triangles])
    assert n_seam == 41  # the centre column carries two UVs
    p = export_mesh(tmp_path / "m.obj", model.vertices, model.triangles, uv=model.uv,
                    uv_triangles=model.uv_triangles)
    m = trimesh.load(p, process=False, maintain_order=True)
    assert len(m.vertices) == len(sv) and len(m.faces) == len(model.triangles)
    # each face corner keeps its 3D position and its own UV
    np.testing.assert_allclose(m.vertices[m.faces], model.vertices[model.triangles], atol=1e-5)
    np.testing.assert_allclose(m.visual.uv[m.faces], model.uv[model.uv_triangles], atol=1e-5)
    q = export_mesh(tmp_path / "m.ply", model.vertices, model.triangles,
                    vertex_colors=model.albedo_mean)
    m2 = trimesh.load(q, process=False)
    np.testing.assert_allclose(m2.vertices, model.vertices, atol=1e-5)
    assert np.abs(m2.visual.vertex_colors[:, :3] / 255.0 - model.albedo_mean).max() < 0.01
    with pytest.raises(ValueError, match="stl"):
        export_mesh(tmp_path / "m.stl", model.vertices, model.triangles)


def test_decimate(model):
    pytest.importorskip("pymeshlab")
    v, t = decimate(model.vertices, model.triangles, 800)
    assert 700 <= len(t) <= 900
    np.testing.assert_allclose(v.min(0), model.vertices.min(0), atol=3.0)
    np.testing.assert_allclose(v.max(0), model.vertices.max(0), atol=3.0)
