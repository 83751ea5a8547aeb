"""Multi-pose rendering of the synthesis stage: PNCC convention, mirror symmetry, the
crop-in-camera trick, UV maps, backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.geometry import ncc
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers.cameras import euler_to_rotation
from facecorpus.renderers.raster import rasterize
from facecorpus.tasks.backgrounds import BackgroundSource, procedural_background
from facecorpus.tasks.render_views import (
    ViewParams,
    crop_screen_vertices,
    render_screen,
    render_views,
    sample_view_params,
    uv_position_map,
    vertex_irradiance,
)


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=41, n_id=4, n_exp=2, n_albedo=0)


def _flat_sh(n):
    """Ambient-only light plus a frontal (x-symmetric) term."""
    sh = np.zeros((n, 27), np.float32)
    sh[:, 0::9] = 0.8
    sh[:, 2::9] = 0.3
    return sh


def test_pncc_at_vertex_pixel_is_vertex_ncc(model):
    """Shift each view by a sub-pixel offset so that one chosen vertex lands exactly on a pixel
    centre: that pixel's PNCC must be the vertex's NCC (the mean-shape code)."""
    S = 64
    code = ncc(model.vertices)
    R = euler_to_rotation(np.array([0.0, 30.0, -45.0]), 0.0, 0.0)
    screen, _ = crop_screen_vertices(model.vertices, R, S)
    rng = np.random.default_rng(0)
    checked = 0
    for p in range(3):
        # candidate vertices: visible ones near the middle (a vertex on the silhouette may be
        # hidden behind a neighbour)
        frags = rasterize(screen[p:p + 1], model.triangles, S, S)
        cand = [v for v in rng.permutation(model.n_vertices)
                if 8 < screen[p, v, 0] < S - 8 and 8 < screen[p, v, 1] < S - 8][:40]
        shifted = []
        targets = []
        for v in cand:
            x, y = screen[p, v, :2]
            dx, dy = np.floor(x) + 0.5 - x, np.floor(y) + 0.5 - y
            sv = screen[p].copy()
            sv[:, 0] += dx
            sv[:, 1] += dy
            shifted.append(sv)
            targets.append((v, int(np.floor(y)), int(np.floor(x))))
        sv = np.stack(shifted)
        n = len(shifted)
        attrs = np.concatenate([np.ones((n, model.n_vertices, 3), np.float32),
                                np.broadcast_to(code, (n,) + code.shape)], -1)
        out = render_screen(sv, model.triangles, model.uv[model.uv_triangles],
                            np.full((8, 8, 3), 128, np.uint8), attrs, S)
        pncc = out["attributes"][..., 3:6]
        for k, (v, i, j) in enumerate(targets):
            # visible: the pixel's depth is the vertex's depth (else it is occluded)
            if abs(out["depth"][k, i, j] - sv[k, v, 2]) > 1e-3 * sv[k, v, 2]:
                continue
            np.testing.assert_allclose(pncc[k, i, j], code[v], atol=2e-4)
            checked += 1
        assert frags.mask.any()
    assert checked >= 60


def test_symmetric_face_mirrors_across_yaw(model):
    """The procedural mean is exactly x-symmetric; with x-symmetric light and a uniform
    texture, the view at +yaw is the mirror of the view at -yaw (PNCC with x -> 1 - x)."""
    S = 96
    yaws = np.array([-60.0, -20.0, 20.0, 60.0], np.float32)
    z = np.zeros(4, np.float32)
    params = ViewParams(yaws, z, z, _flat_sh(4))
    tex = np.full((16, 16, 3), (200, 150, 120), np.uint8)
    bg = np.full((4, S, S, 3), 40, np.uint8)
    for camera in ("perspective", "orthographic"):
        v = render_views(model.vertices, model.triangles, model.uv[model.uv_triangles], tex,
                         ncc(model.vertices), params, bg, size=S, camera=camera)
        for a, b in ((0, 3), (1, 2)):
            ma, mb = v.mask[a, ..., 0], v.mask[b, :, ::-1, 0]
            # rasterisation ties on the mirrored edges may differ: allow a few pixels
            assert (ma != mb).sum() <= 0.01 * ma.sum()
            both = (ma > 0) & (mb > 0)
            img_diff = np.abs(v.image[a].astype(int) - v.image[b, :, ::-1].astype(int))[both]
            assert np.percentile(img_diff, 99) <= 3
            pa = v.pncc[a].astype(int)
            pb = v.pncc[b, :, ::-1].astype(int)
            pb[..., 0] = 255 - pb[..., 0]
            pncc_diff = np.abs(pa - pb)[both]
            assert np.percentile(pncc_diff, 99) <= 3
            dd = np.abs(v.depth[a, ..., 0] - v.depth[b, :, ::-1, 0])[both]
            assert np.percentile(dd, 99) < 1.0  # mm


def test_crop_maps_bounding_square_to_output(model):
    """The projected mesh's bounding square (plus margin) fills the output exactly."""
    S, margin = 128, 0.05
    R = euler_to_rotation(np.array([-90.0, -40.0, 0.0, 50.0]), np.array([0, 10, -5, 3.0]),
                          np.array([0, 5, 0, -8.0]))
    screen, cam = crop_screen_vertices(model.vertices, R, S, margin=margin)
    lo, hi = screen[..., :2].min(1), screen[..., :2].max(1)
    side = (hi - lo).max(1)
    np.testing.assert_allclose(side, S / (1 + 2 * margin), rtol=1e-5)
    np.testing.assert_allclose((lo + hi) / 2, S / 2, atol=1e-3)
    # and the camera record reproduces the screen vertices through renderers.cameras
    from facecorpus.renderers.cameras import Camera

    v = model.vertices - 0.5 * (model.vertices.min(0) + model.vertices.max(0))
    for p in range(4):
        c = Camera.perspective(S, S, cam[p, 0], rotation=R[p], translation=(0, 0, -cam[p, 3]),
                               cx=cam[p, 1], cy=cam[p, 2])
        np.testing.assert_allclose(c.project(v), screen[p], rtol=1e-4, atol=1e-3)


