"""Backends behind one rasterize interface; pytorch3d checked against numba when installed."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.renderers.backends import (
    available_backends,
    get_rasterizer,
    pytorch3d_available,
    screen_to_pytorch3d_ndc,
)
from facecorpus.renderers.cameras import Camera
from facecorpus.renderers.raster import rasterize


def test_numba_is_always_available_and_default():
    assert available_backends()[0] == "numba"
    assert get_rasterizer() is rasterize and get_rasterizer("numba") is rasterize
    with pytest.raises(ValueError, match="unknown"):
        get_rasterizer("opengl")
    if not pytorch3d_available():
        with pytest.raises(ModuleNotFoundError, match="pytorch3d"):
            get_rasterizer("pytorch3d")


def test_ndc_mapping_matches_pytorch3d_pixel_centres():
    # pytorch3d: column j centre at x = r/2 - (j + 0.5) r / W, +x left; row i likewise, +y up
    H, W = 4, 8
    j, i = np.arange(W), np.arange(H)
    sv = np.stack(np.broadcast_arrays(j[None, :] + 0.5, i[:, None] + 0.5, np.ones((H, W))), -1)
    ndc = screen_to_pytorch3d_ndc(sv, H, W)
    np.testing.assert_allclose(ndc[0, :, 0], -(W / H) + (2 * (W - 1 - j) + 1) * (W / H) / W,
                               atol=1e-6)
    np.testing.assert_allclose(ndc[:, 0, 1], -1 + (2 * (H - 1 - i) + 1) / H, atol=1e-6)
    assert ndc[0, 0, 0] > ndc[0, -1, 0] and ndc[0, 0, 1] > ndc[-1, 0, 1]


@pytest.mark.skipif(not pytorch3d_available(),
                    reason="pytorch3d not installed (not on this project's package registries)")
@pytest.mark.parametrize("cull", [False, True])
def test_pytorch3d_backend_agrees_with_numba(cull):
    from test_render_raster import edge_distance, icosphere

    v, f = icosphere(2, 60.0)
    cam = Camera.perspective(48, 64, focal=180.0, yaw=20, translation=(0, 0, -200))
    sv = cam.project(v)[None]
    a = rasterize(sv, f, 48, 64, cull_backfaces=cull)
    b = get_rasterizer("pytorch3d")(sv, f, 48, 64, cull_backfaces=cull)
    far = edge_distance(sv[0, :, :2], f, 48, 64) > 0.5
    np.testing.assert_array_equal(a.pix_to_face[0][far], b.pix_to_face[0][far])
    hit = far & a.mask[0]
    np.testing.assert_allclose(a.bary[0][hit], b.bary[0][hit], atol=1e-3)
    np.testing.assert_allclose(a.zbuf[0][hit], b.zbuf[0][hit], rtol=1e-4)
