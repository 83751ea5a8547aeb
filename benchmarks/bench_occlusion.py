"""Occlusion segmentation: quality and throughput vs the rule it replaces, on the same faces.

    .venv/bin/python benchmarks/bench_occlusion.py [--n 16] [--size 256] [--uv 128]
        [--model procedural|ict]

Faces are rendered from the model (``tasks.fit.synthetic_batch`` parameters, a left-right
symmetric known texture, default SH light, yaw within +-30 degrees) on noisy backgrounds; one
occluder per face, cycling through ``tasks.occlusion.OCCLUDER_KINDS`` and a clean face; the
faces are unwrapped at their true parameters inside the face mask eroded by 3 px (as the flow
samples). Truth: the pasted pixels moved into UV (``image_mask_to_uv``) within the visible
texels.

Methods, same UV maps:

- **reference** — the rule the pseudo-GT flow runs today (``tasks.unwrap.reject_occlusions``
  with ``unwrap.occlusion_threshold`` 0.3): colour vs the corpus prior (built from all the
  images, the judged one included) fitted to the same, possibly occluded, texels;
- **ours** — image cues (padding, saturation; the mediapipe cues are for photos and are off
  on renders) mapped to UV, plus ``cross_fitted_outliers`` with the true SH light divided
  out (``uv_shading``, what stage 2 provides), with the light fitted jointly
  (``uv_normals``, when stage 2 is off), with no light divided out (``flat``: what stage 2's
  near-flat light against a lit corpus prior leaves on photos) and with a residual band 0-1
  light refitted after dividing (``occlusion.em_light: residual``).

Prints per kind the mean IoU with the truth (clean: flagged share of the visible texels) and
the time per face of each method.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def scene(model, n: int, S: int, T: int, seed: int = 3, texture: str = "pattern",
          kinds=None):
    from facecorpus.meshops.uv import uv_mirror_map
    from facecorpus.renderers.render import render
    from facecorpus.tasks import occlusion as O
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.skin import RIM_KINDS, SKIN_TONES, paste_rim, skin_texture
    from facecorpus.tasks.unwrap import unwrap_one

    kinds = kinds or (*O.OCCLUDER_KINDS, "clean")
    b = synthetic_batch(model, n, S, seed=seed, yaw_max=30, noise_px=0, texture_size=T)
    mirror = uv_mirror_map(model, T)
    tex = b.uv_texture.copy()
    has = mirror[..., 0] >= 0
    tex[has] = 0.5 * (tex[has] + tex[mirror[..., 0][has], mirror[..., 1][has]])
    rng = np.random.default_rng(0)
    out = {k: [] for k in ("images", "truth", "kind", "uv_visible", "uv_visible_mask",
                           "uv_sampling_map", "shading", "normals", "face")}
    k_hair = S / 160  # the strands are drawn in pixels: keep them face-relative
    for i in range(n):
        v, cam = b.truth.vertices(model, i), b.truth.camera_for(i)
        tex_i = tex if texture == "pattern" else skin_texture(
            model, T, tex, SKIN_TONES[i % len(SKIN_TONES)], rng)
        r = render(v, model.triangles, cam, outputs=("image", "mask"), uv=model.uv,
                   uv_triangles=model.uv_triangles, uv_texture=tex_i, sh=b.sh[i])
        img = np.where(r.mask[0][..., None], r.image[0], rng.uniform(0.2, 0.8, (S, S, 3)))
        kind = kinds[i % len(kinds)]
        if kind == "clean":
            pasted = np.zeros((S, S), bool)
        elif kind == "hair" and round(k_hair) > 1:
            from scipy.ndimage import binary_dilation

            pasted = O.paste_occluder(kind, img, b.landmarks[i], rng)
            pasted = binary_dilation(pasted, iterations=round(k_hair) - 1)
            img[pasted] = [0.12, 0.08, 0.05]
        elif kind in RIM_KINDS:  # collar, fringe, strands
            pasted = paste_rim(kind, img, b.landmarks[i], rng)
        else:
            pasted = O.paste_occluder(kind, img, b.landmarks[i], rng)
        u = unwrap_one(img.astype(np.float32), v, cam, model, T, erode(b.mask[i], 3))
        out["images"].append((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
        out["truth"].append(pasted & b.mask[i])
        out["face"].append(erode(b.mask[i], 3))
        out["kind"].append(kind)
        out["uv_visible"].append(u.uv_visible[0])
        out["uv_visible_mask"].append(u.uv_visible_mask[0])
        out["uv_sampling_map"].append(u.uv_sampling_map[0])
        out["shading"].append(O.uv_irradiance(model, v, cam.rotation, b.sh[i], T))
        out["normals"].append(O.uv_normals(model, v, cam.rotation, T))
    out = {k: (np.stack(v) if k != "kind" else v) for k, v in out.items()}
    out["uv_truth"] = (O.image_mask_to_uv(out["truth"], out["uv_sampling_map"])
                       & out["uv_visible_mask"])
    out["mirror"] = mirror
    return out


def score(sc, occ) -> dict:
    """Per kind: (IoU with the pasted occluder, its recall); clean: (flagged share, nan)."""
    got: dict[str, list] = {}
    for i, kind in enumerate(sc["kind"]):
        p, g, vis = occ[i], sc["uv_truth"][i], sc["uv_visible_mask"][i]
        if kind == "clean":
            got.setdefault(kind, []).append((p.sum() / max(vis.sum(), 1), np.nan))
        else:
            got.setdefault(kind, []).append(((p & g).sum() / max((p | g).sum(), 1),
                                             (p & g).sum() / max(g.sum(), 1)))
    return {k: tuple(np.mean(np.array(v), 0)) for k, v in got.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--uv", type=int, default=128)
    ap.add_argument("--model", default="procedural")
    ap.add_argument("--texture", choices=("pattern", "skin"), default="pattern",
                    help="pattern: the smooth multicolour test texture; skin: skin tones "
                         "(light to dark) with brows and lips, as photos have")
    ap.add_argument("--rim", action="store_true",
                    help="occluders at the face region's rim instead: light collars, fringes")
    ap.add_argument("--strands", action="store_true",
                    help="with --rim: thin anti-aliased strands too (tasks.skin.paste_rim)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an occlusion config value for 'ours' (e.g. skin_grow_px=3)")
    ap.add_argument("--batch", type=int, default=0,
                    help="the EM judges batches of this many images, as the flow does per "
                         "shard (0: all at once; below occlusion.min_images: no EM)")
    ap.add_argument("--speed", action="store_true",
                    help="only CPU-s of cross_fitted_outliers (both lights) and a digest of its "
                         "masks (run it on two checkouts to compare), and the robust mean's "
                         "median against np.nanmedian in this process")
    a = ap.parse_args()
    from facecorpus.configs.occlusion import OcclusionConfig
    from facecorpus.tasks import occlusion as O
    from facecorpus.tasks.prior import build_prior
    from facecorpus.tasks.skin import skin_layout, skin_outliers
    from facecorpus.tasks.unwrap import reject_occlusions

    if a.model == "procedural":
        from facecorpus.meshops.procedural import procedural_model

        model = procedural_model()
    else:
        from facecorpus.meshops.catalog import load_model

        model = load_model(a.model)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"model {a.model}, {a.n} faces {a.size}^2, UV {a.uv}^2, texture {a.texture}")
    t = time.perf_counter()
    from facecorpus.tasks.skin import RIM_KINDS

    rim_kinds = RIM_KINDS if a.strands else tuple(k for k in RIM_KINDS if k != "strands")
    kinds = (*rim_kinds, "clean") if a.rim else (*O.OCCLUDER_KINDS, "clean")
    sc = scene(model, a.n, a.size, a.uv, texture=a.texture, kinds=kinds)
    print(f"scene built in {time.perf_counter() - t:.1f} s")
    vis = sc["uv_visible_mask"]
    if a.speed:
        return speed(sc, vis)
    rows = []

    t = time.perf_counter()
    prior = build_prior(sc["uv_visible"], vis, mirror_map=sc["mirror"], kind="corpus")
    per_image = prior.fit_to_visible(sc["uv_visible"], vis)
    kept = reject_occlusions(sc["uv_visible"], vis, per_image, 0.3)
    rows.append(("reference: reject_occlusions(0.3), prior incl. the image",
                 vis & ~kept, time.perf_counter() - t))

    import yaml

    sets = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    cfg = OcclusionConfig(hands=False, person=False, **sets)
    # the references in this process: the skin cue as it was before its hysteresis (#16),
    # and before the line cue (#16, occlusion.lines)
    cfg_flat = cfg.model_copy(update={"skin_grow_px": 0, "lines": False})
    cfg_nolines = cfg.model_copy(update={"lines": False})
    if sets:
        print(f"occlusion config: {sets}")
    t = time.perf_counter()
    img_uv = np.stack([O.image_mask_to_uv(
        O.image_occlusion(sc["images"][i], sc["face"][i], cfg).occlusion_mask,
        sc["uv_sampling_map"][i]) for i in range(a.n)]) & vis
    t_img = time.perf_counter() - t
    rows.append(("image cues only (padding, saturation)", img_uv, t_img))
    layout = skin_layout(model, a.uv)
    B = a.batch or a.n

    def em(known, kw):  # per batch of B images, as per shard
        out = np.zeros_like(known)
        for s0 in range(0, a.n, B):
            sl = slice(s0, s0 + B)
            out[sl] = O.cross_fitted_outliers(
                sc["uv_visible"][sl], vis[sl], sc["mirror"], cfg, uv_occlusion_mask=known[sl],
                **{k: v[sl] for k, v in kw.items()}).uv_outliers
        return out

    # "flat": no light divided out, a gain only — what the flow's EM gets on photos, where
    # stage 2's light (fitted against a lit corpus prior) is near flat; "residual": the
    # flow's occlusion.em_light=residual (band 0-1 refitted after dividing by the light)
    flat = np.ones_like(sc["shading"])
    for name, kw in (("shading", {"uv_shading": sc["shading"]}),
                     ("normals", {"uv_normals": sc["normals"]}),
                     ("flat", {"uv_shading": flat}),
                     ("residual on true light", {"uv_shading": sc["shading"],
                                                 "uv_normals": sc["normals"]}),
                     ("residual on flat", {"uv_shading": flat, "uv_normals": sc["normals"]})):
        t = time.perf_counter()
        rows.append((f"image cues + cross-fitted EM ({name})",
                     img_uv | em(img_uv, kw), t_img + time.perf_counter() - t))
        # the flow's order: image cues, the skin cue (on the albedo when the light is known),
        # then the EM on what is left
        for tag, c in (("", cfg), (", no line cue", cfg_nolines),
                       (", no hysteresis", cfg_flat)):
            t = time.perf_counter()
            known = img_uv | skin_outliers(sc["uv_visible"], vis, layout, c,
                                           uv_shading=kw.get("uv_shading"),
                                           uv_occlusion_mask=img_uv)
            t_skin = time.perf_counter() - t
            rows.append((f"ours: image cues + skin{tag} + cross-fitted EM ({name})",
                         known | em(known, kw), t_img + t_skin + time.perf_counter() - t))
            rows.append((f"skin cue alone{tag} ({name})", known & ~img_uv, t_skin))
    print(f"EM batches of {B} images (occlusion.min_images {cfg.min_images})")
    print(f"{'method':72s} " + " ".join(f"{k:>11s}" for k in kinds) + "   ms/face")
    for name, occ, sec in rows:
        s = score(sc, occ)
        cell = lambda v: f"{v[0]:.3f}" if np.isnan(v[1]) else f"{v[0]:.2f}/{v[1]:.2f}"
        print(f"{name:72s} " + " ".join(f"{cell(s.get(k, (np.nan, np.nan))):>11s}"
                                        for k in kinds) + f"   {1000 * sec / a.n:7.1f}")
    print("(IoU/recall of the pasted occluder; clean: share of visible texels flagged)")
    if O.mediapipe_occlusion_dir() is not None:
        seg = O.segmenter()
        img = sc["images"][0]
        seg.hand_landmarks(img)  # build the graphs
        t = time.perf_counter()
        for im in sc["images"]:
            seg.hand_landmarks(im)
            seg.person_probability(im)
        print(f"mediapipe hands + selfie segmentation: "
              f"{1000 * (time.perf_counter() - t) / a.n:.1f} ms/face at {a.size}^2")


def speed(sc, vis) -> None:
    """CPU seconds (process time) of the cross-fitting per light, with a digest of the masks,
    and the per-texel median of ``tasks.prior`` against ``np.nanmedian`` on the same stack."""
    import hashlib
    import warnings

    from facecorpus.configs.occlusion import OcclusionConfig
    from facecorpus.tasks import occlusion as O

    cfg = OcclusionConfig(hands=False, person=False)
    for name, kw in (("shading", {"uv_shading": sc["shading"]}),
                     ("normals", {"uv_normals": sc["normals"]})):
        O.cross_fitted_outliers(sc["uv_visible"][:4], vis[:4], sc["mirror"], cfg,
                                **{k: v[:4] for k, v in kw.items()})  # kernels loaded
        t = time.process_time()
        res = O.cross_fitted_outliers(sc["uv_visible"], vis, sc["mirror"], cfg, **kw)
        dt = time.process_time() - t
        h = hashlib.sha256(np.packbits(res.uv_outliers).tobytes()).hexdigest()[:16]
        print(f"cross_fitted_outliers ({name}): {dt:.2f} CPU-s for {len(vis)} faces, "
              f"{res.uv_outliers.sum()} texels flagged, masks sha256 {h}")
    try:
        from facecorpus.tasks.prior import masked_median
    except ImportError:
        print("tasks.prior.masked_median: not in this checkout")
        return
    y = sc["uv_visible"].astype(np.float32)
    gains = np.ones((len(y), 3), np.float32)
    masked_median(y[:2], vis[:2], gains[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = time.process_time()
        ref = np.nanmedian(np.where(vis[..., None], y * gains[:, None, None, :], np.nan), 0)
        t_ref = time.process_time() - t
    t = time.process_time()
    got = masked_median(y, vis, gains)
    t_new = time.process_time() - t
    print(f"per-texel median of {len(y)} maps {y.shape[1]}^2: np.nanmedian {t_ref:.3f} CPU-s, "
          f"masked_median {t_new:.3f} CPU-s; equal: {np.array_equal(ref, got, equal_nan=True)}")


if __name__ == "__main__":
    main()
