"""The batched torch Poisson solver (CPU tensors here; the same code runs on CUDA): it solves
the CPU solver's discrete system (checked with the independent ``poisson_residual``), per map
independently of the batch, with pure-Neumann parts, mixed gradients, empty masks and
non-finite inputs handled per map."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.meshops.poisson import poisson_blend, poisson_residual, two_pass_blend
from facecorpus.meshops.poisson_torch import poisson_blend_torch

S = 64


def _scene(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    masks = []
    for k in range(n):
        m = ((xx - 32 - 2 * k) ** 2 / 22 ** 2 + (yy - 30) ** 2 / 25 ** 2) < 1
        m &= ~(((xx - 26) ** 2 + (yy - 24) ** 2) < 5 ** 2)  # a hole
        m |= (xx > 2) & (xx < 8) & (yy > 50) & (yy < 60)  # a second part
        masks.append(m)
    t = (rng.random((n, S, S, 3)) * 0.2 + 0.4).astype(np.float32)
    s = rng.random((n, S, S, 3)).astype(np.float32)
    return t, s, np.stack(masks)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("precond", ["mg", "jacobi"])
def test_solves_the_same_system_as_the_cpu_solver(mixed, precond):
    t, s, m = _scene(3)
    out, info = poisson_blend_torch(t, s, m, mixed=mixed, precond=precond, return_info=True)
    ref = poisson_blend(t, s, m, mixed=mixed)
    for k in range(3):
        assert poisson_residual(out[k], t[k], s[k], m[k], mixed=mixed) <= 1e-5
        assert info[k]["converged"] and info[k]["failure"] is None
        assert (out[k][~m[k]] == t[k][~m[k]]).all()  # outside Ω: exactly the target
    assert np.abs(out - ref).max() < 2e-3  # both within tol of the one solution


def test_source_mask_and_two_pass_share_the_equations():
    t, s, m = _scene(2, seed=1)
    g = m.copy()
    out = poisson_blend_torch(t, s, m, source_mask=g)
    for k in range(2):
        assert poisson_residual(out[k], t[k], s[k], m[k], source_mask=g[k]) <= 1e-5
    mirror = np.stack(np.mgrid[:S, :S], -1)[:, ::-1].astype(np.int32).copy()
    mirror[..., 0] = np.arange(S)[:, None]
    mirror[..., 1] = S - 1 - np.arange(S)[None, :]
    a, src_a = two_pass_blend(s, m, t, mirror)
    b, src_b = two_pass_blend(s, m, t, mirror, solver=poisson_blend_torch)
    assert (src_a == src_b).all() and np.abs(a - b).max() < 2e-3


def test_each_map_is_independent_of_its_batch():
    t, s, m = _scene(4, seed=2)
    together = poisson_blend_torch(t, s, m)
    for k in range(4):
        alone = poisson_blend_torch(t[k], s[k], m[k])
        np.testing.assert_array_equal(alone, together[k])


def test_pure_neumann_part_matches_the_target_mean():
    t, s, _ = _scene(1, seed=3)
    full = np.ones((S, S), bool)  # no texel outside Ω: defined up to a constant
    out = poisson_blend_torch(t[0], s[0], full)
    assert poisson_residual(out, t[0], s[0], full) <= 1e-5
    np.testing.assert_allclose(out.mean((0, 1)), t[0].mean((0, 1)), atol=1e-5)
    # a solution of a pure-Neumann part is source + c
    d = out - s[0]
    assert np.abs(d - d.mean((0, 1))).max() < 1e-3


def test_empty_mask_and_non_finite_inputs_stay_per_map():
    t, s, m = _scene(3, seed=4)
    m[1] = False
    s[2, 30, 30] = np.nan  # inside Ω of map 2
    out, info = poisson_blend_torch(t, s, m, return_info=True)
    np.testing.assert_array_equal(out[1], t[1])
    assert info[1]["converged"] and info[1]["iterations"] == 0
    assert info[2]["failure"] == "non-finite input" and not info[2]["converged"]
    assert np.isnan(out[2][m[2]]).all() and (out[2][~m[2]] == t[2][~m[2]]).all()
    assert info[0]["converged"]
    assert poisson_residual(out[0], t[0], s[0], m[0]) <= 1e-5  # the batch still solved


def test_bad_arguments_raise():
    t, s, m = _scene(1)
    with pytest.raises(ValueError):
        poisson_blend_torch(t, s, m, precond="ilu")
    with pytest.raises(ValueError):
        poisson_blend_torch(t[:, :32], s, m)


def test_blend_config_selects_the_solver_and_checks_the_device():
    import torch
    from facecorpus.configs import load_config, parse_set
    from facecorpus.core.errors import ConfigError
    from facecorpus.tasks.blend import blend_batch, solver_for

    cfg = load_config(None, "pseudo_gt", parse_set(["blend.solver=torch"]))
    assert solver_for(cfg.blend) is not None and solver_for(load_config(
        None, "pseudo_gt", None).blend) is None
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            load_config(None, "pseudo_gt", parse_set(["blend.solver=torch",
                                                      "blend.device=cuda"]))
    with pytest.raises(ConfigError):
        load_config(None, "pseudo_gt", parse_set(["blend.device=tpu"]))
    t, s, m = _scene(2, seed=5)
    mirror = np.zeros((S, S, 2), np.int32)
    mirror[..., 0] = np.arange(S)[:, None]
    mirror[..., 1] = S - 1 - np.arange(S)[None, :]
    a = blend_batch(s, m, t, mirror)
    b = blend_batch(s, m, t, mirror, solver=solver_for(cfg.blend))
    assert (a.uv_source == b.uv_source).all()
    assert np.abs(a.uv_pseudo_gt - b.uv_pseudo_gt).max() < 2e-3


def test_gpu_benchmark_script_runs_on_any_machine():
    """benchmarks/bench_gpu.py is the one script a GPU session runs: it must work as is."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    r = subprocess.run([sys.executable, str(script), "--n", "2", "--size", "64",
                        "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch vs seamlessClone per map" in r.stdout and "residual" in r.stdout
