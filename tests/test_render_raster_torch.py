"""The torch rasterizer (CPU tensors here; the same code runs on CUDA) against the numba one:
same coverage, the same face on >= 99.5 % of covered pixels, barycentrics and depth where the
faces agree, on the procedural and the ICT-FaceKit model at several poses and both cameras."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.renderers.cameras import framing_camera
from facecorpus.renderers.raster import rasterize
from facecorpus.renderers.raster_torch import rasterize_torch

POSES = [(0.0, 0.0, 0.0), (35.0, -10.0, 5.0), (-70.0, 15.0, -12.0), (88.0, 0.0, 30.0)]


def screen(model, size, kind):
    """(len(POSES), V, 3) screen vertices of the mean face at every pose."""
    v = np.asarray(model.vertices, np.float32)
    return np.stack([framing_camera(v, size, size, yaw=y, pitch=p, roll=r, kind=kind).project(v)
                     for y, p, r in POSES])


def assert_matches_numba(sv, tris, size, **kw):
    ref = rasterize(sv, tris, size, size, **kw)
    got = rasterize_torch(torch.as_tensor(sv), torch.as_tensor(tris), size, size,
                          max_candidates=1 << 16, **kw)  # several chunks per batch
    p2f = got.pix_to_face.numpy()
    assert p2f.dtype == np.int32 and got.bary.dtype == torch.float32
    for n in range(sv.shape[0]):
        cov = ref.mask[n]
        assert cov.sum() > 0.1 * size * size
        np.testing.assert_array_equal(p2f[n] >= 0, cov)  # same coverage: exact rule
        same = (p2f[n] == ref.pix_to_face[n]) & cov
        assert same.sum() >= 0.995 * cov.sum(), (n, 1 - same.sum() / cov.sum())
        np.testing.assert_allclose(got.bary[n].numpy()[same], ref.bary[n][same], atol=1e-4)
        np.testing.assert_allclose(got.zbuf[n].numpy()[same], ref.zbuf[n][same], rtol=1e-5)
        assert np.isinf(got.zbuf[n].numpy()[~cov]).all()
        assert (got.bary[n].numpy()[~cov] == 0).all()


@pytest.mark.parametrize("kind", ["orthographic", "perspective"])
@pytest.mark.parametrize("cull", [False, True])
def test_matches_numba_procedural(kind, cull):
    from facecorpus.meshops.procedural import procedural_model

    model = procedural_model(n=41)
    sv = screen(model, 160, kind)
    assert_matches_numba(sv, np.asarray(model.triangles), 160, cull_backfaces=cull,
                         perspective_correct=kind == "perspective")


@pytest.mark.slow
@pytest.mark.assets
@pytest.mark.parametrize("kind", ["orthographic", "perspective"])
def test_matches_numba_ict(shared, monkeypatch, kind):
    monkeypatch.setenv("FACECORPUS_ASSETS", str(shared))
    from facecorpus.meshops.ict import load_ict_facekit

    model = load_ict_facekit()
    sv = screen(model, 192, kind)
    assert_matches_numba(sv, np.asarray(model.triangles), 192,
                         perspective_correct=kind == "perspective")


def test_depth_order_ties_and_invalid_vertices():
    """Nearest wins; an exact depth tie goes to the lower face id (numba's order, and not
    scheduling-dependent); triangles with a NaN or behind-camera vertex are dropped."""
    quad = np.array([[4, 4], [28, 4], [4, 28]], np.float32)
    xy = np.concatenate([quad, quad, quad + 2, quad + 40])
    z = np.array([5, 5, 5, 3, 3, 3, 3, 3, 3, 1, 1, 1], np.float32)[:, None]
    sv = np.concatenate([xy, z], 1)
    sv[9, 2] = np.nan  # face 3 is invalid
    tris = np.arange(12).reshape(4, 3)
    got = rasterize_torch(torch.as_tensor(sv[None]), tris, 48, 48)
    ref = rasterize(sv[None], tris, 48, 48)
    np.testing.assert_array_equal(got.pix_to_face.numpy(), ref.pix_to_face)
    p2f = got.pix_to_face.numpy()[0]
    assert (p2f[6, 6] == 1) and (p2f[12, 12] == 1)  # face 1 and 2 tie at z=3: lower id wins
    assert not (p2f == 0).any() and not (p2f == 3).any()
    sv2 = sv.copy()
    sv2[3:6, 2] = -1.0  # face 1 behind the camera: dropped, face 2 takes over
    p2 = rasterize_torch(torch.as_tensor(sv2[None]), tris, 48, 48).pix_to_face.numpy()[0]
    assert p2[12, 12] == 2 and p2[4, 4] == 0


def test_images_do_not_couple():
    """Every image of a batch gets what it gets alone."""
    from facecorpus.meshops.procedural import procedural_model

    model = procedural_model(n=25)
    sv = torch.as_tensor(screen(model, 96, "perspective"))
    tris = np.asarray(model.triangles)
    batch = rasterize_torch(sv, tris, 96, 96)
    for n in range(sv.shape[0]):
        one = rasterize_torch(sv[n:n + 1], tris, 96, 96)
        assert torch.equal(one.pix_to_face[0], batch.pix_to_face[n])
        assert torch.equal(one.bary[0], batch.bary[n])
