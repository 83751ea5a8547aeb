"""One-pass render outputs (PNCC, depth, normals, UV, image) and SH shading."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.geometry import ncc as ncc_code
from facecorpus.meshops.geometry import vertex_normals
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers.cameras import Camera, framing_camera
from facecorpus.renderers.render import render
from facecorpus.renderers.shading import (
    A0,
    A1,
    A2,
    C0,
    C1,
    C2,
    composite,
    lambertian,
    sh_basis,
    sh_from_deep3d,
    sh_irradiance,
)


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=41, n_id=2, n_exp=2)


def test_pncc_at_a_vertex_pixel_equals_its_ncc(model):
    code = ncc_code(model.vertices)
    rng = np.random.default_rng(0)
    base = framing_camera(model.vertices, 64, 64, yaw=15, fill=0.8)
    checked = 0
    for vid in rng.choice(model.n_vertices, 40, replace=False):
        x, y, _ = base.project(model.vertices[vid:vid + 1])[0]
        # shift the image so the vertex lands exactly on the centre of pixel (row 31, col 29)
        cam = Camera.orthographic(64, 64, base.scale, rotation=base.rotation,
                                  translation=base.translation + [29.5 - x, -(31.5 - y)])
        r = render(model.vertices, model.triangles, cam, outputs=("pncc", "depth"), ncc=code)
        z = cam.project(model.vertices[vid:vid + 1])[0, 2]
        if not r.mask[0, 31, 29] or abs(r.depth[0, 31, 29] - z) > 1e-3:
            continue  # the vertex is hidden or on the silhouette
        np.testing.assert_allclose(r.pncc[0, 31, 29], code[vid], atol=2e-3)
        checked += 1
    assert checked >= 20


def test_all_outputs_are_consistent(model):
    cams = [framing_camera(model.vertices, 48, 48, yaw=y, kind="perspective")
            for y in (-40, 0, 40)]
    r = render(model.vertices, model.triangles, cams, outputs=("image", "mask", "depth",
               "normals", "pncc", "uv"), ncc=ncc_code(model.vertices), albedo=model.albedo_mean,
               uv=model.uv, uv_triangles=model.uv_triangles, background=(0.0, 0.0, 1.0))
    m = r.mask
    assert m.shape == (3, 48, 48) and 0.2 < m.mean() < 0.9
    assert (r.depth[m] > 0).all() and (r.depth[~m] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(r.normals[m], axis=-1), 1.0, atol=1e-4)
    # the visible surface of the frontal view faces the camera
    assert np.median(r.normals[1][m[1]][:, 2]) > 0.7
    assert ((r.pncc[m] >= -1e-6) & (r.pncc[m] <= 1 + 1e-6)).all()
    assert ((r.uv[m] >= 0) & (r.uv[m] <= 1)).all()
    assert (r.image >= 0).all() and (r.image <= 1).all()
    np.testing.assert_array_equal(r.image[~m], np.broadcast_to([0, 0, 1.0], r.image[~m].shape))
    # PNCC's x channel grows to the image right in a frontal view (+x model = image right)
    row = r.pncc[1, 24][m[1, 24]]
    assert (np.diff(row[:, 0]) > 0).mean() > 0.9
    with pytest.raises(ValueError, match="ncc"):
        render(model.vertices, model.triangles, cams[0], outputs=("pncc",))
    with pytest.raises(ValueError, match="unknown"):
        render(model.vertices, model.triangles, cams[0], outputs=("rgb",))


def test_texture_and_vertex_albedo_agree(model):
    """A constant texture and the same constant per-vertex albedo give the same image."""
    cam = framing_camera(model.vertices, 40, 40)
    colour = np.array([0.6, 0.4, 0.3], np.float32)
    a = render(model.vertices, model.triangles, cam, outputs=("image",),
               albedo=np.tile(colour, (model.n_vertices, 1)))
    b = render(model.vertices, model.triangles, cam, outputs=("image",), uv=model.uv,
               uv_triangles=model.uv_triangles, uv_texture=np.tile(colour, (8, 8, 1)))
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    assert a.image[a.mask].std() > 0.01  # lighting varies over the surface


def test_sh_basis_uses_deep3d_constants():
    n = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    Y = sh_basis(n)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(Y[0], [A0 * C0, 0, A1 * C1, 0, 0, 0, A2 * C2 / s3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(Y[1], [A0 * C0, 0, 0, -A1 * C1, 0, 0, -A2 * C2 * 0.5 / s3, 0,
                                      A2 * C2 * 0.5], atol=1e-6)
    np.testing.assert_allclose(Y[2], [A0 * C0, -A1 * C1, 0, 0, 0, 0, -A2 * C2 * 0.5 / s3, 0,
                                      -A2 * C2 * 0.5], atol=1e-6)
    g = sh_from_deep3d(np.zeros(27))
    np.testing.assert_allclose(g.reshape(3, 9)[:, 0], 0.8)
    np.testing.assert_allclose(sh_irradiance(n, g), 0.8 * A0 * C0, atol=1e-6)


def test_sh_directional_light_approximates_clamped_cosine():
    """A directional light projected onto the 9-term basis must reproduce max(0, n.d) to the
    known accuracy of order-2 SH (Ramamoorthi & Hanrahan). Deep3DFaceRecon's band factors
    (pi, 2 pi / sqrt 3, 2 pi / sqrt 8) differ from the exact Lambertian ones (pi, 2 pi / 3,
    pi / 4), so the light's coefficients are rescaled by their ratio; a sign or normalisation
    error in any basis term still breaks this."""
    rng = np.random.default_rng(0)
    d = np.array([0.3, 0.5, 0.8])
    d /= np.linalg.norm(d)
    a_d3d = np.array([A0, A1, A1, A1, A2, A2, A2, A2, A2])
    a_true = np.array([np.pi] + [2 * np.pi / 3] * 3 + [np.pi / 4] * 5)
    coeff = sh_basis(d[None])[0] / a_d3d * (a_true / a_d3d)  # y_lm(d) A_l / A_l(Deep3D)
    n = rng.normal(size=(2000, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    E = sh_irradiance(n, np.tile(coeff, 3))[:, 0]
    target = np.maximum(0.0, n @ d)
    assert np.abs(E - target).max() < 0.1
    assert np.corrcoef(E, target)[0, 1] > 0.99


def test_lambertian_and_composite():
    nrm = vertex_normals(*_quad())
    alb = np.full((4, 3), 0.5, np.float32)
    out = lambertian(alb, nrm, sh_from_deep3d(np.zeros(27)))
    np.testing.assert_allclose(out, 0.5 * 0.8 * A0 * C0, atol=1e-6)
    img = np.ones((2, 3, 3, 3), np.float32)
    mask = np.zeros((2, 3, 3), bool)
    mask[:, 1, 1] = True
    bg = np.zeros((3, 3, 3), np.uint8) + 255 // 5
    c = composite(img, mask, bg)
    np.testing.assert_allclose(c[:, 1, 1], 1.0)
    np.testing.assert_allclose(c[0, 0, 0], 51 / 255, atol=1e-6)


def _quad():
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    return v, np.array([[0, 1, 2], [0, 2, 3]])
