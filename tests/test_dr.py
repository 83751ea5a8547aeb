"""DR features: exact round trip, rigid invariants, interpolation semantics, the published
weight sampler, determinism and mesh validity checks."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from facecorpus.meshops import dr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.transform import Rotation


@pytest.fixture(scope="module")
def cap():
    """An open spherical cap (a boundary, curved) plus an isolated vertex, ~560 vertices."""
    m = trimesh.creation.icosphere(3)
    v, f = m.vertices.copy(), m.faces
    f = f[v[f].mean(1)[:, 2] < 0.5]
    used = np.unique(f)
    remap = -np.ones(len(v), np.int64)
    remap[used] = np.arange(used.size)
    v = np.vstack([v[used], [[0.0, 0.0, 2.0]]])  # + one vertex in no triangle
    return v, remap[f].astype(np.int32)


@pytest.fixture(scope="module")
def topo(cap):
    return dr.DRTopology(*cap)


def smooth_deform(v, a=0.25, phase=0.0):
    x, y, z = v.T
    return np.c_[x * (1 + a * z), y + a * np.sin(2 * x + phase), z + a * x * y]


def rel_err(q, p):
    return np.abs(q - p).max() / np.ptp(p, axis=0).max()


def test_reference_has_zero_features(topo, cap):
    F = dr.encode(topo, cap[0])
    assert F.shape == (len(cap[0]), 9)
    assert np.abs(F).max() < 1e-12
    assert topo.n_components == 2 and topo.isolated.sum() == 1


@pytest.mark.parametrize("a", [0.05, 0.25, 0.6])
def test_round_trip_exact(topo, cap, a):
    p = smooth_deform(cap[0], a)
    F, corr = dr.encode(topo, p, return_correction=True)
    q = dr.decode(topo, F, anchor_position=p[topo.anchors])
    assert rel_err(q, p) < 1e-6
    assert 0 < corr < 0.5  # the exactness correction is a small part of the deformation


def test_plain_least_squares_is_not_exact(topo, cap):
    # why encode() corrects the per-vertex fits: without it the decode is only approximate
    p = smooth_deform(cap[0], 0.25)
    T = topo._lsq_gradients(p[None])
    q = dr.decode(topo, dr._polar_features(T)[0], anchor_position=p[topo.anchors])
    assert rel_err(q, p) > 1e-4


def test_round_trip_batched_equals_single(topo, cap):
    P = np.stack([smooth_deform(cap[0], a, ph) for a, ph in ((0.1, 0), (0.3, 1), (0.5, 2))])
    F = dr.encode(topo, P)
    assert F.shape == (3, len(cap[0]), 9)
    np.testing.assert_allclose(F[1], dr.encode(topo, P[1]), atol=1e-12)
    Q = dr.decode(topo, F, anchor_position=P[:, topo.anchors])
    assert max(rel_err(Q[k], P[k]) for k in range(3)) < 1e-6


def test_rigid_motion_and_scale(topo, cap):
    rv = np.array([0.3, -0.2, 0.5])
    p = 1.7 * cap[0] @ Rotation.from_rotvec(rv).as_matrix().T + [10.0, -2.0, 3.0]
    F, corr = dr.encode(topo, p, return_correction=True)
    live = ~topo.isolated
    np.testing.assert_allclose(F[live, :3], np.broadcast_to(rv, (live.sum(), 3)), atol=1e-9)
    np.testing.assert_allclose(F[live, 3:], np.broadcast_to([0.7, 0, 0, 0.7, 0, 0.7],
                                                            (live.sum(), 6)), atol=1e-9)
    assert corr < 1e-9
    # without anchor positions the decode keeps the anchors at the reference
    q = dr.decode(topo, F)
    assert np.allclose(q[topo.anchors], cap[0][topo.anchors])


def test_mirrored_mesh_round_trips(topo, cap):
    # a mirror image flips every triangle; the oriented normal edge turns the in-plane
    # reflection into a proper rotation by pi, and the round trip stays exact
    p = cap[0] * [-1.0, 1.0, 1.0]
    F = dr.encode(topo, p)
    assert np.all(np.linalg.norm(F[:, :3], axis=1) <= np.pi + 1e-9)
    q = dr.decode(topo, F, anchor_position=p[topo.anchors])
    assert rel_err(q, p) < 1e-6


def test_interpolating_identical_subjects(topo, cap):
    p = smooth_deform(cap[0], 0.3)
    D = dr.encode(topo, p)
    rng = np.random.default_rng(3)
    a = dr.sample_weights(rng, 5)
    while abs(a.sum() - 1) < 0.2:  # a draw whose weights clearly do not sum to 1
        a = dr.sample_weights(rng, 5)
    stack = np.stack([D] * 5)
    # normalised weights: exactly that subject
    q = dr.decode(topo, dr.interpolate(stack, a, normalize=True), anchor_position=p[topo.anchors])
    assert rel_err(q, p) < 1e-6
    # published (unnormalised) weights scale the deviation from the reference by sum(a)
    s = a.sum()
    np.testing.assert_allclose(dr.interpolate(stack, a), s * D, atol=1e-12)
    q2 = dr.decode(topo, dr.interpolate(stack, a), anchor_position=p[topo.anchors])
    assert rel_err(q2, p) > 1e-3


def test_interpolation_of_different_subjects_is_a_valid_mesh(topo, cap):
    subjects = np.stack([smooth_deform(cap[0], 0.1 * k, k) for k in range(1, 6)])
    D = dr.encode(topo, subjects)
    a = dr.sample_weights(np.random.default_rng(0), 5)
    q = dr.decode(topo, dr.interpolate(D, a))
    ok, reason = dr.check_mesh(q, cap[1], cap[0])
    assert ok, reason


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 8))
def test_weights_follow_published_ranges(seed, m):
    a = dr.sample_weights(np.random.default_rng(seed), m)
    assert a.shape == (m,) and np.all(a >= 0)
    r, theta = dr.weights_to_polar(a)
    assert 0.6 <= r <= 1.3
    assert np.all((theta >= 0) & (theta <= np.pi / 2 + 1e-12))
    # and the map is the hyperspherical one: rebuilding from (r, theta) gives a back
    b = np.empty(m)
    s = r
    for i in range(m - 1):
        b[i], s = s * np.cos(theta[i]), s * np.sin(theta[i])
    b[-1] = s
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_weights_distribution():
    rng = np.random.default_rng(12345)
    polar = [dr.weights_to_polar(dr.sample_weights(rng, 5)) for _ in range(3000)]
    r = np.array([p[0] for p in polar])
    th = np.stack([p[1] for p in polar])
    assert stats.kstest(r, stats.uniform(0.6, 0.7).cdf).pvalue > 1e-3
    for k in range(4):
        assert stats.kstest(th[:, k], stats.uniform(0, np.pi / 2).cdf).pvalue > 1e-3


def test_determinism(topo, cap):
    w1 = [dr.sample_weights(np.random.default_rng(7), 5) for _ in range(2)]
    assert np.array_equal(w1[0], w1[1])
    p = smooth_deform(cap[0], 0.2)
    assert np.array_equal(dr.encode(topo, p), dr.encode(topo, p))
    t2 = dr.DRTopology(*cap)
    F = dr.encode(t2, p)
    assert np.array_equal(F, dr.encode(topo, p))
    assert np.array_equal(dr.decode(topo, F), dr.decode(t2, F))


def test_check_mesh(cap):
    v, f = cap
    assert dr.check_mesh(v, f, v) == (True, "")
    bad = v.copy()
    bad[3, 1] = np.nan
    ok, reason = dr.check_mesh(bad, f, v)
    assert not ok and "non-finite" in reason
    flipped = v * [1.0, 1.0, -1.0]  # mirroring flips every triangle
    ok, reason = dr.check_mesh(flipped, f, v)
    assert not ok and "flipped" in reason
    one = v.copy()
    tri = f[0]
    one[tri[0]] = 2 * v[tri[1:]].mean(0) - v[tri[0]]  # fold one vertex through
    ok, _ = dr.check_mesh(one, f, v, max_flip_ratio=0.5)
    assert ok


def test_check_mesh_self_intersection():
    pytest.importorskip("pymeshlab")
    g = trimesh.creation.box().subdivide().subdivide()
    v, f = g.vertices.copy(), g.faces
    assert dr.check_mesh(v, f, self_intersection=True).ok
    v2 = v.copy()
    top = v2[:, 2] > 0.49
    v2[top] = v2[top] * [1.5, 1.5, 0.2]  # drop a widened lid to z = 0.1: it cuts the walls
    ok, reason = dr.check_mesh(v2, f, self_intersection=True)
    assert not ok and "self-intersecting" in reason


def test_bad_inputs(topo, cap):
    with pytest.raises(ValueError, match="vertices"):
        dr.encode(topo, cap[0][:-1])
    with pytest.raises(ValueError, match="NaN"):
        dr.encode(topo, np.full_like(cap[0], np.nan))
    with pytest.raises(ValueError, match="features"):
        dr.decode(topo, np.zeros((len(cap[0]), 8)))
    with pytest.raises(ValueError, match="anchor_position"):
        dr.decode(topo, np.zeros((len(cap[0]), 9)), anchor_position=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="triangles"):
        dr.DRTopology(cap[0], cap[1] + 10_000)
    with pytest.raises(ValueError, match="weights"):
        dr.interpolate(np.zeros((3, 4, 9)), np.ones(2))


@pytest.mark.slow
def test_round_trip_on_ict_face(ict_archive):
    from facecorpus.meshops import ict

    m = ict.build_ict_facekit(ict_archive, "face", cache=True)
    topo = dr.DRTopology(m.vertices, m.triangles)
    rng = np.random.default_rng(0)
    P = np.stack([m.shape(rng.standard_normal(m.n_id) * m.id_std,
                          rng.uniform(0, 1, m.n_exp) * (rng.random(m.n_exp) < 0.2))
                  for _ in range(2)]).astype(np.float64)
    F = dr.encode(topo, P)
    Q = dr.decode(topo, F, anchor_position=P[:, topo.anchors])
    assert max(rel_err(Q[k], P[k]) for k in range(2)) < 1e-6
    assert all(dr.check_mesh(Q[k], m.triangles, m.vertices).ok for k in range(2))


def test_topology_pickles_for_workers(topo, cap):
    import pickle

    p = smooth_deform(cap[0], 0.2)
    F = dr.encode(topo, p)  # builds the encode factorisation
    t2 = pickle.loads(pickle.dumps(topo))
    assert t2._Kcache is None  # shipped without it
    assert np.array_equal(dr.decode(t2, F), dr.decode(topo, F))
    assert np.array_equal(dr.encode(t2, p), F)  # rebuilt on first use, same result