def test_crop_in_camera_equals_render_crop_resize(model):
    """Rendering at the output size with the crop folded into the camera equals rendering a
    large image, cropping the foreground's bounding square and resizing (up to resampling)."""
    S, big = 64, 512
    R = euler_to_rotation(np.array([35.0]), 5.0, -3.0)
    screen, _ = crop_screen_vertices(model.vertices, R, S, margin=0.0)
    direct = rasterize(screen, model.triangles, S, S).mask[0]
    # the same view at 8x resolution with an arbitrary offset: scale x8 and shift
    sv = screen.copy()
    sv[..., :2] = sv[..., :2] * (big / S * 0.7) + 40.0
    frags = rasterize(sv, model.triangles, big, big)
    m = frags.mask[0]
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(r1 - r0, c1 - c0)
    rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
    y0, x0 = round(rc - side / 2), round(cc - side / 2)
    crop = np.zeros((side, side), bool)
    ys, xs = slice(max(y0, 0), y0 + side), slice(max(x0, 0), x0 + side)
    crop[ys.start - y0:ys.start - y0 + m[ys, xs].shape[0],
         xs.start - x0:xs.start - x0 + m[ys, xs].shape[1]] = m[ys, xs]
    from PIL import Image

    resized = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((S, S),
                         Image.BILINEAR)) >= 128
    iou = (resized & direct).sum() / (resized | direct).sum()
    assert iou > 0.97, iou


def test_uv_position_map_is_exact_for_a_linear_field():
    """On a mesh whose positions are a linear function of UV, every covered texel of the
    position map holds that function at the texel centre."""
    n = 9
    u, v = np.meshgrid(np.linspace(0.1, 0.9, n), np.linspace(0.1, 0.9, n))
    uv = np.stack([u.ravel(), v.ravel()], -1).astype(np.float32)
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a = i * n + j
            tris += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    tris = np.array(tris, np.int32)
    verts = np.c_[100 * uv[:, 0], 50 * uv[:, 1] - 7, 3 * uv[:, 0] + 2 * uv[:, 1]].astype(np.float32)
    S = 32
    pos = uv_position_map(verts, tris, uv, tris, S)
    c = (np.arange(S) + 0.5) / S
    uu, vv = np.meshgrid(c, 1 - c)
    expect = np.stack([100 * uu, 50 * vv - 7, 3 * uu + 2 * vv], -1)
    covered = np.abs(pos).sum(-1) > 0
    inside = (uu > 0.1 + 1e-6) & (uu < 0.9 - 1e-6) & (vv > 0.1 + 1e-6) & (vv < 0.9 - 1e-6)
    assert covered[inside].all() and not covered[~((uu >= 0.1) & (uu <= 0.9) & (vv >= 0.1)
                                                    & (vv <= 0.9))].any()
    np.testing.assert_allclose(pos[covered], expect[covered], atol=1e-4)


