"""The model preview sheet: layout, mirror symmetry of the yaw sweep, UV panels."""

from __future__ import annotations

import numpy as np
from facecorpus.meshops.procedural import procedural_model
from facecorpus.renderers.preview import YAWS, preview_images, write_preview
from PIL import Image


def test_preview_rows_are_a_mirror_symmetric_yaw_sweep():
    model = procedural_model(n=31, n_id=1, n_exp=1)  # exactly x-mirror symmetric
    rows, labels = preview_images(model, size=48)
    shaded, pncc, uv_row = rows
    assert len(shaded) == len(pncc) == len(YAWS) == 19 and labels[0] == "yaw -90"
    assert YAWS[0] == -90 and YAWS[-1] == 90 and YAWS[9] == 0
    for k in range(19):
        m = pncc[k].sum(-1) > 0
        mirror = pncc[18 - k][:, ::-1]
        both = m & (mirror.sum(-1) > 0)
        # yaw -a is the mirror image of yaw +a, with NCC x flipped (x -> 1 - x)
        assert both.sum() > 0.9 * m.sum()
        np.testing.assert_allclose(pncc[k][both][:, 0], 1 - mirror[both][:, 0], atol=0.05)
        np.testing.assert_allclose(pncc[k][both][:, 1:], mirror[both][:, 1:], atol=0.05)
    # frontal view: lit face brighter than the background, head up (NCC y high at the top)
    front = shaded[9]
    m = pncc[9].sum(-1) > 0
    assert front[m].mean() > front[~m].mean() + 0.2
    rows_idx = np.nonzero(m.any(1))[0]
    top, bottom = pncc[9][rows_idx[2]], pncc[9][rows_idx[-3]]
    assert top[m[rows_idx[2]]][:, 1].mean() > bottom[m[rows_idx[-3]]][:, 1].mean() + 0.5
    layout, uv_position = uv_row
    assert layout.shape == (96, 96, 3) and uv_position.shape == (96, 96, 3)
    assert 0.2 < (uv_position.sum(-1) > 0).mean() < 0.95


def test_write_preview_png(tmp_path):
    path = write_preview(procedural_model(n=21, n_id=1, n_exp=1), tmp_path / "p.png", size=32)
    img = np.asarray(Image.open(path))
    assert img.shape == (14 + 3 * 34 + 2, 19 * 34 + 2, 3)
    assert not list(tmp_path.glob(".*tmp*"))
