"""The numba rasterizer against a brute-force numpy reference, fill rule, holes, depth order."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.renderers.cameras import Camera
from facecorpus.renderers.raster import Fragments, rasterize, rasterize_reference
from scipy import ndimage


def icosphere(level: int = 2, radius: float = 1.0):
    """A closed triangle mesh, counter-clockwise seen from outside."""
    t = (1 + 5 ** 0.5) / 2
    v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                  [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
                 np.float64)
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
         [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
         [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    verts = list(v / np.linalg.norm(v, axis=1, keepdims=True))
    faces = f
    for _ in range(level):
        cache: dict[tuple[int, int], int] = {}

        def mid(a, b, cache=cache):
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        faces = new
    return np.array(verts) * radius, np.array(faces, np.int32)


def edge_distance(sv2d: np.ndarray, tris: np.ndarray, H: int, W: int) -> np.ndarray:
    """(H, W) distance from every pixel centre to the nearest triangle edge segment."""
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    p = np.stack([jj.ravel(), ii.ravel()], -1)
    edges = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
    a, b = sv2d[edges[:, 0]].astype(np.float64), sv2d[edges[:, 1]].astype(np.float64)
    d = b - a
    L = np.maximum((d ** 2).sum(-1), 1e-12)
    best = np.full(len(p), np.inf)
    for k in range(0, len(edges), 256):
        t = np.clip(((p[:, None] - a[None, k:k + 256]) * d[None, k:k + 256]).sum(-1)
                    / L[None, k:k + 256], 0, 1)
        q = a[None, k:k + 256] + t[..., None] * d[None, k:k + 256]
        best = np.minimum(best, np.sqrt(((p[:, None] - q) ** 2).sum(-1)).min(1))
    return best.reshape(H, W)


def soup(seed: int, n_tris: int = 25, size: int = 48):
    """Random overlapping triangles, each at its own constant depth (no interpenetration)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-4, size + 4, (n_tris * 3, 2))
    z = np.repeat(rng.permutation(n_tris) + 1.0, 3)[:, None]
    return np.concatenate([xy, z], 1).astype(np.float32), np.arange(n_tris * 3).reshape(-1, 3)


def assert_agrees(sv, tris, H, W, **kw):
    got = rasterize(sv[None], tris, H, W, **kw)
    ref = rasterize_reference(sv[None], tris, H, W, **kw)
    far = edge_distance(sv[:, :2], tris, H, W) > 0.5
    assert far.sum() > 0.3 * H * W
    np.testing.assert_array_equal(got.pix_to_face[0][far], ref.pix_to_face[0][far])
    hit = far & ref.mask[0]
    np.testing.assert_allclose(got.bary[0][hit], ref.bary[0][hit], atol=5e-3)
    np.testing.assert_allclose(got.zbuf[0][hit], ref.zbuf[0][hit], rtol=1e-3)
    assert np.isinf(got.zbuf[0][~got.mask[0]]).all()
    assert (got.bary[0][~got.mask[0]] == 0).all()
    return got, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_triangle_soup(seed):
    sv, tris = soup(seed)
    for persp in (True, False):
        assert_agrees(sv, tris, 48, 40, perspective_correct=persp)


@pytest.mark.parametrize("cull", [False, True])
def test_matches_reference_on_sphere_perspective(cull):
    v, f = icosphere(2, 60.0)
    cam = Camera.perspective(64, 64, focal=180.0, yaw=20, pitch=-10, translation=(0, 0, -200))
    got, _ = assert_agrees(cam.project(v), f, 64, 64, cull_backfaces=cull)
    # bary are perspective-correct: interpolating 3D camera-space points reproduces the ray
    # through the pixel centre
    X = cam.to_camera_space(v)
    m = got.mask[0]
    P = (got.bary[0][m][:, :, None] * X[f[got.pix_to_face[0][m]]]).sum(1)
    ii, jj = np.nonzero(m)
    np.testing.assert_allclose(32 + 180 * P[:, 0] / -P[:, 2], jj + 0.5, atol=0.02)
    np.testing.assert_allclose(32 - 180 * P[:, 1] / -P[:, 2], ii + 0.5, atol=0.02)
    np.testing.assert_allclose(-P[:, 2], got.zbuf[0][m], rtol=1e-4)


