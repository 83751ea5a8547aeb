"""UV rasterization (pixel-centre convention, caching) and the UV mirror map."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.geometry import closest_point_on_triangles, closest_points_on_mesh
from facecorpus.meshops.procedural import procedural_model
from facecorpus.meshops.uv import (
    rasterize_uv,
    texel_centres_uv,
    uv_coverage,
    uv_mirror_coverage,
    uv_mirror_map,
    uv_to_texel,
)
from hypothesis import given, settings
from hypothesis import strategies as st

S = 128


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=41, n_id=2, n_exp=2)


def test_texel_convention_single_triangle():
    # lower-left half of the unit square: u + v <= 1 ... covered texels have centre u + v <= 1
    uv = np.array([[0, 0], [1, 0], [0, 1]], np.float32)
    r = rasterize_uv(uv, np.array([[0, 1, 2]]), 8)
    c = texel_centres_uv(8)
    expected = c.sum(-1) <= 1.0 + 1e-9
    assert np.array_equal(r.mask, expected)
    assert r.texel_face[7, 0] == 0 and r.texel_face[0, 7] == -1  # row 7 = bottom (v small)
    # barycentrics interpolate the texel centre's UV exactly
    rec = np.einsum("hwi,ij->hwj", r.texel_bary, uv.astype(np.float64))
    np.testing.assert_allclose(rec[r.mask], c[r.mask], atol=1e-6)


def test_raster_reconstructs_uv_and_covers_islands(model):
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    f = r.texel_face[r.mask]
    b = r.texel_bary[r.mask].astype(np.float64)
    rec = np.einsum("mi,mij->mj", b, model.uv[model.uv_triangles[f]].astype(np.float64))
    np.testing.assert_allclose(rec, texel_centres_uv(S)[r.mask], atol=1e-5)
    assert (b >= -1e-6).all()
    c = texel_centres_uv(S)
    inside = (((c[..., 0] > 0.05) & (c[..., 0] < 0.45)) | ((c[..., 0] > 0.55) & (c[..., 0] < 0.95))
              ) & (c[..., 1] > 0.05) & (c[..., 1] < 0.95)
    assert np.array_equal(r.mask, inside)  # no gaps along shared edges, nothing outside
    assert uv_coverage(model.uv, model.uv_triangles, S) == pytest.approx(0.72, abs=0.02)


def test_raster_cached_and_read_only(model):
    a = rasterize_uv(model.uv, model.uv_triangles, S)
    assert rasterize_uv(model.uv.copy(), model.uv_triangles.copy(), S) is a
    with pytest.raises(ValueError):
        a.texel_face[0, 0] = 3
    assert rasterize_uv(model.uv, model.uv_triangles, S // 2).size == S // 2


def test_uv_mirror_map_is_a_translation_for_the_procedural_layout(model):
    # the procedural layout stores the left half as the right half shifted by +0.5 in u:
    # the mirror map must find that (an image flip would give col -> S - 1 - col)
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    mm = uv_mirror_map(model, S)
    assert mm.shape == (S, S, 2) and mm.dtype == np.int32
    assert (mm[~r.mask] == -1).all()
    cov = uv_mirror_coverage(mm, r)
    assert cov > 0.999
    rows, cols = np.nonzero(r.mask & (mm[..., 0] >= 0))
    expect_col = np.where(cols < S // 2, cols + S // 2, cols - S // 2)
    assert np.mean(mm[rows, cols, 1] == expect_col) > 0.99
    assert np.mean(mm[rows, cols, 0] == rows) > 0.99
    # mirror twice = identity
    back = mm[mm[rows, cols, 0], mm[rows, cols, 1]]
    assert np.mean((back[:, 0] == rows) & (back[:, 1] == cols)) > 0.99


def test_uv_mirror_map_non_symmetric_triangulation(model):
    # flip every quad diagonal on one half: no mirrored triangles exist, mirror still found
    t = model.triangles.copy()
    n = 41
    q = (n - 1) * (n - 1)
    a = t[:q].copy()
    right = (np.arange(q) % (n - 1)) < n // 2
    v00 = a[:, 0]
    v01, v10, v11 = v00 + 1, v00 + n, v00 + n + 1
    t[:q][right] = np.c_[v00, v01, v10][right]
    t[q:][right] = np.c_[v01, v11, v10][right]
    # per-corner UVs as the procedural layout defines them: right-half quads use the
    # seam copy (index n*n + row) of centre-column vertices
    quad_right = np.concatenate([right, right])
    uvt = t.astype(np.int64).copy()
    seam = (t % n == n // 2) & quad_right[:, None]
    uvt[seam] = n * n + t[seam] // n
    uvt = uvt.astype(np.int32)
    from dataclasses import replace
    m2 = replace(model, triangles=t.astype(np.int32), uv_triangles=uvt)
    r = rasterize_uv(m2.uv, m2.uv_triangles, S)
    mm = uv_mirror_map(m2, S)
    rows, cols = np.nonzero(r.mask & (cols_ok := (np.indices((S, S))[1] < S // 2 - 2)))
    assert cols_ok.any()
    assert uv_mirror_coverage(mm, r) > 0.99
    got = mm[rows, cols]
    assert np.mean(np.abs(got[:, 1] - (cols + S // 2)) <= 1) > 0.98


def test_closest_point_on_triangle_regions():
    a, b, c = np.array([[0.0, 0, 0]]), np.array([[1.0, 0, 0]]), np.array([[0.0, 1, 0]])
    cases = {(0.2, 0.2, 5.0): (0.6, 0.2, 0.2), (-1.0, -1.0, 0.0): (1, 0, 0),
             (3.0, -0.5, 0.0): (0, 1, 0), (-0.5, 3.0, 0.0): (0, 0, 1),
             (0.5, -2.0, 0.0): (0.5, 0.5, 0), (-2.0, 0.5, 0.0): (0.5, 0, 0.5),
             (1.0, 1.0, 0.0): (0, 0.5, 0.5)}
    for p, w in cases.items():
        got = closest_point_on_triangles(np.array([p]), a, b, c)[0]
        np.testing.assert_allclose(got, w, atol=1e-12)
    rng = np.random.default_rng(1)
    v = rng.normal(size=(30, 3))
    tri = np.array([[0, 1, 2]] * 1) + 0
    q = rng.normal(size=(200, 3))
    f, bary, d = closest_points_on_mesh(q, v, tri)
    assert (f == 0).all()
    # brute force: dense sampling of the triangle never beats the returned distance
    s = rng.dirichlet([1, 1, 1], size=4000) @ v[:3]
    brute = np.linalg.norm(q[:, None] - s[None], axis=-1).min(1)
    assert (d <= brute + 1e-6).all()
    pts = bary @ v[:3]
    np.testing.assert_allclose(np.linalg.norm(pts - q, axis=1), d, atol=1e-5)


def test_uv_to_texel_matches_centres():
    c = texel_centres_uv(16)
    rc = uv_to_texel(c, 16)
    assert np.array_equal(rc[..., 0], np.indices((16, 16))[0])
    assert np.array_equal(rc[..., 1], np.indices((16, 16))[1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=6, max_size=6),
       st.integers(4, 40))
def test_raster_property_centres_inside_exactly_when_covered(coords, size):
    uv = np.array(coords, np.float64).reshape(3, 2)
    r = rasterize_uv(uv.astype(np.float32), np.array([[0, 1, 2]]), size)
    a, b, c = uv.astype(np.float32).astype(np.float64)
    area = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
    if abs(area) * size * size < 1e-6:
        return  # degenerate in texel units: may or may not be drawn
    p = texel_centres_uv(size)
    # exact inside test in UV space (the kernel works in texel space: allow a tiny band)
    w0 = ((b[0] - p[..., 0]) * (c[1] - p[..., 1]) - (c[0] - p[..., 0]) * (b[1] - p[..., 1])) / area
    w1 = ((c[0] - p[..., 0]) * (a[1] - p[..., 1]) - (a[0] - p[..., 0]) * (c[1] - p[..., 1])) / area
    w2 = 1 - w0 - w1
    m = np.minimum(np.minimum(w0, w1), w2)
    assert not (r.mask & (m < -1e-4)).any()
    assert r.mask[m > 1e-4].all()
    rec = np.einsum("hwi,ij->hwj", r.texel_bary.astype(np.float64), np.stack([a, b, c]))
    np.testing.assert_allclose(rec[r.mask], p[r.mask], atol=1e-4)


def test_uv_mirror_map_cache_returns_the_computed_map(model, tmp_path, monkeypatch):
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path))
    fresh = uv_mirror_map(model, 64, cache=False)
    first = uv_mirror_map(model, 64)  # computes and writes
    files = list((tmp_path / "uv_mirror").glob("*.npz"))
    assert len(files) == 1
    second = uv_mirror_map(model, 64)  # reads
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(second, fresh)
    assert second.dtype == np.int32
    # another size or max_distance is another entry, not the cached one
    assert uv_mirror_map(model, 32).shape == (32, 32, 2)
    near = uv_mirror_map(model, 64, max_distance=1e-9)
    np.testing.assert_array_equal(near, uv_mirror_map(model, 64, max_distance=1e-9,
                                                      cache=False))
    assert len(list((tmp_path / "uv_mirror").glob("*.npz"))) == 3
    # a corrupt entry is recomputed, not trusted
    files[0].write_bytes(b"not an npz")
    np.testing.assert_array_equal(uv_mirror_map(model, 64), fresh)
