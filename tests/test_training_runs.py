"""training: real runs on small generated datasets written with the datasets store.

Each task's validation loss must fall to at most half its initial value; a resumed run must
reproduce an uninterrupted one bit for bit on CPU; the CLI trains and predicts; DDP (gloo, 2
processes) matches a single process with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from facecorpus.configs.train import TrainConfig
from facecorpus.core.errors import InputError
from facecorpus.training import losses as L
from facecorpus.training.synthetic import write_synthetic
from facecorpus.training.trainer import Trainer, load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from intra-op threads, and on a shared, busy machine OpenMP
    threads that spin against other processes make each conv ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = {"model": {"width": 8, "depth": 2}, "batch_size": 8, "num_workers": 0, "device": "cpu",
        "warmup_steps": 0, "lr": 3e-3, "log_every": 10}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return {t: write_synthetic(str(root / t), t, n=80, size=32, seed=1)
            for t in ("pncc", "inpaint", "position")}


def _val(history):
    return [r for r in history if r["split"] == "val"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pncc", "inpaint", "position"])
def test_training_halves_validation_loss(task, datasets, tmp_path):
    loss = {"symmetry": 0.1, "tv": 0.01} if task == "inpaint" else {}
    cfg = TrainConfig(task=task, steps=200, val_every=100, checkpoint_every=0, sample_every=0,
                      loss=loss, **TINY)
    out = tmp_path / "run"
    hist = Trainer(cfg, datasets[task], out).fit()
    val = _val(hist)
    assert [v["step"] for v in val] == [0, 100, 200]
    assert val[-1]["loss"] <= 0.5 * val[0]["loss"], val
    assert val[-1]["loss_l1"] <= 0.5 * val[0]["loss_l1"], val
    # outputs: metrics log mirrors the history, a sample sheet and a checkpoint exist
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == hist
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["step"] == 200 and 0 <= train[-1]["data_wait_frac"] < 1
    assert (out / "samples" / "step_0000200.png").stat().st_size > 0
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["step"] == 200 and ck["task"] == task


def _train_losses(hist, after=0):
    return [(r["step"], r["loss"]) for r in hist if r["split"] == "train" and r["step"] > after]


class CountingHook(L.LossHook):
    """A user-defined hook: mean prediction brightness (pulls outputs darker)."""

    name = "dark"

    def __init__(self, weight):
        super().__init__(weight)
        self.calls = 0

    def forward(self, pred, target, batch):
        self.calls += 1
        return pred.mean().abs()


def test_resume_is_bit_identical(tmp_path):
    """Run 24 steps; resume a second trainer from the step-10 checkpoint, into the same
    folder and with 2 loader workers: every later loss and every final weight is identical,
    with both loss hooks and a user hook on (the discriminator's state is in the checkpoint)."""
    data = write_synthetic(str(tmp_path / "data"), "inpaint", n=40, size=16, seed=2)
    kw = dict(task="inpaint", steps=24, val_every=10, checkpoint_every=10, sample_every=0,
              loss={"symmetry": 0.1, "tv": 0.01, "adversarial": 0.05, "perceptual": 0.1},
              **{**TINY, "log_every": 1})
    out = tmp_path / "run"
    a = Trainer(TrainConfig(**kw), data, out, hooks=[CountingHook(0.01)])
    hist_a = a.fit()
    assert a.hooks[-1].calls == 24
    assert {"loss_adversarial", "loss_perceptual", "loss_dark", "loss_discriminator"} <= set(hist_a[1])
    kw["num_workers"] = 2
    b = Trainer(TrainConfig(**kw), data, out, hooks=[CountingHook(0.01)])
    hist_b = b.fit(resume=out / "checkpoints" / "step_0000010.pt")
    assert _train_losses(hist_b) == _train_losses(hist_a, after=10)
    for (k, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    da, db = a.hooks[0].discriminator.state_dict(), b.hooks[0].discriminator.state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)
    # the log was cut back to the checkpoint, then continued: each step exactly once
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 25))
    assert [r["step"] for r in recs if r["split"] == "val"] == [0, 10, 20, 24]


