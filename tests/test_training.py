"""training: models, mirror op, losses and hooks, normalisation, batch order, filters, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.configs.train import FilterSpec, TrainConfig
from facecorpus.core.errors import ConfigError, InputError
from facecorpus.training import losses as L
from facecorpus.training.data import FieldInfo, Normalizer, StepBatchSampler, TensorSource
from facecorpus.training.models import TaskNet, UNet, UVMirror
from facecorpus.training.synthetic import make_synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from intra-op threads, and on a shared, busy machine OpenMP
    threads that spin against other processes make each conv ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("hw", [(32, 32), (30, 22), (17, 40)])
def test_unet_any_size_and_gradients(hw):
    torch.manual_seed(0)
    net = UNet(3, 5, width=4, depth=3)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 5, *hw)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_uv_mirror_flip_index_and_coords_agree():
    x = torch.randn(2, 3, 8, 8)
    flip = UVMirror()(x)
    assert torch.equal(flip, torch.flip(x, dims=(-1,)))
    idx = UVMirror.flip_index(8)
    assert torch.equal(UVMirror(idx)(x), flip)
    coords = torch.stack(torch.meshgrid(torch.arange(8), 7 - torch.arange(8), indexing="ij"), -1)
    assert torch.equal(UVMirror(coords)(x), flip)
    assert torch.equal(UVMirror(idx)(UVMirror(idx)(x)), x)  # an involution


def test_uv_mirror_custom_layout():
    # an asymmetric layout: the mirror of texel (r, c) is (c, r) (transpose)
    r, c = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    m = UVMirror(c * 6 + r)
    x = torch.randn(1, 2, 6, 6)
    assert torch.equal(m(x), x.transpose(-1, -2))
    with pytest.raises(ValueError, match="does not match"):
        m(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="outside"):
        UVMirror(torch.full((4, 4), 16))
    # -1 (no mirror / outside the layout, as meshops.uv.uv_mirror_map writes): the texel itself
    coords = torch.stack([r, 5 - c], -1).int()
    coords[0, 0] = -1
    y = UVMirror(coords)(x)
    assert torch.equal(y[..., 0, 0], x[..., 0, 0]) and torch.equal(y[..., 1:, :], x.flip(-1)[..., 1:, :])
    with pytest.raises(ValueError, match="integer"):
        UVMirror(torch.zeros(4, 4))


def test_uv_mirror_from_file(tmp_path):
    p = tmp_path / "mirror.npy"
    np.save(p, UVMirror.flip_index(8).numpy().astype(np.int32))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(UVMirror.from_file(p)(x), torch.flip(x, dims=(-1,)))
    np.savez(tmp_path / "regions.npz", mirror_map=np.stack(np.meshgrid(
        np.arange(8), 7 - np.arange(8), indexing="ij"), -1).astype(np.int32), layout=np.ones((8, 8)))
    assert torch.equal(UVMirror.from_file(tmp_path / "regions.npz")(x), torch.flip(x, dims=(-1,)))
    with pytest.raises(InputError, match="no array 'nope'"):
        UVMirror.from_file(tmp_path / "regions.npz", key="nope")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(InputError, match="bad.npy"):
        UVMirror.from_file(bad)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):  # object arrays would need pickle
        UVMirror.from_file(tmp_path / "obj.npy")


def test_inpaint_net_sees_masked_map_and_its_mirror():
    r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    mirror = UVMirror(c * 8 + r)
    net = TaskNet("inpaint", width=4, depth=2, mirror=mirror)
    vis = torch.rand(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    x = net.assemble({"uv_visible": vis, "uv_visible_mask": mask})
    assert x.shape == (2, 6, 8, 8)
    assert torch.equal(x[:, :3], vis * mask)
    assert torch.equal(x[:, 3:], (vis * mask).transpose(-1, -2))
    assert net({"uv_visible": vis, "uv_visible_mask": mask}).shape == (2, 3, 8, 8)


def test_position_net_resizes_to_uv_size():
    net = TaskNet("position", width=4, depth=2, out_size=(24, 24))
    assert net({"image": torch.rand(1, 3, 32, 32)}).shape == (1, 3, 24, 24)


def test_loss_terms():
    a = torch.rand(2, 3, 8, 8)
    sym = torch.cat([a[..., :4], torch.flip(a[..., :4], dims=(-1,))], dim=-1)
    assert L.symmetry(sym, UVMirror()) == 0
    assert L.symmetry(a, UVMirror()) > 0
    assert L.total_variation(torch.full((1, 3, 8, 8), 0.3)) == 0
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    assert torch.isclose(L.total_variation(ramp), torch.tensor(1.0))
    assert torch.isclose(L.l1(a, a + 0.25), torch.tensor(0.25))


def test_perceptual_hook_is_a_real_loss():
    hook = L.PerceptualLoss(1.0)
    t = torch.rand(2, 3, 16, 16)
    assert hook(t, t, {}) == 0
    p = t.clone().requires_grad_(True)
    v = hook(p + 0.1 * torch.randn_like(t), t, {})
    assert v > 0
    v.backward()
    assert p.grad.abs().sum() > 0
    assert all(q.grad is None for q in hook.features.parameters())  # frozen extractor
    # seeded: two instances give the same value (so resume stays exact without saving it)
    assert L.PerceptualLoss(1.0)(p.detach() * 0.5, t, {}) == hook(p.detach() * 0.5, t, {})


def test_adversarial_hook_trains_discriminator_only_in_step():
    torch.manual_seed(0)
    hook = L.AdversarialLoss(1.0, in_channels=3, width=8)
    before = [q.detach().clone() for q in hook.discriminator.parameters()]
    fake = torch.rand(4, 3, 16, 16, requires_grad=True)
    real = torch.rand(4, 3, 16, 16) * 0.2
    g = hook(fake, real, {})
    g.backward()
    assert fake.grad.abs().sum() > 0
    assert all(q.grad is None for q in hook.discriminator.parameters())  # generator pass
    d_losses = [hook.step(fake, real, {})["loss_discriminator"] for _ in range(30)]
    assert d_losses[-1] < d_losses[0]  # the critic learns to tell them apart
    assert any(not torch.equal(a, b) for a, b in zip(before, hook.discriminator.parameters(), strict=True))
    state = hook.hook_state()
    other = L.AdversarialLoss(1.0, in_channels=3, width=8)
    other.load_hook_state(state)
    assert torch.equal(other(fake, real, {}), hook(fake, real, {}))


def test_normalizer_roundtrip():
    x = torch.from_numpy((np.random.default_rng(0).normal(50, 20, (4, 8, 8, 3))).astype(np.float16))
    info = FieldInfo((8, 8, 3), "float16")
    n = Normalizer.fit(info, x)
    z = n.to_model(x)
    assert z.shape == (4, 3, 8, 8)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    assert torch.allclose(n.to_data(z), x.float(), atol=1e-3)
    u = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    nu = Normalizer(FieldInfo((4, 4, 3), "uint8"))
    assert torch.allclose(nu.to_model(u), u.permute(0, 3, 1, 2).float() / 255)
    m = Normalizer(FieldInfo((4, 4), "uint8"), is_mask=True)
    mm = torch.tensor([[[0, 1, 255, 0]] * 4], dtype=torch.uint8)
    assert torch.equal(m.to_model(mm), (mm > 0).float().unsqueeze(1))


def test_step_sampler_resumes_and_shards():
    full = StepBatchSampler(50, 4, seed=3)
    assert full.batches_per_epoch == 12
    it = iter(full)
    seq = [next(it) for _ in range(30)]  # crosses two epoch boundaries
    tail = iter(StepBatchSampler(50, 4, seed=3, start_step=17))
    assert [next(tail) for _ in range(13)] == seq[17:]
    epoch0 = [i for b in seq[:12] for i in b]
    assert len(epoch0) == len(set(epoch0)) == 48  # no repeats in an epoch
    assert seq[:12] != seq[12:24]  # a new order each epoch
    r0 = iter(StepBatchSampler(50, 4, seed=3, rank=0, world=2))
    r1 = iter(StepBatchSampler(50, 4, seed=3, rank=1, world=2))
    a = [i for _ in range(6) for i in next(r0)]
    b = [i for _ in range(6) for i in next(r1)]
    assert not set(a) & set(b) and len(a) == len(b) == 24
    with pytest.raises(InputError, match="fewer than one batch"):
        StepBatchSampler(3, 4, seed=0)


def test_filters_select_splits():
    arrays, manifest = make_synthetic("pncc", n=40, size=8)
    src = TensorSource(arrays, manifest)
    yaw = np.array([m["yaw"] for m in manifest])
    split = np.array([m["split"] for m in manifest])
    tr = src.split(("image", "pncc"), [FilterSpec(column="split", value="train")])
    assert len(tr) == (split == "train").sum() == 30
    f = [FilterSpec(column="split", op="in", value=["train", "val"]),
         FilterSpec(column="yaw", op="abs<=", value=30)]
    sel = src.split(("image",), f)
    assert len(sel) == (np.abs(yaw) <= 30).sum()
    got = {int(sel.dataset[i]["index"]) for i in range(len(sel))}
    assert got == set(np.flatnonzero(np.abs(yaw) <= 30).tolist())
    with pytest.raises(InputError, match="uv_position"):
        src.split(("uv_position",), [])


def test_config_validation():
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(task="pncc", bogus=1)
    with pytest.raises(ValueError, match="list"):
        FilterSpec(column="split", op="in", value="train")
    from facecorpus.training.cli import load_train_config

    for task in ("pncc", "inpaint", "position"):
        cfg = load_train_config(task)
        assert cfg.task == task and cfg.loss.adversarial == 0 and cfg.loss.perceptual == 0
    assert load_train_config("inpaint").loss.symmetry > 0


def test_config_file_errors(tmp_path):
    from facecorpus.training.cli import load_train_config

    p = tmp_path / "c.yaml"
    p.write_text("model: {width: 0}\nsteps: -3\n")
    with pytest.raises(ConfigError) as e:
        load_train_config("pncc", str(p))
    assert "model.width" in str(e.value) and "steps" in str(e.value) and "c.yaml" in str(e.value)
    p.write_text("task: inpaint\n")
    with pytest.raises(ConfigError, match="does not match"):
        load_train_config("pncc", str(p))
    p.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_train_config("pncc", str(p))
    cfg = load_train_config("pncc", None, {"steps": 7, "device": "cpu", "seed": None})
    assert cfg.steps == 7 and cfg.device == "cpu" and cfg.seed == 0


def test_precision_and_device_resolution():
    from facecorpus.training.trainer import resolve_device, resolve_precision

    cuda = torch.device("cuda", 0)  # only the mapping is exercised; no CUDA call is made
    assert resolve_precision("fp16", cuda) is torch.float16
    assert resolve_precision("bf16", cuda) is torch.bfloat16
    assert resolve_precision("fp32", cuda) is None
    cpu = torch.device("cpu")
    assert all(resolve_precision(p, cpu) is None for p in ("auto", "fp32", "bf16", "fp16"))
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")
