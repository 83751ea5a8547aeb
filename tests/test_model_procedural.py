"""The procedural fixture model: exact symmetry, valid record, plausible landmark layout."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.model import MorphableModel
from facecorpus.meshops.procedural import MULTIPIE_MIRROR, procedural_model


@pytest.fixture(scope="module")
def model():
    return procedural_model()


def test_sizes_and_validation(model):
    assert 2000 <= model.n_vertices <= 5000
    assert model.n_id == 10 and model.n_exp == 5 and len(model.exp_names) == 5
    assert model.landmarks.shape == (68,)
    assert len(np.unique(model.landmarks)) == 68
    assert set(model.regions) >= {"face", "narrow"}
    assert model.has_albedo and model.albedo_mean.min() >= 0 and model.albedo_mean.max() <= 1
    model.validate()
    small = procedural_model(n=31, n_id=3, n_exp=8, seed=3)
    assert small.n_vertices == 31 * 31 and small.n_exp == 8 and small.n_id == 3


def test_exact_mirror_symmetry(model):
    v = model.vertices
    sym = model.symmetry
    assert np.array_equal(sym[sym], np.arange(model.n_vertices))
    assert np.array_equal(v[sym] * np.array([-1, 1, 1], np.float32), v)
    # mirror of a triangle is a triangle (reversed orientation)
    tris = {tuple(sorted(t)) for t in model.triangles.tolist()}
    mirrored = {tuple(sorted(t)) for t in sym[model.triangles].tolist()}
    assert tris == mirrored
    # landmarks and contours are mirror-consistent
    assert np.array_equal(sym[model.landmarks], model.landmarks[MULTIPIE_MIRROR])
    assert np.array_equal(sym[model.contour_right], model.contour_left)
    assert (v[model.contour_right, 0] < 0).all()


def test_orientation_outward_and_ccw(model):
    v = model.vertices.astype(np.float64)
    t = model.triangles
    fn = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    centre = v[t].mean(1)
    # outward = away from the cap's centre of curvature, i.e. +z near the front
    front = np.abs(centre[:, 0]) < 20
    assert (fn[front, 2] > 0).mean() > 0.95
    assert np.all(np.linalg.norm(fn, axis=1) > 0)  # no degenerate triangles


def test_landmark_layout_is_face_like(model):
    p = model.vertices[model.landmarks]
    eyes = p[36:48, 1].mean()
    nose_tip = p[30]
    mouth = p[48:68, 1].mean()
    chin = p[8, 1]
    assert chin < mouth < nose_tip[1] < eyes < p[17:27, 1].mean()
    assert nose_tip[2] == pytest.approx(p[:, 2].max())  # the nose tip is the most forward
    assert p[36, 0] < p[39, 0] < 0 < p[42, 0] < p[45, 0]  # subject's right eye at -x
    assert p[0, 0] < p[8, 0] < p[16, 0]


def test_uv_seam_and_range(model):
    assert model.uv.min() >= 0 and model.uv.max() <= 1
    # every vertex used with more than one UV index is a seam vertex on the centre line
    pairs = np.unique(np.c_[model.triangles.reshape(-1), model.uv_triangles.reshape(-1)], axis=0)
    verts, counts = np.unique(pairs[:, 0], return_counts=True)
    seam = verts[counts > 1]
    assert len(seam) > 0
    assert np.all(model.vertices[seam, 0] == 0)


def test_modes_change_shape_and_roundtrip(model, tmp_path):
    a = np.zeros(model.n_id)
    a[0] = model.id_std[0]
    d = model.shape(alpha=a) - model.vertices
    assert np.abs(d).max() == pytest.approx(model.id_std[0], rel=1e-5)
    jaw = model.exp_names.index("jawOpen")
    b = np.zeros(model.n_exp)
    b[jaw] = 1.0
    moved = np.linalg.norm(model.shape(beta=b) - model.vertices, axis=1)
    assert moved[model.landmarks[8]] > 5 and moved[model.landmarks[27]] < 0.5
    path = model.save(tmp_path / "p.npz")
    back = MorphableModel.load(path)
    assert back.content_hash() == model.content_hash()
    assert back.exp_names == model.exp_names
    assert np.array_equal(back.regions["narrow"], model.regions["narrow"])