def test_cli_train_predict(datasets, tmp_path):
    from facecorpus.cli import main

    cfg = tmp_path / "small.yaml"
    cfg.write_text("batch_size: 8\nmodel: {width: 4, depth: 2}\nval_every: 0\nwarmup_steps: 0\n"
                   "checkpoint_every: 0\nsample_every: 0\nlog_every: 2\n")
    out = tmp_path / "run"
    rc = main(["train", "position", "--data", datasets["position"], "--device", "cpu", "--config",
               str(cfg), "--out", str(out), "--steps", "4", "--workers", "0"])
    assert rc == 0
    ck = out / "checkpoints" / "last.pt"
    rc = main(["train", "position", "--data", datasets["position"], "--device", "cpu", "--config",
               str(cfg), "--out", str(out), "--steps", "6", "--workers", "0", "--resume", "auto"])
    assert rc == 0 and load_checkpoint(ck)["step"] == 6

    # predict over the dataset's validation split: PNG + float .npy in stored units (mm)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ck), "--data", datasets["position"], "--out",
                 str(pred), "--limit", "3", "--device", "cpu"]) == 0
    pngs = sorted(pred.glob("*.position.png"))
    assert len(pngs) == 3 and pngs[0].name.startswith("syn-position-")
    pos = np.load(min(pred.glob("*.position.npy")), allow_pickle=False)
    assert pos.shape == (32, 32, 3) and pos.dtype == np.float32
    assert -60 < pos.mean() < 90  # the synthetic targets span [-40, 80] mm

    # predict over an image folder, one file corrupt: it is rejected, the rest written
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    pred2 = tmp_path / "pred2"
    assert main(["predict", "--checkpoint", str(ck), "--images", str(imgs), "--out", str(pred2)]) == 0
    assert sorted(p.name for p in pred2.glob("*.png")) == ["im0.position.png", "im1.position.png"]
    rej = [json.loads(s) for s in (pred2 / "rejected.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and "broken.jpg" in rej[0]["reason"]

    # user errors: exit status 2 with a message, no traceback
    assert main(["train", "pncc", "--data", datasets["position"], "--device", "cpu"]) == 2
    assert main(["predict", "--checkpoint", str(imgs / "im0.png"), "--images", str(imgs),
                 "--out", str(pred2)]) == 2


def test_bad_inputs(datasets, tmp_path):
    cfg = TrainConfig(task="pncc", steps=2, **TINY)
    with pytest.raises(InputError, match="no field"):
        Trainer(cfg, datasets["inpaint"], tmp_path)
    no_split = {**cfg.model_dump(), "train_filter": [{"column": "split", "value": "nope"}]}
    with pytest.raises(InputError, match="selects no samples"):
        Trainer(TrainConfig.model_validate(no_split), datasets["pncc"], tmp_path)
    bad_col = cfg.model_dump()
    bad_col["train_filter"] = [{"column": "no_such_column", "value": 1}]
    with pytest.raises(InputError):
        Trainer(TrainConfig.model_validate(bad_col), datasets["pncc"], tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def run_small_pncc(root: str, out: str, batch_size: int) -> None:
    """4 steps of a tiny pncc run; saves this rank's final weights as OUT/model_rank<r>.pt.
    Run in-process (1 process) and by torchrun (2 processes, see _DDP_SCRIPT)."""
    cfg = TrainConfig(task="pncc", steps=4, batch_size=batch_size, num_workers=0, device="cpu",
                      lr=3e-3, warmup_steps=0, val_every=2, checkpoint_every=0, sample_every=0,
                      log_every=1, model={"width": 4, "depth": 2})
    t = Trainer(cfg, root, out)
    t.fit()
    torch.save(dict(t.model.state_dict()), f"{out}/model_rank{t.dist.rank}.pt")


_DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_training_runs import run_small_pncc
run_small_pncc(sys.argv[1], sys.argv[2], int(sys.argv[3]))
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one(datasets, tmp_path):
    """torchrun, 2 CPU processes (gloo) x batch 4 == 1 process x batch 8: same samples per
    step (rank r takes every 2nd sample of the epoch order), averaged gradients."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    run_small_pncc(datasets["pncc"], str(tmp_path / "one"), 8)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(script),
                        datasets["pncc"], str(tmp_path / "two"), "4"],
                       check=False, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "model_rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "two" / "model_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two" / "model_rank1.pt", weights_only=True)
    for k in one:
        assert torch.equal(r0[k], r1[k]), k  # ranks in lock-step
        assert torch.allclose(one[k], r0[k], atol=2e-4, rtol=1e-3), k
    # validation losses are reduced over both ranks' shards: equal to the single process's
    v1 = [json.loads(s) for s in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    v2 = [json.loads(s) for s in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    l1 = [r["loss"] for r in v1 if r["split"] == "val"]
    l2 = [r["loss"] for r in v2 if r["split"] == "val"]
    assert l1[0] == pytest.approx(l2[0], rel=1e-5) and l1[-1] == pytest.approx(l2[-1], rel=1e-3)
    assert load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["world_size"] == 2


def test_predict_inpaint_rgba_images(tmp_path):
    """An RGBA UV map: alpha 0 marks holes; the network gets the masked map + its mirror."""
    from facecorpus.training.data import TensorSource
    from facecorpus.training.predict import Predictor, load_image_input, predict_images
    from facecorpus.training.synthetic import make_synthetic
    from PIL import Image

    arrays, manifest = make_synthetic("inpaint", n=24, size=16)
    cfg = TrainConfig(task="inpaint", steps=2, val_every=0, checkpoint_every=0, sample_every=0,
                      **{**TINY, "model": {"width": 4, "depth": 2}})
    out = tmp_path / "run"
    Trainer(cfg, TensorSource(arrays, manifest), out).fit()
    pred = Predictor(out / "checkpoints" / "last.pt", "cpu")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = arrays["uv_pseudo_gt"][0]
    rgba[..., 3] = arrays["uv_visible_mask"][0] * 255
    imgs = tmp_path / "uv"
    imgs.mkdir()
    Image.fromarray(rgba).save(imgs / "face.png")
    x = load_image_input(imgs / "face.png", pred)
    assert np.array_equal(x["uv_visible_mask"][0], arrays["uv_visible_mask"][0])
    # the prediction from the file equals the prediction from the dataset arrays
    direct = pred.predict({"uv_visible": arrays["uv_visible"][:1],
                           "uv_visible_mask": arrays["uv_visible_mask"][:1]})
    assert np.allclose(pred.predict(x), direct, atol=1e-3)  # uint8 units (0..255)
    rep = predict_images(pred, imgs, tmp_path / "pred")
    assert [os.path.basename(p) for p in rep.written] == ["face.inpaint.png"]
    assert np.asarray(Image.open(rep.written[0])).shape == (16, 16, 3)


def test_position_with_smaller_uint8_uv_map(tmp_path):
    """uv_position stored as uint8 at a UV size (16²) other than the image size (32²)."""
    from facecorpus.training.data import TensorSource
    from facecorpus.training.predict import Predictor
    from facecorpus.training.synthetic import make_synthetic

    arrays, manifest = make_synthetic("position", n=24, size=32)
    pos = arrays.pop("uv_position").astype(np.float32)[:, ::2, ::2]
    arrays["uv_position"] = np.clip((pos + 40) * 2, 0, 255).astype(np.uint8)
    cfg = TrainConfig(task="position", steps=3, val_every=0, checkpoint_every=0, sample_every=0,
                      **{**TINY, "model": {"width": 4, "depth": 2}})
    out = tmp_path / "run"
    t = Trainer(cfg, TensorSource(arrays, manifest), out)
    t.fit()
    assert float(t.norm["uv_position"].scale.flatten()[0]) == 255.0  # uint8: /255, not mean/std
    p = Predictor(out / "checkpoints" / "last.pt", "cpu")
    y = p.predict({"image": arrays["image"][:2]})
    assert y.shape == (2, 16, 16, 3)
    assert (out / "samples" / "step_0000003.png").is_file()


def test_join_views_with_faces(tmp_path, caplog):
    """position on the synthesis layout: image per view in one dataset, uv_position per face
    in another, matched by views.subject_id == faces.sample_id (rows without a face dropped)."""
    from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec
    from facecorpus.training.data import open_split

    n_faces, poses = 6, 3
    fw = DatasetWriter(str(tmp_path / "faces"), DatasetSchema(
        {"uv_position": FieldSpec((8, 8, 3), "float32", "mm")}, samples_per_shard=4, samples_per_chunk=2))
    vw = DatasetWriter(str(tmp_path / "views"), DatasetSchema(
        {"image": FieldSpec((16, 16, 3), "uint8", "srgb")}, samples_per_shard=8))
    pos = np.arange(n_faces, dtype=np.float32)[:, None, None, None] * np.ones((1, 8, 8, 3), np.float32)
    faces = [{"sample_id": f"f{i}", "split": "train"} for i in range(n_faces)]
    fw.write_shard(0, {"uv_position": pos[:4]}, faces[:4])
    fw.write_shard(1, {"uv_position": pos[4:]}, faces[4:])
    # views of faces 0..6 (face 6 has no uv_position row), face id encoded in the pixels
    ids = np.repeat(np.arange(n_faces + 1), poses)
    img = (ids[:, None, None, None] * 10 * np.ones((1, 16, 16, 3))).astype(np.uint8)
    rows = [{"sample_id": f"f{i}_p{k}", "subject_id": f"f{i}", "split": "train"}
            for i in range(n_faces + 1) for k in range(poses)]
    for s in range(0, len(rows), 8):
        vw.write_shard(s // 8, {"image": img[s:s + 8]}, rows[s:s + 8])

    from facecorpus.configs.train import JoinConfig

    join = JoinConfig(data=str(tmp_path / "faces"))
    with caplog.at_level("WARNING"):
        split = open_split(str(tmp_path / "views"), ("image", "uv_position"), [], join)
    assert "3 of 21 selected rows have no sample_id match" in caplog.text
    assert len(split) == n_faces * poses
    assert split.fields["uv_position"].shape == (8, 8, 3)
    b = split.dataset.__getitems__(list(range(len(split))))
    np.testing.assert_array_equal(b["image"][:, 0, 0, 0] // 10, b["uv_position"][:, 0, 0, 0])
    with pytest.raises(InputError, match="join"):
        open_split(str(tmp_path / "views"), ("image", "uv_position"), [])

    from facecorpus.cli import main

    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 4\nmodel: {width: 4, depth: 2}\nval_filter: []\nval_every: 0\n"
                   "checkpoint_every: 0\nsample_every: 0\nwarmup_steps: 0\n")
    assert main(["train", "position", "--data", str(tmp_path / "views"), "--join",
                 str(tmp_path / "faces"), "--config", str(cfg), "--steps", "2", "--workers", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["target_shape"] == [8, 8, 3]
