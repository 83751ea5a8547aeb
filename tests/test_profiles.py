"""Profiles (#16 item 4): the sampled UV region follows the geometry at large yaw.

With the true mesh and camera, the pipeline's own face mask + unwrap must recover >= 90 % of
the texels the photo truly shows (``tasks.unwrap.truly_visible``: fine z-buffer, front-facing,
in the configured region, outside the erosion band), frontally and at yaw 60. The rule before
2026-12-07 (the jaw + brows polygon on ICT's whole face area) folded into a crescent there;
its row shows what this test guards against.
"""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.configs import load_config, parse_set
from facecorpus.meshops.uv import rasterize_uv
from facecorpus.tasks.fit import synthetic_batch
from facecorpus.tasks.landmarks import oval_for
from facecorpus.tasks.masks import face_mask
from facecorpus.tasks.unwrap import truly_visible, unwrap_one

S = T = 128


@pytest.fixture(scope="module")
def model():
    from facecorpus.meshops.procedural import procedural_model

    return procedural_model()


def recovered(model, cfg, yaw: float, seed: int = 3) -> list[float]:
    """|recovered & truth| / |truth| per face of a synthetic batch at +-``yaw``."""
    uc = cfg.unwrap
    raster = rasterize_uv(model.uv, model.uv_triangles, uc.uv_size)
    sh = np.zeros(27, np.float32)
    sh[0::9] = 2 / np.sqrt(np.pi)
    sb = synthetic_batch(model, 2 if yaw else 1, S, seed=seed, yaw_max=yaw, sh=sh,
                         noise_px=0.0)
    out = []
    for i in range(len(sb.image)):
        v, cam = sb.truth.vertices(model, i).astype(np.float32), sb.truth.camera_for(i)
        fm = face_mask(model, v, cam, oval=oval_for(sb.landmarks[i], uc),
                       region=uc.face_region, erode_px=uc.erode_px)
        rec = unwrap_one(sb.image[i], v, cam, model, uc.uv_size, fm,
                         min_cos=uc.min_cos).uv_visible_mask[0]
        truth = truly_visible(model, v, cam, raster, region=uc.face_region,
                              erode_px=uc.erode_px)
        assert truth.sum() > 500
        out.append(float((rec & truth).sum() / truth.sum()))
        assert (rec & ~truth).sum() <= 0.02 * truth.sum()  # and nothing invisible comes in
    return out


def config(*sets: str):
    return load_config(None, "pseudo_gt", parse_set([f"unwrap.uv_size={T}", *sets]))


@pytest.mark.parametrize("yaw", [0.0, 60.0])
def test_visible_region_follows_geometry(model, yaw):
    assert min(recovered(model, config(), yaw)) >= 0.9


def test_old_polygon_rule_folds_at_profile(model):
    """The same measure catches the old rule: on the whole face area the jaw + brows
    polygon keeps well under 90 % frontally, and less again at yaw 60."""
    old = config("unwrap.oval=polygon", "unwrap.face_region=face", "unwrap.oval_forehead=0.25",
                 "unwrap.oval_margin=0")
    front, side = np.mean(recovered(model, old, 0.0)), np.mean(recovered(model, old, 60.0))
    assert front < 0.9 and side < front


def test_oval_modes(model):
    pts = synthetic_batch(model, 1, S, seed=1, yaw_max=0).landmarks[0]
    uc = config().unwrap
    hull = oval_for(pts, uc)
    from scipy.spatial import ConvexHull

    assert len(ConvexHull(hull).vertices) == len(hull)  # convex: it cannot fold
    assert oval_for(pts, config("unwrap.oval=none").unwrap) is None
    for off in ("off", "false"):  # YAML's bare off/false mean no oval
        assert config(f"unwrap.oval={off}").unwrap.oval == "none"
    tight = oval_for(pts, config("unwrap.oval_margin=0").unwrap)
    from facecorpus.tasks.masks import polygon_mask

    assert polygon_mask(hull, (S, S)).sum() > polygon_mask(tight, (S, S)).sum()
    flat = np.zeros((68, 2), np.float32)
    assert oval_for(flat, uc).shape == (0, 2)  # degenerate landmarks: an empty oval