def test_closed_mesh_has_no_holes_and_backfaces_are_hidden():
    v, f = icosphere(3, 50.0)
    for yaw in (0, 33, 71):
        cam = Camera.perspective(96, 96, focal=250.0, yaw=yaw, pitch=12,
                                 translation=(1.3, -0.7, -220))
        sv = cam.project(v)
        a = rasterize(sv[None], f, 96, 96)
        b = rasterize(sv[None], f, 96, 96, cull_backfaces=True)
        assert a.mask.sum() > 1000
        assert (ndimage.binary_fill_holes(a.mask[0]) == a.mask[0]).all()
        # on a convex closed mesh the visible surface is exactly the front faces
        np.testing.assert_array_equal(a.pix_to_face, b.pix_to_face)
        # and the back faces alone cover the same silhouette
        back = rasterize(sv[None], f[:, ::-1], 96, 96, cull_backfaces=True)
        np.testing.assert_array_equal(back.mask, a.mask)


@pytest.mark.parametrize(("n", "step"), [(9, 5.0), (25, 0.75)])
def test_fill_rule_shared_edges_cover_each_pixel_exactly_once(n, step):
    """A jittered grid mesh with vertices snapped onto pixel centres and the 1/256 grid: every
    pixel centre inside it is covered by exactly one triangle (no overlap, no crack). The
    fine grid has mostly sub-pixel triangles (the single-candidate-pixel path)."""
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.arange(n) * step + 4.5, np.arange(n) * step + 4.5)
    xy = np.stack([gx, gy], -1).reshape(-1, 2)
    inner = ((np.arange(n * n) % n > 0) & (np.arange(n * n) % n < n - 1)
             & (np.arange(n * n) // n > 0) & (np.arange(n * n) // n < n - 1))
    # half the interior vertices stay exactly on pixel centres, half are jittered (1/256 grid)
    jitter = np.round(rng.uniform(-0.4, 0.4, xy.shape) * step * 256) / 256
    jitter[rng.random(n * n) < 0.5] = 0
    xy[inner] += jitter[inner]
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            tris += [[a, c, b], [b, c, d]] if (i + j) % 2 else [[a, c, d], [a, d, b]]
    tris = np.array(tris)
    sv = np.concatenate([xy, np.ones((n * n, 1))], 1).astype(np.float32)
    count = np.zeros((48, 48), int)
    for t in tris:  # each triangle alone, so overlaps cannot hide behind the z-test
        count += rasterize(sv[None], t[None], 48, 48, n_bands=1).mask[0]
    jj, ii = np.meshgrid(np.arange(48) + 0.5, np.arange(48) + 0.5)
    lo, hi = 4.5, 4.5 + (n - 1) * step
    strictly_inside = (jj > lo) & (jj < hi) & (ii > lo) & (ii < hi)
    assert count.max() == 1
    assert (count[strictly_inside] == 1).all()
    # top-left rule on the outer boundary: the left and top edges are in, right/bottom out
    assert count[(ii > lo) & (ii < hi) & (jj == lo)].all()
    assert count[(jj > lo) & (jj < hi) & (ii == lo)].all()
    assert not count[jj == hi].any() and not count[ii == hi].any()


def test_nearer_surface_wins_regardless_of_order():
    quad = np.array([[0, 1, 2], [0, 2, 3]])
    sq = np.array([[4, 4], [28, 4], [28, 28], [4, 28]], np.float32)
    near = np.concatenate([sq + 6, np.full((4, 1), 2.0)], 1)
    far = np.concatenate([sq, np.full((4, 1), 5.0)], 1)
    for first, second, near_ids in ((near, far, (0, 1)), (far, near, (2, 3))):
        sv = np.concatenate([first, second]).astype(np.float32)
        tris = np.concatenate([quad, quad + 4])
        fr = rasterize(sv[None], tris, 40, 40)
        ii, jj = np.meshgrid(np.arange(40) + 0.5, np.arange(40) + 0.5, indexing="ij")
        overlap = (jj > 10.5) & (jj < 27.5) & (ii > 10.5) & (ii < 27.5)
        assert np.isin(fr.pix_to_face[0][overlap], near_ids).all()
        np.testing.assert_allclose(fr.zbuf[0][overlap], 2.0)


def test_backface_culling_uses_model_winding():
    # counter-clockwise seen from +z (the camera side): a front face
    tri = np.array([[-20, -20, 0], [20, -20, 0], [0, 20, 0]], np.float64)
    cam = Camera.orthographic(32, 32, scale=0.5)
    sv = cam.project(tri)[None]
    kw = {"perspective_correct": False}
    assert rasterize(sv, [[0, 1, 2]], 32, 32, cull_backfaces=True, **kw).mask.sum() > 50
    assert rasterize(sv, [[0, 2, 1]], 32, 32, cull_backfaces=True, **kw).mask.sum() == 0
    assert rasterize(sv, [[0, 2, 1]], 32, 32, **kw).mask.sum() > 50
    # barycentrics refer to the triangle's own corner order in both windings
    a = rasterize(sv, [[0, 1, 2]], 32, 32, **kw)
    b = rasterize(sv, [[0, 2, 1]], 32, 32, **kw)
    np.testing.assert_allclose(a.bary[..., [0, 2, 1]], b.bary, atol=1e-6)


def test_batch_bands_and_threads_give_identical_results():
    v, f = icosphere(2, 40.0)
    svs = np.stack([Camera.perspective(50, 60, 150.0, yaw=y, translation=(0, 0, -150))
                    .project(v) for y in (-30, 0, 45)])
    one = [rasterize(s[None], f, 60, 50, n_bands=1) for s in svs]
    for bands in (1, 3, 7, 60):
        got = rasterize(svs, f, 60, 50, n_bands=bands)
        for k in range(3):
            np.testing.assert_array_equal(got.pix_to_face[k], one[k].pix_to_face[0])
            np.testing.assert_array_equal(got.bary[k], one[k].bary[0])
            np.testing.assert_array_equal(got.zbuf[k], one[k].zbuf[0])
    sub = got[1:2]
    assert isinstance(sub, Fragments) and sub.shape == (1, 60, 50)


def test_degenerate_offscreen_and_behind_camera_triangles_are_dropped():
    sv = np.array([[[5, 5, 1], [20, 5, 1], [35, 5, 1],  # zero area
                    [-50, -50, 1], [-40, -50, 1], [-45, -40, 1],  # off screen
                    [2, 2, -1], [30, 2, 1], [2, 30, 1],  # behind the camera
                    [np.nan, 2, 1], [30, 2, 1], [2, 30, 1]]], np.float32)
    tris = np.arange(12).reshape(4, 3)
    assert rasterize(sv, tris, 32, 32).mask.sum() == 0
    # without perspective correction the depth sign does not matter
    assert rasterize(sv, tris[2:3], 32, 32, perspective_correct=False).mask.sum() > 100


def test_bad_inputs_raise_clear_errors():
    sv = np.zeros((1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="batch axis"):
        rasterize(sv[0], [[0, 1, 2]], 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        rasterize(sv, [[0, 1, 3]], 8, 8)
    with pytest.raises(ValueError, match="integers"):
        rasterize(sv, np.array([[0.0, 1, 2]]), 8, 8)
    with pytest.raises(ValueError, match="positive"):
        rasterize(sv, [[0, 1, 2]], 0, 8)


def test_one_jitted_signature_per_kernel():
    """Inputs of any float/int dtype, read-only or not, reuse one compiled signature (compile
    time and the numba cache stay small)."""
    from facecorpus.renderers import interpolate as interp_mod
    from facecorpus.renderers import raster as raster_mod

    v, f = icosphere(1, 10.0)
    sv = Camera.orthographic(16, 16, scale=0.6).project(v)[None]
    ro = sv.astype(np.float64)
    ro.flags.writeable = False
    tri_ro = f.astype(np.int64)
    tri_ro.flags.writeable = False
    for s, t in ((sv, f), (ro, tri_ro), (sv.astype(np.float16), f.astype(np.int16))):
        fr = rasterize(s, t, 16, 16, perspective_correct=False)
        interp_mod.interpolate(v.astype(np.float64), fr, t)
    for kernel in (raster_mod._snap, raster_mod._raster_batch, raster_mod.index_range,
                   interp_mod._interp):
        assert len(kernel.signatures) == 1, kernel
