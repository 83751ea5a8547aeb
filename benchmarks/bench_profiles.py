"""Profiles: the visible UV region against yaw (#16 item 4).

Synthetic faces (the model rendered with a known texture, ambient light) at yaw 0, +-30,
+-45, +-60, +-75 (pitch/roll from ``synthetic_batch``: within +-15 / +-10 degrees), rendered
directly in the crop camera the pipeline would use (``crop_affine`` of the landmarks: the
same pixels as rendering large and cropping, without a resampling step).

**Truly visible** texels (the reference, from the true mesh and camera, independent of the
crop-resolution z-buffer): the texel's surface point is the one a 4x finer z-buffer kept, its
face is front-facing, it lies in the configured `unwrap.face_region`, and its image point is inside the
true projected face region eroded by ``erode_px`` (the erosion band is excepted).

The pipeline's own steps then run on the render (``tasks.masks.face_mask`` +
``tasks.unwrap.unwrap_one`` with the ``unwrap`` config), in three settings:

- ``true``: true parameters and true (exact-projection) landmarks;
- ``mp-like``: the same with mediapipe-like landmarks: jaw points whose vertex is hidden are
  moved along their image row onto the rendered head's silhouette (where mediapipe puts them);
- ``fit``: the stage-1 fit (``tasks.fit.fit_landmarks``, the default fit config) from the
  mediapipe-like landmarks + 1 px noise, and the oval from those landmarks.

Per yaw: truly visible fraction of the UV layout, recovered = |rec & true| / |true|, false
visible = |rec \\ true| / |true|, the pipeline's visible fraction of the layout, and every lost
texel attributed to the first rule that removes it, in the order the pipeline applies them:
z-buffer/front-facing (``zbuf``), ``min_cos``, the fitted mesh's projected face region
(``region``), the landmark ``oval``, the mask ``erosion``. With the fitted parameters, a
texel lost to ``zbuf``/``region`` is mostly the fit's error (the true-parameter rows show
what the rule itself costs).

    FACECORPUS_ASSETS=/work/shared python benchmarks/bench_profiles.py [--models procedural,ict]
        [--set unwrap.min_cos=0.15 ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

YAWS = (0, 30, 45, 60, 75)
RULES = ("zbuf", "min_cos", "region", "oval", "erosion")


def crop_camera(cam, A: np.ndarray, size: int):
    """The orthographic ``cam`` followed by the crop similarity ``A`` (2, 3): a camera of the
    ``size`` x ``size`` crop (x = cx + s X + tx, y = cy - s Y - ty before the crop)."""
    from facecorpus.renderers.cameras import Camera

    k, ox, oy = float(A[0, 0]), float(A[0, 2]), float(A[1, 2])
    c0, c1 = cam.cx, cam.cy
    tx = k * (c0 + cam.translation[0]) + ox - size / 2
    ty = -(k * (c1 - cam.translation[1]) + oy - size / 2)
    return Camera.orthographic(size, size, k * cam.scale, rotation=cam.rotation,
                               translation=(tx, ty))


def mediapipe_like(model, v, cam, lm: np.ndarray, head_mask: np.ndarray) -> np.ndarray:
    """(68, 2) landmarks with every hidden jaw point (0-16) moved along its row onto the head's
    silhouette on its own side: mediapipe's face-oval points follow the visible outline."""
    from facecorpus.renderers.render import rasterize_views

    frags, _ = rasterize_views(v, model.triangles, cam)
    p = cam.project(v[model.landmarks].astype(np.float32))
    out = lm.copy()
    H, W = head_mask.shape
    cx = float(lm[27:36, 0].mean())  # the nose: left/right of it is the point's side
    for k in range(17):
        x, y, z = p[k]
        r, c = int(np.floor(y)), int(np.floor(x))
        if 0 <= r < H and 0 <= c < W and abs(frags.zbuf[0, r, c] - z) < 0.02 * (
                p[:, 2].max() - p[:, 2].min()) + 1e-3:
            continue  # visible: mediapipe sees it where it is
        row = np.nonzero(head_mask[min(max(r, 0), H - 1)])[0]
        if row.size:
            out[k, 0] = row.min() if x < cx else row.max() + 1
    return out


def analyse_one(model, image, v, cam, oval, raster, truth, cfg) -> dict:
    """The pipeline's face mask + unwrap of one crop, the lost texels attributed."""
    from facecorpus.renderers.render import rasterize_views
    from facecorpus.renderers.uv_space import project_to_uv
    from facecorpus.tasks import masks as M
    from facecorpus.tasks.unwrap import texels_in as at_texels
    from facecorpus.tasks.unwrap import unwrap_one, view_cosines

    uc = cfg.unwrap
    fm = M.face_mask(model, v, cam, oval=oval, region=uc.face_region, erode_px=uc.erode_px)
    u = unwrap_one(image, v, cam, model, uc.uv_size, fm, min_cos=uc.min_cos)
    rec = u.uv_visible_mask[0]
    frags, _ = rasterize_views(v, model.triangles, cam)
    proj = project_to_uv(v, model.triangles, cam, raster, frags)
    smap = proj.uv_sampling_map[0]
    region = M.projected_region_mask(model, v, cam, uc.face_region)
    ov = np.ones_like(region) if oval is None else M.polygon_mask(oval, region.shape)
    steps = {"zbuf": proj.uv_visible_mask[0],
             "min_cos": view_cosines(np.asarray(v, np.float32), model.triangles, cam,
                                     raster) >= uc.min_cos,
             "region": at_texels(region, smap), "oval": at_texels(ov, smap),
             "erosion": at_texels(M.erode(region & ov, uc.erode_px), smap)}
    alive = np.ones_like(rec)
    for s in RULES:
        alive = alive & steps[s]
    assert (alive == rec).all(), "attribution does not reproduce unwrap_one"
    n = max(int(truth.sum()), 1)
    lost = truth & ~rec
    left, why = lost.copy(), {}
    for s in RULES:
        hit = left & ~steps[s]
        why[s] = hit.sum() / n
        left &= ~hit
    return {"rec": (rec & truth).sum() / n, "false": (rec & ~truth).sum() / n,
            "vis": rec, "why": why}


