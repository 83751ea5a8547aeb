"""The differentiable torch path: agreement with the numba pass and gradchecks (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.meshops.geometry import vertex_normals as vertex_normals_np
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers import diff
from facecorpus.renderers.cameras import (
    euler_to_rotation_torch,
    framing_camera,
    project_perspective_torch,
)
from facecorpus.renderers.interpolate import interpolate as interpolate_np
from facecorpus.renderers.interpolate import texture as texture_np
from facecorpus.renderers.raster import rasterize
from facecorpus.renderers.shading import DEFAULT_SH
from facecorpus.renderers.shading import sh_irradiance as sh_irradiance_np

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def small():
    m = procedural_model(n=21, n_id=2, n_exp=2)
    cam = framing_camera(m.vertices, 20, 20, yaw=15, kind="perspective", fill=0.95)
    return m, cam


@pytest.mark.parametrize("device", DEVICES)
def test_matches_numba_pass(small, device):
    m, cam = small
    sv_np = cam.project(m.vertices)
    fr = rasterize(sv_np[None], m.triangles, 20, 20)
    sv = torch.tensor(sv_np[None], dtype=torch.float64, device=device)
    bary = diff.barycentrics(sv, m.triangles, fr.pix_to_face)
    np.testing.assert_allclose(bary.cpu().numpy(), fr.bary, atol=2e-3)
    alb = torch.tensor(m.albedo_mean, dtype=torch.float64, device=device)
    col = diff.interpolate(alb, bary, fr.pix_to_face, m.triangles)
    np.testing.assert_allclose(col.cpu().numpy(), interpolate_np(m.albedo_mean, fr, m.triangles),
                               atol=2e-3)
    # per-corner attributes and texture lookup
    uvc = torch.tensor(m.uv[m.uv_triangles], dtype=torch.float64, device=device)
    uv_pix = diff.interpolate(uvc, bary, fr.pix_to_face)
    tex = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    got = diff.texture(torch.tensor(tex, device=device), uv_pix, fr.mask)
    ref = texture_np(tex, interpolate_np(m.uv[m.uv_triangles], fr), fr.mask)
    np.testing.assert_allclose(got.cpu().numpy(), ref, atol=5e-3)
    # normals and SH shading match the numpy versions
    vn = diff.vertex_normals(torch.tensor(m.vertices, dtype=torch.float64), m.triangles)
    np.testing.assert_allclose(vn.numpy(), vertex_normals_np(m.vertices, m.triangles), atol=1e-5)
    irr = diff.sh_irradiance(vn[None], torch.tensor(DEFAULT_SH))
    np.testing.assert_allclose(irr[0].numpy(), sh_irradiance_np(vn.numpy(), DEFAULT_SH),
                               atol=1e-5)


def _interior(fr, margin=0.05):
    """Pixels whose centre lies well inside its triangle (all barycentrics > margin)."""
    return torch.tensor(fr.mask & (fr.bary.min(-1) > margin))


def test_gradcheck_vertices_camera_lighting_albedo(small):
    m, cam = small
    tris = torch.tensor(m.triangles, dtype=torch.long)
    sv_np = cam.project(m.vertices)
    fr = rasterize(sv_np[None], m.triangles, 20, 20)
    sel = _interior(fr)
    assert sel.sum() > 30
    used = np.unique(m.triangles[fr.pix_to_face[fr.mask]])
    # keep the check small: only the vertices that reach the image are free parameters
    v0 = torch.tensor(m.vertices, dtype=torch.float64)
    idx = torch.tensor(used[:12])
    R0 = torch.tensor(cam.rotation, dtype=torch.float64)

    alb0 = torch.tensor(m.albedo_mean, dtype=torch.float64)

    def f(dv, angles, t, focal, sh, dalb):
        v = v0.index_add(0, idx, dv)
        albedo = alb0.index_add(0, idx, dalb)
        R = R0 @ euler_to_rotation_torch(angles[0], angles[1], angles[2])
        sv = project_perspective_torch(v[None], R, t, focal, 10.0, 10.0)
        bary = diff.barycentrics(sv, tris, fr.pix_to_face)
        n_cam = diff.vertex_normals(v[None] @ R.T, tris)
        colour = albedo[None] * diff.sh_irradiance(n_cam, sh)
        img = diff.interpolate(colour, bary, fr.pix_to_face, tris)
        return img[sel.expand(1, -1, -1)]

    args = (torch.zeros(len(idx), 3, dtype=torch.float64, requires_grad=True),
            torch.zeros(3, dtype=torch.float64, requires_grad=True),
            torch.tensor(cam.translation, dtype=torch.float64, requires_grad=True),
            torch.tensor(cam.focal, dtype=torch.float64, requires_grad=True),
            torch.tensor(DEFAULT_SH, dtype=torch.float64, requires_grad=True),
            torch.zeros(len(idx), 3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    # and the gradient really reaches every input
    out = f(*args).sum()
    grads = torch.autograd.grad(out, args)
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_gradcheck_texture_and_uvs(small):
    m, cam = small
    fr = rasterize(cam.project(m.vertices)[None], m.triangles, 20, 20)
    sel = _interior(fr)
    uvc = torch.tensor(m.uv[m.uv_triangles], dtype=torch.float64)

    def f(tex, duv):
        bary = torch.tensor(fr.bary, dtype=torch.float64)
        uv_pix = diff.interpolate(uvc + duv, bary, fr.pix_to_face)
        return diff.texture(tex, uv_pix, fr.mask)[sel]

    tex = torch.rand(6, 6, 3, dtype=torch.float64, requires_grad=True)
    duv = torch.zeros_like(uvc, requires_grad=True)
    assert torch.autograd.gradcheck(f, (tex, duv), eps=1e-6, atol=1e-5, fast_mode=True)


def test_orthographic_barycentrics_are_affine(small):
    m, _ = small
    cam = framing_camera(m.vertices, 20, 20, yaw=-10)
    sv_np = cam.project(m.vertices)
    fr = rasterize(sv_np[None], m.triangles, 20, 20, perspective_correct=False)
    bary = diff.barycentrics(torch.tensor(sv_np[None], dtype=torch.float64), m.triangles,
                             fr.pix_to_face, perspective_correct=False)
    np.testing.assert_allclose(bary.numpy(), fr.bary, atol=2e-3)


def test_vertex_normals_one_mesh_is_the_batched_result_bit_for_bit():
    """The (V, 3) fast path (index_add along dim 0) adds the same terms in the same order as
    the batched one: stage 2's results depend on it to the bit (#12)."""
    m = procedural_model(n=41)
    g = torch.Generator().manual_seed(5)
    v = torch.as_tensor(m.vertices, dtype=torch.float32) + 0.05 * torch.randn(
        m.n_vertices, 3, generator=g)
    one = diff.vertex_normals(v, m.triangles)
    assert one.shape == v.shape
    assert torch.equal(one, diff.vertex_normals(v[None], m.triangles)[0])
