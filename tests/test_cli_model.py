"""`facecorpus model build | info | preview` and `facecorpus demo` (model steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from facecorpus.cli import main
from PIL import Image


def test_model_info_procedural_json(capsys):
    assert main(["model", "info", "procedural", "--json", "--uv-size", "128"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["vertices"] == 3721 and d["identity_modes"] == 10 and d["landmarks"] == 68
    assert d["symmetry_residual_max"] == 0.0 and d["uv_mirror_coverage"] > 0.99
    assert d["uv_seam_vertices"] == 61 and set(d["regions"]) == {"face", "narrow"}


def test_model_build_out_and_info_on_a_path(tmp_path, capsys):
    out = tmp_path / "proc.npz"
    assert main(["model", "build", "procedural", "--out", str(out)]) == 0
    assert out.is_file() and "3721 vertices" in capsys.readouterr().out
    assert main(["model", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uv_mirror_coverage" in text and "symmetry_residual_max" in text


def test_model_errors_are_plain(tmp_path, capsys):
    assert main(["model", "info", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and "Traceback" not in err
    assert main(["model", "build", "file"]) == 2
    assert "--source" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main(["model", "info", str(bad)]) == 2
    assert "bad.npz" in capsys.readouterr().err


def test_model_preview_png(tmp_path, capsys):
    out = tmp_path / "prev.png"
    assert main(["model", "preview", "procedural", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[1] > img.shape[0] and img.mean() > 10


def test_demo_falls_back_to_procedural_when_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FACECORPUS_ASSETS", raising=False)
    monkeypatch.setenv("FACECORPUS_OFFLINE", "1")
    monkeypatch.setenv("FACECORPUS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "model,preview"]) == 0
    out = capsys.readouterr().out
    assert "ICT-FaceKit is not reachable" in out and "procedural test model" in out
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["facts"]["model"]["vertices"] == 3721
    assert (tmp_path / "demo" / "model_preview.png").is_file()


@pytest.mark.assets
@pytest.mark.slow
def test_build_and_demo_with_the_ict_mirror(shared, ict_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACECORPUS_ASSETS", str(shared))
    assert main(["model", "build", "ict-facekit", "--region", "face"]) == 0
    assert "ict-facekit-face: 9409 vertices, 100 identity modes, 53 expression modes" in \
        capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "model,preview"]) == 0
    out = capsys.readouterr().out
    assert "ICT-FaceKit face model from" in out and "not reachable" not in out
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["facts"]["model"]["identity_modes"] == 100