def run_model(model, cfg, yaws, seed: int) -> list[dict]:
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.render import render
    from facecorpus.tasks import fit as F
    from facecorpus.tasks.landmarks import crop_affine, oval_for
    from facecorpus.tasks.unwrap import truly_visible

    S, T, uc = cfg.landmarks.crop_size, cfg.unwrap.uv_size, cfg.unwrap
    raster = rasterize_uv(model.uv, model.uv_triangles, T)
    layout = raster.mask
    sh = np.zeros(27, np.float32)
    sh[0::9] = 2 / np.sqrt(np.pi)  # ambient: the render is the texture
    rows = []
    for yaw in yaws:
        sb = F.synthetic_batch(model, 1 if yaw == 0 else 2, 2 * S, seed=seed, yaw_max=yaw,
                               sh=sh, noise_px=0.0)
        for i in range(len(sb.image)):
            v = sb.truth.vertices(model, i).astype(np.float32)
            A = crop_affine(sb.landmarks[i], S)
            cam = crop_camera(sb.truth.camera_for(i), A, S)
            lm = (sb.landmarks[i] @ A[:, :2].T + A[:, 2]).astype(np.float32)
            assert np.abs(cam.project(v[model.landmarks])[:, :2] - lm).max() < 1e-2
            out = render(v, model.triangles, cam, outputs=("image", "mask"), uv=model.uv,
                         uv_triangles=model.uv_triangles, uv_texture=sb.uv_texture, sh=sh)
            image, head = out.image[0], out.mask[0]
            truth = truly_visible(model, v, cam, raster, region=uc.face_region,
                                  erode_px=uc.erode_px)
            lm_mp = mediapipe_like(model, v, cam, lm, head)
            res = {"yaw": float(sb.truth.yaw[i]), "truth": truth[layout].mean()}
            res["true"] = analyse_one(model, image, v, cam, oval_for(lm, uc), raster, truth,
                                      cfg)
            res["mp-like"] = analyse_one(model, image, v, cam, oval_for(lm_mp, uc), raster, truth,
                                         cfg)
            rng = np.random.default_rng(seed + i)
            noisy = (lm_mp + rng.normal(0, 1.0, lm_mp.shape)).astype(np.float32)
            fit = F.fit_landmarks(model, noisy[None], S, cfg.fit)
            res["fit_rot_err"] = float(F.rotation_error_deg(
                fit, _one(F, sb.truth, i, cam))[0])
            res["fit"] = analyse_one(model, image, fit.vertices(model, 0).astype(np.float32),
                                     fit.camera_for(0), oval_for(noisy, uc), raster, truth, cfg)
            for k in ("true", "mp-like", "fit"):
                res[k]["vf"] = res[k].pop("vis")[layout].mean()
            rows.append(res)
    return rows


def _one(F, truth, i, cam):
    """Row i of the true FitResult (rotation is all rotation_error_deg reads)."""
    import dataclasses

    return dataclasses.replace(truth, yaw=truth.yaw[i:i + 1], pitch=truth.pitch[i:i + 1],
                               roll=truth.roll[i:i + 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="procedural,ict")
    ap.add_argument("--yaws", default=",".join(map(str, YAWS)))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="config KEY=VALUE")
    args = ap.parse_args()
    from facecorpus.configs import load_config, parse_set
    from facecorpus.meshops.catalog import load_model

    cfg = load_config(None, "pseudo_gt", parse_set(args.set) if args.set else None)
    yaws = [int(y) for y in args.yaws.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load {os.getloadavg()[0]:.2f}; unwrap {cfg.unwrap.model_dump()}")
    for spec in args.models.split(","):
        model = load_model(spec)
        t0 = time.perf_counter()
        rows = run_model(model, cfg, yaws, args.seed)
        print(f"\nmodel {model.name} ({model.n_vertices} vertices), crop "
              f"{cfg.landmarks.crop_size}, UV {cfg.unwrap.uv_size}; {time.perf_counter() - t0:.0f}"
              f" s; fractions of the truly visible set unless noted (vf: of the UV layout)")
        head = (f"{'yaw':>6} {'true vf':>7} | " + " | ".join(
            f"{k:>7}: {'rec':>5} {'false':>5} {'vf':>5} lost to "
            + " ".join(f"{r[:4]:>4}" for r in RULES) for k in ("true", "mp-like", "fit")))
        print(head)
        for r in rows:
            cells = []
            for k in ("true", "mp-like", "fit"):
                x = r[k]
                cells.append(f"{'':>7}  {x['rec']:5.3f} {x['false']:5.3f} {x['vf']:5.3f} "
                             f"{'':>7} " + " ".join(f"{x['why'][s]:4.2f}" for s in RULES))
            print(f"{r['yaw']:6.1f} {r['truth']:7.3f} | " + " | ".join(cells)
                  + f"  (fit rot err {r['fit_rot_err']:.1f} deg)")


if __name__ == "__main__":
    main()
