"""interpolate (per-vertex, per-corner, batched) and bilinear texture lookup."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.renderers.interpolate import interpolate, sample_bilinear, texture
from facecorpus.renderers.raster import rasterize


def _grid(n=6, size=40.0, off=3.0):
    g = np.linspace(off, off + size, n)
    gx, gy = np.meshgrid(g, g)
    xy = np.stack([gx, gy], -1).reshape(-1, 2)
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            tris += [[a, c, b], [b, c, d]]
    return xy, np.array(tris, np.int32)


def test_linear_attributes_are_reproduced_exactly():
    xy, tris = _grid()
    sv = np.concatenate([xy, np.ones((len(xy), 1))], 1).astype(np.float32)
    fr = rasterize(np.stack([sv, sv + [1.0, 0, 0]]), tris, 48, 48, perspective_correct=False)
    # an affine function of screen position interpolates to its value at pixel centres
    attr = np.stack([xy[:, 0], xy[:, 1], 2 * xy[:, 0] - xy[:, 1] + 3], -1)
    out = interpolate(attr, fr, tris)
    assert out.shape == (2, 48, 48, 3) and out.dtype == np.float32
    ii, jj = np.nonzero(fr.mask[0])
    np.testing.assert_allclose(out[0, ii, jj, 0], jj + 0.5, atol=2e-3)
    np.testing.assert_allclose(out[0, ii, jj, 1], ii + 0.5, atol=2e-3)
    np.testing.assert_allclose(out[0, ii, jj, 2], 2 * (jj + 0.5) - (ii + 0.5) + 3, atol=5e-3)
    assert (out[~fr.mask] == 0).all()
    # per-image attributes (N, V, C)
    out2 = interpolate(np.stack([attr, attr + 1]), fr, tris)
    np.testing.assert_allclose(out2[0], out[0])
    m = fr.mask[1]
    np.testing.assert_allclose(out2[1][m], out[1][m] + 1, atol=1e-5)
    # per-corner (F, 3, C) equals the per-vertex result when there are no seams
    np.testing.assert_allclose(interpolate(attr[tris], fr), out, atol=1e-5)


def test_per_corner_attributes_keep_seams():
    sv = np.array([[[2, 2, 1], [30, 2, 1], [2, 30, 1], [30, 30, 1]]], np.float32)
    tris = np.array([[0, 2, 1], [1, 2, 3]])
    corner = np.array([[[0.0], [0.0], [0.0]], [[1.0], [1.0], [1.0]]], np.float32)  # flat
    fr = rasterize(sv, tris, 32, 32, perspective_correct=False)
    out = interpolate(corner, fr)[0, ..., 0]
    np.testing.assert_array_equal(out[fr.pix_to_face[0] == 0], 0.0)
    np.testing.assert_allclose(out[fr.pix_to_face[0] == 1], 1.0, atol=1e-6)


def test_interpolate_rejects_ambiguous_shapes():
    fr = rasterize(np.zeros((1, 3, 3), np.float32), [[0, 1, 2]], 4, 4)
    with pytest.raises(ValueError, match="per-corner"):
        interpolate(np.zeros((3, 2)), fr)
    with pytest.raises(ValueError, match="per-vertex"):
        interpolate(np.zeros((5, 3, 2)), fr, [[0, 1, 2]])


def test_bilinear_sampling_conventions():
    rng = np.random.default_rng(0)
    img = rng.random((8, 10, 3)).astype(np.float32)
    # pixel centres return the pixel exactly
    ii, jj = np.meshgrid(np.arange(8), np.arange(10), indexing="ij")
    xy = np.stack([jj + 0.5, ii + 0.5], -1)
    np.testing.assert_allclose(sample_bilinear(img, xy), img, atol=1e-6)
    # halfway between two centres: their mean; beyond the border: the border value
    got = sample_bilinear(img, np.array([[[2.0, 3.5], [-4.0, 0.5]]]))
    np.testing.assert_allclose(got[0, 0], (img[3, 1] + img[3, 2]) / 2, atol=1e-6)
    np.testing.assert_allclose(got[0, 1], img[0, 0], atol=1e-6)
    # masked or non-finite coordinates give 0
    got = sample_bilinear(img, np.array([[[2.0, 3.5], [np.nan, 1.0]]]),
                          mask=np.array([[False, True]]))
    assert (got == 0).all()


def test_texture_follows_uv_image_convention():
    S = 16
    r, c = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    uv_map = np.stack([(c + 0.5) / S, 1 - (r + 0.5) / S], -1).astype(np.float32)  # stores uv
    rng = np.random.default_rng(1)
    uv = rng.uniform(0.5 / S, 1 - 0.5 / S, (2, 5, 7, 2)).astype(np.float32)
    got = texture(uv_map, uv, np.ones((2, 5, 7), bool))
    np.testing.assert_allclose(got, uv, atol=1e-6)  # a linear map is reproduced exactly
    u8 = (uv_map * 255).astype(np.uint8)
    assert texture(np.concatenate([u8, u8[..., :1]], -1), uv).shape == (2, 5, 7, 3)


@pytest.mark.parametrize("persp", [False, True])
def test_rasterize_interpolate_matches_the_two_pass_path(persp):
    from facecorpus.renderers.raster import rasterize_interpolate

    rng = np.random.default_rng(3)
    xy, tris = _grid(n=9, size=30.0, off=2.0)
    xy = xy + rng.uniform(-1.5, 1.5, xy.shape)  # irregular, with overlaps and both windings
    depth = rng.uniform(1.0, 3.0, (len(xy), 1))
    sv = np.concatenate([xy, depth], 1).astype(np.float32)
    sv = np.stack([sv, sv[:, [1, 0, 2]]])  # second view: transposed, so windings flip
    attr = rng.normal(size=(2, len(xy), 4)).astype(np.float32)
    for a in (attr[0], attr):  # shared (V, C) and per-image (N, V, C)
        fr, pix = rasterize_interpolate(sv, tris, 36, 34, a, perspective_correct=persp)
        ref = rasterize(sv, tris, 36, 34, perspective_correct=persp)
        np.testing.assert_array_equal(fr.pix_to_face, ref.pix_to_face)
        np.testing.assert_array_equal(fr.bary, ref.bary)
        np.testing.assert_array_equal(fr.zbuf, ref.zbuf)
        assert pix.shape == (2, 36, 34, 4) and pix.dtype == np.float32
        np.testing.assert_array_equal(pix, interpolate(a, ref, tris))  # bit-identical
        assert fr.mask.any() and (pix[~fr.mask] == 0).all()
    with pytest.raises(ValueError, match="per-vertex attributes"):
        rasterize_interpolate(sv, tris, 8, 8, attr[0, :-1])
