"""UV-space outputs: coverage, attribute transfer, visibility, image -> UV sampling."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers.cameras import Camera, framing_camera
from facecorpus.renderers.render import render
from facecorpus.renderers.uv_space import (
    OUTSIDE,
    image_to_uv,
    project_to_uv,
    rasterize_uv,
    to_uv_space,
)


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=41, n_id=2, n_exp=2)


def test_uv_coverage_equals_chart_area(model):
    t = model.uv[model.uv_triangles].astype(np.float64)
    area = 0.5 * np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                        - (t[:, 2, 0] - t[:, 0, 0]) * (t[:, 1, 1] - t[:, 0, 1])).sum()
    r = rasterize_uv(model.uv, model.uv_triangles, 256)
    assert r.mask.mean() == pytest.approx(area, rel=0.01)


def test_to_uv_space_moves_per_vertex_attributes(model):
    S = 128
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    # a per-vertex UV (well defined away from the seam) lands on the texel centre's own UV
    per_vertex_uv = np.zeros((model.n_vertices, 2), np.float32)
    per_vertex_uv[model.triangles.ravel()] = model.uv[model.uv_triangles.ravel()]
    seam = np.zeros(model.n_vertices, bool)
    seam[model.triangles.ravel()[(model.uv[model.uv_triangles.ravel()]
                                  != per_vertex_uv[model.triangles.ravel()]).any(1)]] = True
    out = to_uv_space(per_vertex_uv, r, model.triangles)
    assert out.shape == (S, S, 2)
    rows, cols = np.nonzero(r.mask & ~seam[model.triangles[np.maximum(r.texel_face, 0)]].any(-1))
    assert len(rows) > 0.5 * r.mask.sum()
    np.testing.assert_allclose(out[rows, cols, 0], (cols + 0.5) / S, atol=1e-5)
    np.testing.assert_allclose(out[rows, cols, 1], 1 - (rows + 0.5) / S, atol=1e-5)
    assert (out[~r.mask] == 0).all()
    # batched attributes: uv_position for two shapes
    pos = to_uv_space(np.stack([model.vertices, 2 * model.vertices]), r, model.triangles)
    np.testing.assert_allclose(pos[1], 2 * pos[0], rtol=1e-5, atol=1e-4)


def test_visibility_follows_yaw(model):
    S = 64
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    right_island = r.mask & (np.arange(S)[None, :] < S // 2)  # u < 0.5: subject's right
    left_island = r.mask & (np.arange(S)[None, :] >= S // 2)
    frac = {}
    for yaw in (0, 70):
        cam = framing_camera(model.vertices, 96, 96, yaw=yaw, kind="perspective")
        out = render(model.vertices, model.triangles, cam, outputs=("mask",))
        proj = project_to_uv(model.vertices, model.triangles, cam, r, out.fragments)
        vis = proj.uv_visible_mask[0]
        assert not vis[~r.mask].any()
        assert (proj.uv_sampling_map[0][~r.mask] == OUTSIDE).all()
        frac[yaw] = (vis[right_island].mean(), vis[left_island].mean())
    assert min(frac[0]) > 0.9
    # positive yaw turns the nose to image right: the subject's right side faces the camera
    assert frac[70][0] > 0.8 and frac[70][1] < 0.5


def test_occluded_texels_are_invisible():
    # two parallel squares, the front one (z = 10) covers the left half of the back one
    v = np.array([[-10, -10, 0], [10, -10, 0], [10, 10, 0], [-10, 10, 0],
                  [-12, -12, 10], [0, -12, 10], [0, 12, 10], [-12, 12, 10]], np.float64)
    tris = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    uv = np.array([[0.0, 0], [0.5, 0], [0.5, 1], [0, 1], [0.5, 0], [1, 0], [1, 1], [0.5, 1]],
                  np.float32)
    S = 32
    r = rasterize_uv(uv, tris, S)
    cam = Camera.orthographic(64, 64, scale=2.5)
    out = render(v, tris, cam, outputs=("mask",))
    vis = project_to_uv(v, tris, cam, r, out.fragments).uv_visible_mask[0]
    back = vis[:, : S // 2]
    cols = np.arange(S // 2)
    u_x = -10 + 20 * (cols + 0.5) / (S // 2)  # model x of each back texel column
    assert not back[:, u_x < -0.5].any()  # hidden behind the front square
    assert back[:, u_x > 0.5].all()
    assert vis[:, S // 2:].all()


def test_image_to_uv_recovers_the_texture(model):
    """Render with a texture under constant light, unwrap: visible texels get the texture back."""
    S = 64
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    rows, cols = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    tex = np.stack([cols / S, rows / S, 0.5 + 0.3 * np.sin(cols / 6.0)], -1).astype(np.float32)
    sh = np.zeros(27, np.float32)
    sh[0::9] = 1.0 / (np.pi / np.sqrt(4 * np.pi))  # irradiance exactly 1
    cam = framing_camera(model.vertices, 192, 192, yaw=20)
    out = render(model.vertices, model.triangles, cam, outputs=("image",), sh=sh,
                 uv=model.uv, uv_triangles=model.uv_triangles, uv_texture=tex)
    proj = project_to_uv(model.vertices, model.triangles, cam, r, out.fragments)
    got = image_to_uv(out.image, proj)[0]
    vis = proj.uv_visible_mask[0]
    # away from the image silhouette and the UV chart borders
    from scipy import ndimage

    interior = ndimage.binary_erosion(vis, iterations=2)
    assert interior.sum() > 0.5 * r.mask.sum()
    err = np.abs(got[interior] - tex[interior])
    assert np.median(err) < 0.01 and err.max() < 0.08
    assert (got[~vis] == 0).all()
    allin = image_to_uv(out.image, proj, visible_only=False)[0]
    np.testing.assert_array_equal(allin[vis], got[vis])


def test_per_pixel_uv_points_back_to_the_same_face(model):
    """image -> UV: the UV rendered at a pixel lies in the UV triangle of the face the pixel
    sees (the two rasterizers agree on which surface point is where)."""
    cam = framing_camera(model.vertices, 96, 96, yaw=25, kind="perspective")
    out = render(model.vertices, model.triangles, cam, outputs=("uv",), uv=model.uv,
                 uv_triangles=model.uv_triangles)
    S = 512
    r = rasterize_uv(model.uv, model.uv_triangles, S)
    m = out.mask[0]
    uv = out.uv[0][m]
    col = np.clip((uv[:, 0] * S).astype(int), 0, S - 1)
    row = np.clip(((1 - uv[:, 1]) * S).astype(int), 0, S - 1)
    face = out.fragments.pix_to_face[0][m]
    exact = r.texel_face[row, col] == face
    # a UV point on a triangle edge may fall in the neighbouring texel's triangle
    near = np.zeros_like(exact)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= r.texel_face[np.clip(row + dr, 0, S - 1), np.clip(col + dc, 0, S - 1)] == face
    assert exact.mean() > 0.85 and near.mean() > 0.995
