"""Camera conventions: every sign and offset in renderers/cameras.py is pinned here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.renderers.cameras import (
    Camera,
    euler_to_rotation,
    euler_to_rotation_torch,
    framing_camera,
    project_orthographic,
    project_orthographic_torch,
    project_perspective,
    project_perspective_torch,
    rotation_to_euler,
)
from facecorpus.renderers.raster import rasterize


def test_perspective_known_points_land_on_expected_pixels():
    cam = Camera.perspective(64, 48, focal=1000.0, translation=(0, 0, -500))
    pts = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 100]], np.float64)
    sv = cam.project(pts)
    # centre of a 64x48 image is (32, 24); +x right, +y up -> smaller row; depth = -Z
    np.testing.assert_allclose(sv[0], [32, 24, 500], atol=1e-4)
    np.testing.assert_allclose(sv[1], [32 + 1000 * 10 / 500, 24, 500], atol=1e-4)
    np.testing.assert_allclose(sv[2], [32, 24 - 1000 * 10 / 500, 500], atol=1e-4)
    np.testing.assert_allclose(sv[3], [32, 24, 400], atol=1e-4)  # nearer the camera


def test_orthographic_known_points():
    cam = Camera.orthographic(64, 64, scale=2.0, translation=(3.0, 5.0))
    sv = cam.project(np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 10]], np.float64))
    np.testing.assert_allclose(sv[0], [32 + 3, 32 - 5, 0], atol=1e-5)
    np.testing.assert_allclose(sv[1], [32 + 3 + 8, 32 - 5, 0], atol=1e-5)
    np.testing.assert_allclose(sv[2], [32 + 3, 32 - 5 - 8, 0], atol=1e-5)
    assert sv[3, 2] == pytest.approx(-20.0)  # nearer = smaller depth


def test_pixel_centre_convention():
    """A point at (j + 0.5, i + 0.5) is the centre of pixel (row i, col j)."""
    i, j = 7, 5
    c = np.array([j + 0.5, i + 0.5])
    sv = np.array([[[c[0] - 0.3, c[1] - 0.3, 1], [c[0] + 0.3, c[1] - 0.3, 1],
                    [c[0], c[1] + 0.3, 1]]], np.float32)
    frags = rasterize(sv, np.array([[0, 1, 2]]), 16, 16)
    assert np.argwhere(frags.mask[0]).tolist() == [[i, j]]


@pytest.mark.parametrize("kind", ["perspective", "orthographic"])
def test_positive_yaw_turns_nose_to_image_right(kind):
    nose = np.array([[0.0, 0.0, 100.0]])
    kw = {"focal": 800.0, "translation": (0, 0, -600)} if kind == "perspective" else {"scale": 0.2}
    make = Camera.perspective if kind == "perspective" else Camera.orthographic
    centre = make(128, 128, **kw).project(nose)[0]
    right = make(128, 128, yaw=30, **kw).project(nose)[0]
    down = make(128, 128, pitch=30, **kw).project(nose)[0]
    top = make(128, 128, roll=30, **kw).project(np.array([[0.0, 100.0, 0.0]]))[0]
    assert centre[0] == pytest.approx(64.0) and centre[1] == pytest.approx(64.0)
    assert right[0] > 64.0 + 5 and abs(right[1] - 64.0) < 1e-3  # yaw: nose to image right
    assert down[1] > 64.0 + 5 and abs(down[0] - 64.0) < 1e-3  # pitch: nose down
    assert top[0] < 64.0 - 5  # roll: head top to image left (counter-clockwise)


def test_rotation_composition_order_and_inverse():
    R = euler_to_rotation(20.0, -15.0, 10.0)
    Rx = euler_to_rotation(0, -15.0, 0)
    Ry = euler_to_rotation(20.0, 0, 0)
    Rz = euler_to_rotation(0, 0, 10.0)
    np.testing.assert_allclose(R, Rz @ Ry @ Rx, atol=1e-12)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    angles = rng.uniform([-89, -80, -80], [89, 80, 80], (50, 3))
    back = np.stack(rotation_to_euler(euler_to_rotation(*angles.T)), -1)
    np.testing.assert_allclose(back, angles, atol=1e-9)


def test_torch_projection_matches_numpy():
    rng = np.random.default_rng(1)
    v = rng.normal(0, 50, (2, 20, 3))
    ang = rng.uniform(-40, 40, (2, 3))
    R = euler_to_rotation(*ang.T)
    Rt = euler_to_rotation_torch(*torch.tensor(ang.T))
    np.testing.assert_allclose(Rt.numpy(), R, atol=1e-12)
    t = np.array([[1.0, 2.0, -700.0], [-3.0, 0.5, -650.0]])
    a = project_perspective(v, R, t, [900.0, 1000.0], 64.0, 60.0)
    b = project_perspective_torch(torch.tensor(v), Rt, torch.tensor(t),
                                  torch.tensor([900.0, 1000.0]), 64.0, 60.0)
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-3)
    a = project_orthographic(v, R, t[:, :2], [0.5, 0.7], 64.0, 60.0)
    b = project_orthographic_torch(torch.tensor(v), Rt, torch.tensor(t[:, :2]),
                                   torch.tensor([0.5, 0.7]), 64.0, 60.0)
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-3)
    cam = Camera.perspective(128, 128, 900.0, yaw=10, translation=(0, 0, -700))
    np.testing.assert_allclose(cam.project_torch(torch.tensor(v[0])).numpy(),
                               cam.project(v[0]), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind", ["perspective", "orthographic"])
def test_framing_camera_fits_mesh(kind):
    rng = np.random.default_rng(2)
    v = rng.normal(0, [60, 80, 40], (500, 3))
    cam = framing_camera(v, 96, 128, yaw=25, kind=kind, fill=0.8)
    sv = cam.project(v)
    assert sv[:, 0].min() >= 0 and sv[:, 0].max() <= 96
    assert sv[:, 1].min() >= 0 and sv[:, 1].max() <= 128
    assert (sv[:, 2] > 0).all() or kind == "orthographic"
    span = max(sv[:, 0].max() - sv[:, 0].min(), sv[:, 1].max() - sv[:, 1].min())
    assert 0.6 * 96 < span <= 96
