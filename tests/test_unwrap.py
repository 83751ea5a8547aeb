"""Unwrapping with the true parameters reproduces the known texture; masks behave."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.tasks.fit import synthetic_batch
from facecorpus.tasks.masks import erode, face_mask, polygon_mask, segmentation_mask
from facecorpus.tasks.unwrap import psnr, reject_occlusions, unwrap_batch

AMBIENT = np.zeros(27, np.float32)
AMBIENT[0::9] = 2 / np.sqrt(np.pi)  # SH band 0 only: irradiance exactly 1


@pytest.mark.parametrize("camera", ["orthographic", "perspective"])
def test_unwrap_true_parameters_reproduces_texture(model, camera):
    sb = synthetic_batch(model, 3, 256, seed=2, camera=camera, sh=AMBIENT, yaw_max=60)
    masks = np.stack([erode(m, 1) for m in sb.mask])  # render edges mix in background
    u = unwrap_batch(sb.image, model, sb.truth, 256, masks)
    assert u.uv_visible.shape == (3, 256, 256, 3) and u.uv_sampling_map.shape == (3, 256, 256, 2)
    for i in range(3):
        vm = u.uv_visible_mask[i]
        assert vm.mean() > 0.3
        assert psnr(u.uv_visible[i], sb.uv_texture, vm) >= 35.0
        assert (u.uv_visible[i][~vm] == 0).all()
        assert (u.uv_view_weight[i][vm] >= 0.15).all()
    # turned heads see less of the far side: yaw -60 turns the nose to image left and hides
    # the subject's right cheek (u < 0.5 in the procedural layout)
    right = np.zeros((256, 256), bool)
    right[:, :128] = True
    assert u.uv_visible_mask[0][right].mean() < 0.6 * u.uv_visible_mask[1][right].mean()
    # the sampling map points at the pixel whose colour was sampled
    i = 1
    vm = u.uv_visible_mask[i]
    xy = (u.uv_sampling_map[i][vm] + 1) * 128  # -> pixels
    px = sb.image[i][np.floor(xy[:, 1]).astype(int), np.floor(xy[:, 0]).astype(int)]
    assert np.abs(px - u.uv_visible[i][vm]).mean() < 0.02


def test_occluder_is_rejected(model):
    sb = synthetic_batch(model, 1, 128, seed=4, sh=AMBIENT, yaw_max=0)
    img = sb.image.copy()
    img[0, 50:70, 50:80] = [0.05, 0.9, 0.05]  # a green "hand"
    u = unwrap_batch(img, model, sb.truth, 128, sb.mask)
    xy = (u.uv_sampling_map + 1) * 64

    def inside(lo_x, hi_x, lo_y, hi_y):
        return u.uv_visible_mask & (xy[..., 0] >= lo_x) & (xy[..., 0] < hi_x) & (
            xy[..., 1] >= lo_y) & (xy[..., 1] < hi_y)

    hit = inside(51, 79, 51, 69)  # bilinear samples entirely on the occluder
    near = inside(49, 81, 49, 71)
    assert hit.sum() > 20
    from skimage.transform import resize

    expected = resize(sb.uv_texture, (128, 128), order=1, anti_aliasing=True)[None]
    keep = reject_occlusions(u.uv_visible, u.uv_visible_mask, expected, threshold=0.2)
    assert not (keep & hit).any()
    assert keep[u.uv_visible_mask & ~near].mean() > 0.97


def test_masks(model):
    sb = synthetic_batch(model, 1, 128, seed=1, yaw_max=0)
    v, cam = sb.truth.vertices(model, 0), sb.truth.camera_for(0)
    seg = segmentation_mask(model, v, cam)
    fm = face_mask(model, v, cam, erode_px=0)
    assert seg.shape == (128, 128) and fm.any()
    assert (fm & ~seg).sum() <= 0.01 * fm.sum()  # hull of the boundary encloses the face
    oval = sb.landmarks[0, :17]  # the jaw only: a U-shaped region
    fo = face_mask(model, v, cam, oval=oval, erode_px=2)
    assert fo.sum() < fm.sum() and not (fo & ~fm).any()
    given = np.zeros((128, 128), bool)
    given[:, :64] = True  # a user mask: only the image-left half is usable face
    fg = face_mask(model, v, cam, given=given, erode_px=0)
    assert fg.any() and not fg[:, 64:].any() and (fg == (fm & given)).all()
    square = np.array([[10, 10], [30, 10], [30, 20], [10, 20]], np.float64)
    pm = polygon_mask(square, (40, 40))
    assert pm.sum() == 200 and pm[10, 10] and not pm[20, 10]


def test_polygon_mask_draws_the_pixels_skimage_draws():
    """polygon_mask replaced skimage.draw.polygon for speed (#12); the dataset's masks must
    not move: the same pixels on random polygons, integer and pixel-centre vertices (points
    on vertices and edges), float32 ovals, polygons reaching past the image."""
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    for k in range(1500):
        K, shape = int(rng.integers(3, 40)), (int(rng.integers(5, 80)), int(rng.integers(5, 80)))
        if k % 4 == 0:
            poly = rng.uniform(-10, 90, (K, 2))
        elif k % 4 == 1:
            poly = rng.integers(-5, 85, (K, 2)).astype(np.float64)
        elif k % 4 == 2:
            poly = rng.integers(-5, 85, (K, 2)) + 0.5
        else:
            t = np.sort(rng.uniform(0, 2 * np.pi, K))
            poly = np.stack([40 + 30 * np.cos(t), 40 + 25 * np.sin(t)], 1).astype(np.float32)
        want = np.zeros(shape, bool)
        rr, cc = polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=shape)
        want[rr, cc] = True
        assert np.array_equal(polygon_mask(poly, shape), want), (k, poly.tolist(), shape)
    for poly in (np.array([[3.5, 4.5]]), np.array([[3.5, 4.5], [9.5, 4.5]])):  # dots, lines
        want = np.zeros((12, 12), bool)
        rr, cc = polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=(12, 12))
        want[rr, cc] = True
        assert np.array_equal(polygon_mask(poly, (12, 12)), want)
    odd = [[[1.0, np.nan], [5, 5], [9, 1]], [[np.nan, 1.0], [5, 5], [9, 1]],
           [[1.0, np.inf], [5, 5], [9, 1]], [[1.0, -np.inf], [5, 5], [9, 1]],
           [[-np.inf, 2], [5, 5], [9, 1]], [[1e30, 2], [5, 5], [9, 1]]]
    for poly in map(np.array, odd):  # what skimage's C casts make of them
        want = np.zeros((12, 12), bool)
        rr, cc = polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=(12, 12))
        want[rr, cc] = True
        assert np.array_equal(polygon_mask(poly, (12, 12)), want), poly.tolist()
    empty = np.zeros((0, 2), np.float32)  # a degenerate oval: the sample is rejected
    with pytest.raises(ValueError):
        polygon(empty[:, 1], empty[:, 0], shape=(12, 12))
    with pytest.raises(ValueError):
        polygon_mask(empty, (12, 12))


def test_boundary_vertices_of_a_grid_and_a_holed_grid():
    from facecorpus.tasks.masks import boundary_vertices

    n = 5  # n x n vertex grid, two triangles per cell
    idx = np.arange(n * n).reshape(n, n)
    cells = [(idx[r, c], idx[r, c + 1], idx[r + 1, c], idx[r + 1, c + 1])
             for r in range(n - 1) for c in range(n - 1)]
    tris = np.array([t for a, b, c, d in cells for t in ((a, b, c), (b, d, c))], np.int32)
    outer = np.unique(np.r_[idx[0], idx[-1], idx[:, 0], idx[:, -1]])
    got = boundary_vertices(tris)
    assert got.dtype == tris.dtype
    np.testing.assert_array_equal(got, outer)
    # remove the centre cell: its four corners join the boundary
    centre = (n - 1) // 2 * (n - 1) + (n - 1) // 2
    holed = np.delete(tris, [2 * centre, 2 * centre + 1], axis=0)
    a, b, c, d = cells[centre]
    np.testing.assert_array_equal(boundary_vertices(holed), np.union1d(outer, [a, b, c, d]))
