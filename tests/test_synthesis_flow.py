"""The synthesis flow: determinism across worker counts, resume after a kill, summary, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from facecorpus.configs.synthesis import SynthesisConfig
from facecorpus.flows import synthesis

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "model": "procedural",
    "seed": 11,
    "subjects": {"n_random": 10, "n_groups": 2, "texture_size": 32},
    "augment": {"n_faces": 6, "group_ratios": {"g0": 0.5, "g1": 0.5}},
    "poses": {"yaw_step": 30.0},
    "output": {"image_size": 48, "uv_size": 32, "faces_per_shard": 2},
}


def small_cfg(**over) -> SynthesisConfig:
    d = json.loads(json.dumps(SMALL))
    for k, v in over.items():
        node = d
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return SynthesisConfig.model_validate(d)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file of both datasets (the bytes on disk, not just the arrays)."""
    out = {}
    for sub in (synthesis.VIEWS, synthesis.FACES):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run without Prefect: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    summary = synthesis.run_shards(small_cfg(), out)
    return out, summary


@pytest.mark.slow
def test_reference_run_outputs(reference):
    from facecorpus.datasets.store import open_dataset

    out, s = reference
    assert s["n_shards"] == 3 and s["shards_committed"] == 3
    assert s["faces"] <= 6 and s["faces"] + s["rejected_draws"] >= 6
    assert s["pairs"] == s["faces"] * 7
    views = open_dataset(str(out / "views"))
    faces = open_dataset(str(out / "faces"))
    m = views.manifest
    # all poses of a face are in its shard; shard = face_index // faces_per_shard
    fi = np.asarray(m.column("face_index").to_pylist())
    np.testing.assert_array_equal(np.asarray(m.column("shard").to_pylist()), fi // 2)
    assert sorted(set(m.column("yaw").to_pylist())) == [-90, -60, -30, 0, 30, 60, 90]
    img = views.read("image", m.column("index").to_numpy()[:7])
    mask = views.read("mask", m.column("index").to_numpy()[:7])
    assert img.shape == (7, 48, 48, 3) and mask.max() == 1
    # the crop fills the frame: the mask touches the margin band on at least two sides
    for k in range(7):
        rows, cols = np.flatnonzero(mask[k, ..., 0].any(1)), np.flatnonzero(mask[k, ..., 0].any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 48 / 1.1 - 2
    assert faces.read("uv_position", [0]).shape == (1, 32, 32, 3)
    assert (out / "summary_sheet.png").is_file() and (out / "summary.json").is_file()
    groups = faces.manifest.column("group").to_pylist()
    assert sorted(groups) == ["g0"] * 3 + ["g1"] * 3 or s["rejected_draws"] > 0


@pytest.mark.slow
def test_one_and_two_workers_give_identical_bytes(reference, tmp_path, prefect_harness):
    ref_out, _ = reference
    want = tree_digest(ref_out)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        s = synthesis.run_synthesis(small_cfg(workers=workers), out)
        assert s["shards_run"] == 3
        assert tree_digest(out) == want, f"{workers} worker(s) wrote different bytes"


_KILL_SCRIPT = r"""
import os, sys
from facecorpus.datasets import store
from facecorpus.flows import synthesis
from facecorpus.configs.synthesis import SynthesisConfig
cfg = SynthesisConfig.model_validate_json(sys.argv[1])
seen = {"views": 0}
real = store.DatasetWriter._before_commit
def hook(self, shard_id):
    if self.url.rstrip("/").endswith("views"):
        seen["views"] += 1
        if seen["views"] == 2:  # shard 1's views data written, its manifest not: die here
            os._exit(137)
    real(self, shard_id)
store.DatasetWriter._before_commit = hook
synthesis.run_shards(cfg, sys.argv[2])
"""


@pytest.mark.slow
def test_resume_after_kill(reference, tmp_path, prefect_harness):
    ref_out, _ = reference
    out = tmp_path / "killed"
    cfg = small_cfg()
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, cfg.model_dump_json(), str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 137, proc.stderr[-2000:]
    committed = synthesis.SynthesisJob(cfg, out).writers()[0].committed_shards()
    assert sorted(committed) == [0]  # shard 1 died before its manifest: invisible
    s = synthesis.run_synthesis(cfg, out)
    assert s["shards_skipped"] == 1 and s["shards_run"] == 2 and s["shards_committed"] == 3
    assert tree_digest(out) == tree_digest(ref_out)
    # a third run has nothing to do
    s = synthesis.run_shards(cfg, out)
    assert s["shards_skipped"] == 3 and s["shards_run"] == 0


def test_max_shards_then_resume(reference, tmp_path):
    out = tmp_path / "partial"
    s = synthesis.run_shards(small_cfg(), out, max_shards=1)
    assert s["shards_committed"] == 1
    s = synthesis.run_shards(small_cfg(), out)
    assert s["shards_skipped"] == 1 and s["shards_run"] == 2
    assert tree_digest(out) == tree_digest(reference[0])


def test_rejections_reach_the_summary(tmp_path, monkeypatch):
    from facecorpus.meshops import dr

    monkeypatch.setattr(dr, "check_mesh",
                        lambda *a, **k: dr.MeshCheck(False, "flipped triangles 0.0300 > 0.01"))
    s = synthesis.run_shards(small_cfg(**{"augment.max_attempts": 2, "augment.n_faces": 2}),
                             tmp_path / "rej")
    assert s["faces"] == 0 and s["pairs"] == 0
    assert s["rejected_by_reason"] == {"flipped triangles 0.0300 > 0.01": 4,
                                       "all 2 draws rejected": 2}


@pytest.mark.slow
def test_cli_runs_demo_config_and_reports_bad_config(tmp_path):
    cmd = [sys.executable, "-m", "facecorpus.cli", "run", "synthesis", "--config",
           str(REPO / "configs" / "synthesis_demo.yaml"), "--out", str(tmp_path / "demo"),
           "--no-prefect", "--set", "augment.n_faces=2", "--set", "poses.yaw_step=45",
           "--set", "output.image_size=32"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pairs: 10" in p.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["pairs"] == 10 and Path(summary["sheet"]).is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: synthesis\naugment: {n_faces: -3}\nposes: {yaw_step: 0}\n")
    p = subprocess.run(cmd[:5] + ["--config", str(bad), "--out", str(tmp_path / "x")],
                       capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert "augment.n_faces" in p.stderr and "poses.yaw_step" in p.stderr
    assert "Traceback" not in p.stderr
