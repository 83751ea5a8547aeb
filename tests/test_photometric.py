"""Stage 2 as Levenberg-Marquardt (tasks/photometric.py) on synthetic renders of the
procedural model with known truth: its gradient is the energy's (autograd at fixed
fragments), it reaches an energy no higher than Adam's in far fewer renders, and an image's
result does not depend on its batch-mates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks import photometric as P
from facecorpus.tasks.fit import fit_landmarks, refine_photometric, synthetic_batch


def _autograd_energy(sc, q, st, vec, nk, ne):
    """The stage-2 energy of image 0 at ``q + vec`` over ``st``'s fixed fragments, written
    with torch autograd."""
    from facecorpus.renderers import diff
    from facecorpus.renderers.shading import sh_basis_torch

    k = sc.R / sc.S
    nt = q.trans.shape[0]
    d = vec.float()
    o = 3 + nt + (0 if sc.persp else 1)
    qq = P.Params(q.angles + d[:3], q.trans + d[3:3 + nt],
                  q.log_sf + (d[3 + nt] if not sc.persp else 0),
                  torch.cat([q.a_w[:nk] + d[o:o + nk], q.a_w[nk:]]),
                  torch.cat([q.b_w[:ne] + d[o + nk:o + nk + ne], q.b_w[ne:]]),
                  q.sh + d[o + nk + ne:])
    X = P._shape(sc, qq)
    n = diff.vertex_normals(X, sc.tris_t)
    sv = P._project(sc, X, qq.angles, qq.trans, qq.log_sf)
    ys, xs, faces = st.pix
    corners = sc.tris_t[torch.as_tensor(faces)]
    irrc = torch.einsum("pkj,cj->pkc", sh_basis_torch(n[corners] @ P._rot(qq.angles).T),
                        qq.sh.reshape(3, 9))
    col, _, _ = P.pixel_colour(sv[corners] * torch.tensor([k, k, 1.0]), irrc,
                               sc.corner_uv[torch.as_tensor(faces)],
                               torch.as_tensor(xs, dtype=torch.float32) + 0.5,
                               torch.as_tensor(ys, dtype=torch.float32) + 0.5, sc.tex[0],
                               sc.persp)
    r = col - sc.photo[0][torch.as_tensor(ys), torch.as_tensor(xs)]
    lm = ((sv[sc.lm_idx, :2] - sc.lm[0]) / sc.S) ** 2
    return (torch.sqrt(r ** 2 + sc.eps ** 2).sum() / len(ys)
            + sc.w_landmarks * 1e3 * lm.sum(-1).mean()
            + sc.w_prior * ((qq.a_w ** 2).sum() + (qq.b_w ** 2).sum()))


def _one_face_state(model, camera):
    """The stage-2 Scene, start parameters and evaluated state of one synthetic face after
    stage 1 (128 px photo, photometric term at 96 px)."""
    from facecorpus.renderers.raster import rasterize

    sb = synthetic_batch(model, 1, 128, seed=3, noise_px=1.0, camera=camera)
    opts = FitConfig(camera=camera, slide_min_yaw=90, photometric_render_size=96)
    fit = fit_landmarks(model, sb.noisy_landmarks, 128, opts)
    sc, p = P.build(model, fit, sb.image, sb.mask, sb.uv_texture[None], sb.noisy_landmarks,
                    opts)
    q = p.row(0)
    geo = P._geometry(sc, q)
    k = sc.R / sc.S
    p2f = rasterize((geo[2] * torch.tensor([k, k, 1.0]))[None].numpy(), sc.tris, sc.R, sc.R,
                    perspective_correct=sc.persp).pix_to_face[0]
    return sc, q, P._evaluate(sc, 0, q, *geo, p2f)


@pytest.mark.parametrize("camera", ["orthographic", "perspective"])
def test_lm_gradient_is_the_energy_gradient(model, camera):
    """The closed-form Jacobian (per-vertex x per-pixel pieces, gradient pulled back through
    the vertices) gives the autograd gradient of the energy, every parameter kind."""
    sc, q, st = _one_face_state(model, camera)
    nk, ne = 4, 3
    _, g = P._normal_equations(sc, 0, q, st, nk, ne, stride=2)
    vec = torch.zeros(len(g), dtype=torch.float64, requires_grad=True)
    e = _autograd_energy(sc, q, st, vec, nk, ne)
    assert abs(e.item() - st.energy) < 1e-5 * st.energy
    e.backward()
    ga = vec.grad
    err = (g - ga).abs() / (ga.abs() + 1e-3 * ga.abs().max())
    assert err.max() < 1e-3, (g, ga)
    assert (ga.abs() > 1e-6).sum() > 0.8 * len(ga)  # a real check: most entries non-zero


def test_lm_pixel_subset_gradient_is_the_subset_energy_gradient(model):
    """``pixel_stride`` 2: the gradient is the autograd gradient of the energy over the
    masked pixels on the stride-2 grid only (a real subset: not the all-pixel gradient)."""
    from dataclasses import replace

    sc, q, st = _one_face_state(model, "orthographic")
    ys, xs, faces = st.pix
    keep = (ys % 2 == 0) & (xs % 2 == 0)
    sub = replace(st, pix=(ys[keep], xs[keep], faces[keep]))
    nk, ne = 4, 3
    _, g = P._normal_equations(sc, 0, q, st, nk, ne, stride=1, pixel_stride=2)
    _, g_all = P._normal_equations(sc, 0, q, st, nk, ne, stride=1)
    vec = torch.zeros(len(g), dtype=torch.float64, requires_grad=True)
    _autograd_energy(sc, q, sub, vec, nk, ne).backward()
    ga = vec.grad
    err = (g - ga).abs() / (ga.abs() + 1e-3 * ga.abs().max())
    assert err.max() < 1e-3, (g, ga)
    assert ((g_all - ga).abs() / (ga.abs() + 1e-3 * ga.abs().max())).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("camera", ["orthographic", "perspective"])
def test_lm_energy_not_above_adam(model, camera):
    """On synthetic faces LM (run to a tight tolerance, 1e-6: each image stops on its own,
    in fewer renders than Adam's 41) ends at an energy no higher than Adam's 40 steps, per
    image, and still beats stage 1 on the truth. (The coarse procedural mesh converges slower than ICT-FaceKit,
    where 6 iterations already end below Adam: docs/benchmarks.md, "Stage 2 LM convergence".)"""
    from facecorpus.tasks.fit import rotation_error_deg

    sb = synthetic_batch(model, 3, 128, seed=9, noise_px=1.0, camera=camera)
    base = FitConfig(camera=camera, slide_min_yaw=90, photometric_render_size=96)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, base)
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    out, e = {}, {}
    for solver, iters in (("adam", 40), ("lm", 40)):
        opts = base.model_copy(update={"photometric_solver": solver, "photometric_iters": iters,
                                       "photometric_tol": 1e-6})
        out[solver] = refine_photometric(model, fit1, sb.image, sb.mask, albedo,
                                         sb.noisy_landmarks, opts)
        e[solver] = P.energy(model, out[solver], sb.image, sb.mask, albedo,
                             sb.noisy_landmarks, opts)
    e0 = P.energy(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks, base)
    assert np.isfinite(e["lm"]).all() and (e["lm"] < e0).all()
    assert (e["lm"] <= e["adam"] * (1 + 1e-3)).all(), (e["lm"], e["adam"])
    assert (out["lm"].iterations - fit1.iterations < 40).all()  # stopped on its own
    assert all(f is None for f in out["lm"].failure)
    assert np.median(rotation_error_deg(out["lm"], sb.truth)) < 2.0


@pytest.mark.slow
def test_lm_does_not_depend_on_batch_mates(model):
    """Image 0 refined alone, with other faces, and next to a garbage photo: the same
    parameters and iteration count."""
    sb = synthetic_batch(model, 3, 128, seed=5, noise_px=1.0)
    opts = FitConfig(slide_min_yaw=90, photometric_render_size=64, photometric_solver="lm",
                     photometric_iters=6)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, opts)
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    noise = np.random.default_rng(0).integers(0, 256, sb.image[0].shape, dtype=np.uint8)

    def run(idx, image_override=None):
        imgs = sb.image[idx].copy()
        if image_override is not None:
            imgs[image_override] = noise
        return refine_photometric(model, fit1.select(idx), imgs, sb.mask[idx], albedo[idx],
                                  sb.noisy_landmarks[idx], opts)

    alone = run([0])
    runs = [(run([0, 1, 2]), 0), (run([2, 0]), 1), (run([1, 0], image_override=0), 1)]
    for other, j in runs:
        for name in ("yaw", "pitch", "roll", "translation", "scale", "alpha", "beta", "sh",
                     "photometric_error"):
            np.testing.assert_allclose(getattr(other, name)[j], getattr(alone, name)[0],
                                       rtol=1e-5, atol=1e-6, err_msg=name)
        assert other.iterations[j] == alone.iterations[0]
    assert alone.iterations[0] - fit1.iterations[0] > 1  # it really iterated


def test_extension_is_the_parabola_minimiser():
    """The step length after an accepted LM step: the exact minimiser on a parabola whose
    full step lands short (the IRLS model's case), clipped to [1, max_scale]; 1 when the
    full step already passed the minimum; no NaN out of a non-finite trial."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        e0, c = rng.uniform(0.1, 1.0), rng.uniform(1e-3, 1.0)
        a_star = rng.uniform(0.2, 5.0)
        s = -2 * c * a_star  # E(a) = e0 + s a + c a^2, minimum at a_star
        a = P.extension(e0, s, e0 + s + c, 4.0)
        assert a == pytest.approx(min(max(a_star, 1.0), 4.0), rel=1e-9)
    assert P.extension(1.0, -1.0, 0.2, 3.0) == pytest.approx(2.5)  # minimum of 1 - a + 0.2 a^2
    assert P.extension(1.0, -1.0, -0.1, 3.0) == 3.0  # below the tangent: concave, go far
    assert P.extension(1.0, -1.0, float("nan"), 3.0) == 1.0
    assert P.extension(1.0, 0.5, 0.9, 3.0) == 1.0  # not a descent direction


@pytest.mark.slow
def test_lm_extension_lowers_the_energy_at_few_iterations(model):
    """On synthetic faces at 3 iterations, the extension ends no higher than plain LM on
    every image and lower on average (the steps it lengthens are kept only if lower)."""
    sb = synthetic_batch(model, 3, 128, seed=9, noise_px=1.0)
    base = FitConfig(slide_min_yaw=90, photometric_render_size=96, photometric_solver="lm",
                     photometric_iters=3, photometric_tol=1e-7)
    fit1 = fit_landmarks(model, sb.noisy_landmarks, 128, base)
    albedo = np.repeat(sb.uv_texture[None], 3, 0)
    e = {}
    for mx in (1.0, 2.0):
        opts = base.model_copy(update={"photometric_max_extension": mx})
        r = refine_photometric(model, fit1, sb.image, sb.mask, albedo, sb.noisy_landmarks, opts)
        e[mx] = P.energy(model, r, sb.image, sb.mask, albedo, sb.noisy_landmarks, opts)
    print(e)
    assert np.isfinite(e[2.0]).all()
    assert (e[2.0] <= e[1.0] * (1 + 1e-3)).all(), e
    assert e[2.0].mean() < e[1.0].mean(), e


def test_fast_kernels_are_bit_for_bit_the_torch_expressions(model):
    """The #12 speed-ups promise unchanged LM results: each kernel equals, to the bit, the
    torch expression it replaced (LM's path moves ~1e-5 relative in energy under rounding-
    level changes, so "close" is not enough). On the procedural model with random modes."""
    g = torch.Generator().manual_seed(3)
    tris = np.asarray(model.triangles, np.int64)
    K, E = 6, 4
    sc = P.Scene(*([None] * 6), torch.as_tensor(model.vertices, dtype=torch.float32),
                 torch.randn(K, model.n_vertices, 3, generator=g),
                 torch.randn(E, model.n_vertices, 3, generator=g),
                 torch.rand(K, generator=g) + 0.5, torch.rand(E, generator=g) + 0.5,
                 *([None] * 2), 0, 0, False, 0.0, 0.0, 0.0)
    sc.tris = tris
    m = K + E
    rows = sc.basis_rows(slice(None), K, E)
    used = torch.as_tensor(np.unique(tris[: len(tris) // 3]))
    gx = torch.randn(len(used), 3, generator=g)
    assert torch.equal(sc.mode_pullback(gx, used, K, E),
                       torch.einsum("uj,ujm->m", gx, rows[used]))
    ip = torch.randint(0, len(used), (50, 3), generator=g)
    assert torch.equal(P._take(rows[used], ip), rows[used][ip])
    # the normals' mode derivative against the torch loop it replaced
    X = sc.mean + 0.1 * torch.randn(model.n_vertices, 3, generator=g)
    u = used.numpy()
    loc = np.full(model.n_vertices, -1)
    loc[u] = np.arange(len(u))
    tri = tris[(loc[tris] >= 0).any(1)]
    t = torch.as_tensor(tri)
    a, b, c = X[t[:, 0]], X[t[:, 1]], X[t[:, 2]]
    lv = loc[tri]
    dacc = torch.zeros(len(u), 3, m)
    for f in range(len(tri)):
        du = rows[tri[f, 1]] - rows[tri[f, 0]]
        dw = rows[tri[f, 2]] - rows[tri[f, 0]]
        e1, e2 = b[f] - a[f], c[f] - a[f]
        d = torch.stack([du[1] * e2[2] - du[2] * e2[1] + e1[1] * dw[2] - e1[2] * dw[1],
                         du[2] * e2[0] - du[0] * e2[2] + e1[2] * dw[0] - e1[0] * dw[2],
                         du[0] * e2[1] - du[1] * e2[0] + e1[0] * dw[1] - e1[1] * dw[0]])
        for v in lv[f]:
            if v >= 0:
                dacc[v] += d
    acc = torch.zeros(len(u), 3)
    fn = torch.linalg.cross(b - a, c - a, dim=-1)
    for k in range(3):
        ok = torch.as_tensor(lv[:, k] >= 0)
        acc.index_add_(0, torch.as_tensor(lv[:, k])[ok], fn[ok])
    nrm = acc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = acc / nrm
    want = (dacc - n[:, :, None] * torch.einsum("ud,udm->um", n, dacc)[:, None]) / nrm[..., None]
    assert torch.equal(P._dnormals(sc, X, u, K, E), want)