def test_view_params_and_backgrounds_are_deterministic(tmp_path, shared):
    a = sample_view_params(np.random.default_rng(7), np.arange(-90, 91, 10))
    b = sample_view_params(np.random.default_rng(7), np.arange(-90, 91, 10))
    np.testing.assert_array_equal(a.sh, b.sh)
    np.testing.assert_array_equal(a.pitch, b.pitch)
    assert np.all(np.abs(a.pitch) <= 5) and np.all(np.abs(a.roll) <= 5)
    bg1 = procedural_background(np.random.default_rng(3), 64)
    bg2 = procedural_background(np.random.default_rng(3), 64)
    assert bg1.dtype == np.uint8 and bg1.shape == (64, 64, 3)
    np.testing.assert_array_equal(bg1, bg2)
    src = BackgroundSource("folder", str(shared / "images"))
    f1 = src.sample(np.random.default_rng(1), 32)
    f2 = BackgroundSource("folder", str(shared / "images")).sample(np.random.default_rng(1), 32)
    np.testing.assert_array_equal(f1, f2)
    assert f1.shape == (32, 32, 3) and f1.std() > 1


def test_bad_background_folder_names_the_path(tmp_path):
    from facecorpus.core.errors import InputError

    with pytest.raises(InputError, match=str(tmp_path)):
        BackgroundSource("folder", str(tmp_path))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    src = BackgroundSource("folder", str(tmp_path))
    with pytest.raises(InputError, match="broken.jpg"):
        src.sample(np.random.default_rng(0), 16)


def test_vertex_irradiance_matches_shading_module(model):
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.renderers.shading import sh_irradiance

    R = euler_to_rotation(np.array([10.0, -30.0]), 0.0, 0.0)
    sh = sample_view_params(np.random.default_rng(0), [10.0, -30.0]).sh
    irr = vertex_irradiance(model.vertices, model.triangles, R, sh)
    n = vertex_normals(model.vertices, model.triangles) @ np.swapaxes(R, -1, -2)
    for p in range(2):
        np.testing.assert_allclose(irr[p], sh_irradiance(n[p], sh[p]), rtol=1e-4, atol=1e-5)


def test_render_views_matches_the_renderers_one_pass_render(model):
    """The fused fast path equals renderers.render (same cameras) within 1/255."""
    from facecorpus.renderers.cameras import Camera
    from facecorpus.renderers.render import render

    S = 64
    params = sample_view_params(np.random.default_rng(2), [-50.0, 0.0, 70.0])
    tex = (np.random.default_rng(3).uniform(0.2, 0.9, (32, 32, 3)) * 255).astype(np.uint8)
    bg = np.full((3, S, S, 3), 30, np.uint8)
    code = ncc(model.vertices)
    v = render_views(model.vertices, model.triangles, model.uv[model.uv_triangles], tex, code,
                     params, bg, size=S)
    R = euler_to_rotation(params.yaw, params.pitch, params.roll)
    centred = model.vertices - 0.5 * (model.vertices.min(0) + model.vertices.max(0))
    cams = [Camera.perspective(S, S, v.camera[k, 0], rotation=R[k],
                               translation=(0, 0, -v.camera[k, 3]), cx=v.camera[k, 1],
                               cy=v.camera[k, 2]) for k in range(3)]
    ref = render(centred, model.triangles, cams, outputs=("image", "mask", "depth", "pncc"),
                 ncc=code, sh=params.sh, uv=model.uv, uv_triangles=model.uv_triangles,
                 uv_texture=tex, background=bg)
    np.testing.assert_array_equal(v.mask[..., 0] > 0, ref.mask)
    img_ref = (ref.image * 255 + 0.5).astype(np.uint8)
    assert np.abs(v.image.astype(int) - img_ref.astype(int)).max() <= 1
    pncc_ref = (np.clip(ref.pncc, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.abs(v.pncc.astype(int) - pncc_ref.astype(int)).max() <= 1
    np.testing.assert_allclose(v.depth[..., 0], ref.depth, rtol=1e-5, atol=1e-3)
