"""Occlusion segmentation: pasted occluders on rendered faces with a known texture are found
(image cues and the UV outlier segmentation against a cross-fitted prior), clean faces are
not flagged; mediapipe's hand / person cues on the shared real photos."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from facecorpus.configs.occlusion import OcclusionConfig
from facecorpus.tasks import occlusion as O

S, T = 160, 96
KINDS = ("glasses", "hand", "hair", "clean", "padding")  # O.OCCLUDER_KINDS + a clean face
# image-only cues for rendered faces: mediapipe's person/hand networks are for photos
NO_MP = OcclusionConfig(hands=False, person=False)


def iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def scene():
    """Eight rendered faces (a left-right symmetric known texture, default SH light, yaw
    within +-30 deg) on noisy backgrounds, each with one occluder kind, unwrapped with the
    true fit; truth masks in image and UV space."""
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.meshops.uv import uv_mirror_map
    from facecorpus.renderers.render import render
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.unwrap import unwrap_one

    model = procedural_model()
    N = 10
    b = synthetic_batch(model, N, S, seed=3, yaw_max=30, noise_px=0, texture_size=T)
    mirror = uv_mirror_map(model, T)
    # real faces are roughly symmetric, the mirror cue relies on it
    tex = b.uv_texture.copy()
    has = mirror[..., 0] >= 0
    tex[has] = 0.5 * (tex[has] + tex[mirror[..., 0][has], mirror[..., 1][has]])
    rng = np.random.default_rng(0)
    imgs, truth, kinds = [], [], []
    for i in range(N):
        r = render(b.truth.vertices(model, i), model.triangles, b.truth.camera_for(i),
                   outputs=("image", "mask"), uv=model.uv, uv_triangles=model.uv_triangles,
                   uv_texture=tex, sh=b.sh[i])
        bg = rng.uniform(0.2, 0.8, (S, S, 3))
        img = np.where(r.mask[0][..., None], r.image[0], bg)
        kind = KINDS[i % len(KINDS)]
        pasted = (np.zeros((S, S), bool) if kind == "clean"
                  else O.paste_occluder(kind, img, b.landmarks[i], rng))
        truth.append(pasted & b.mask[i])
        imgs.append(img)
        kinds.append(kind)
    imgs = np.stack(imgs).astype(np.float32)
    # sampled inside the face mask eroded by 2 px, as the flow does (masks.face_mask): the
    # edge pixels mix face and background
    us = [unwrap_one(imgs[i], b.truth.vertices(model, i), b.truth.camera_for(i), model, T,
                     erode(b.mask[i], 2)) for i in range(N)]
    uv_vis = np.concatenate([u.uv_visible for u in us])
    uv_mask = np.concatenate([u.uv_visible_mask for u in us])
    smap = np.concatenate([u.uv_sampling_map for u in us])
    truth = np.stack(truth)
    shading = np.stack([O.uv_irradiance(model, b.truth.vertices(model, i),
                                        b.truth.camera_for(i).rotation, b.sh[i], T)
                        for i in range(N)])
    normals = np.stack([O.uv_normals(model, b.truth.vertices(model, i),
                                     b.truth.camera_for(i).rotation, T) for i in range(N)])
    u8 = (np.clip(imgs, 0, 1) * 255 + 0.5).astype(np.uint8)
    return {"model": model, "images": u8, "face": b.mask, "truth": truth, "kinds": kinds,
            "uv_visible": uv_vis, "uv_visible_mask": uv_mask, "uv_sampling_map": smap,
            "uv_truth": O.image_mask_to_uv(truth, smap) & uv_mask, "mirror": mirror,
            "shading": shading, "normals": normals}


def test_image_cues_find_padding_and_leave_clean_faces(scene):
    for i, kind in enumerate(scene["kinds"]):
        r = O.image_occlusion(scene["images"][i], scene["face"][i], NO_MP)
        assert set(r.skipped) == {"hands", "background"}
        if kind == "padding":
            assert iou(r.occlusion_mask, scene["truth"][i]) >= 0.9
            assert r.padding[scene["truth"][i]].all()  # every pasted pixel
        else:
            # sunglasses, hand and hair are no border padding nor clipped; a clean face
            # has nothing
            assert r.occluded_fraction < 0.01, (kind, r.occluded_fraction)


def combined(scene, **light):
    """The flow's composition: image cues -> UV, excluded from (and added to) the UV
    outlier segmentation. Returns (uv_occlusion_mask, outliers alone) (N, T, T) bool."""
    img_uv = np.stack([
        O.image_mask_to_uv(O.image_occlusion(scene["images"][i], scene["face"][i],
                                             NO_MP).occlusion_mask,
                           scene["uv_sampling_map"][i])
        for i in range(len(scene["images"]))]) & scene["uv_visible_mask"]
    res = O.cross_fitted_outliers(scene["uv_visible"], scene["uv_visible_mask"],
                                  scene["mirror"], OcclusionConfig(),
                                  uv_occlusion_mask=img_uv, **light)
    assert res.note == ""
    return img_uv | res.uv_outliers, res.uv_outliers


@pytest.mark.parametrize("light", ["shading", "normals"])
def test_uv_occlusion_finds_pasted_occluders(scene, light):
    """Image cues + the EM segmentation, each image judged by a prior built from the other
    fold, with the fitted SH light divided out ("shading") or fitted jointly ("normals")."""
    kw = {"uv_shading": scene["shading"]} if light == "shading" else {
        "uv_normals": scene["normals"]}
    occ, outliers = combined(scene, **kw)
    got = {}
    for i, kind in enumerate(scene["kinds"]):
        p, g, vis = occ[i], scene["uv_truth"][i], scene["uv_visible_mask"][i]
        assert not (p & ~vis).any()
        if kind == "clean":
            got.setdefault(kind, []).append(p.sum() / vis.sum())
        else:
            got.setdefault(kind, []).append(iou(p, g))
            if kind != "padding":  # found by the statistical segmentation alone
                assert iou(outliers[i], g) == pytest.approx(got[kind][-1], abs=1e-9)
    # measured (IoU per image; clean: flagged share): shading: glasses 0.98 0.98, hand
    # 0.96 0.95, hair 0.80 0.76, padding 0.96 0.96, clean 0 0; normals: glasses 0.99 0.98,
    # hand 0.93 0.84, hair 0.82 0.78, padding 0.96 0.96, clean 0.001 0.042 (the jointly
    # fitted light leaves a shading mismatch on the far cheek of a turned face)
    assert max(got["clean"]) < {"shading": 0.01, "normals": 0.05}[light], got
    for kind in ("glasses", "hand", "hair", "padding"):
        assert min(got[kind]) >= 0.6, (kind, got)


def test_prior_never_contains_the_judged_image(scene, monkeypatch):
    import facecorpus.tasks.prior as P

    # identify each image by a code written into one texel no image sees
    uv = scene["uv_visible"].copy()
    uv[:, 0, 0, 0] = np.arange(len(uv)) / 100
    calls = []
    real_mean, real_judge = P.robust_mean_texture, O.uv_outliers

    def mean_spy(uv_visible, *a, **k):
        calls.append(("prior", set(np.round(uv_visible[:, 0, 0, 0] * 100).astype(int))))
        return real_mean(uv_visible, *a, **k)

    def judge_spy(uv_visible, *a, **k):
        calls.append(("judge", set(np.round(uv_visible[:, 0, 0, 0] * 100).astype(int))))
        return real_judge(uv_visible, *a, **k)

    monkeypatch.setattr(P, "robust_mean_texture", mean_spy)
    monkeypatch.setattr(O, "uv_outliers", judge_spy)
    O.cross_fitted_outliers(uv, scene["uv_visible_mask"], scene["mirror"],
                            OcclusionConfig(folds=3, mirror=False, rounds=2))
    # rounds x folds x (build, judge); a fold whose training texels did not change since
    # the last round is not rebuilt nor judged again
    assert len(calls) % 2 == 0 and 1 * 3 * 2 <= len(calls) <= 2 * 3 * 2
    judged = set()
    for (k1, built), (k2, seen) in zip(calls[::2], calls[1::2], strict=True):
        assert (k1, k2) == ("prior", "judge")
        assert not built & seen and built | seen == set(range(len(uv)))
        judged |= seen
    assert judged == set(range(len(uv)))


def test_too_few_images_give_no_outliers_and_say_why(scene):
    res = O.cross_fitted_outliers(scene["uv_visible"][:2], scene["uv_visible_mask"][:2],
                                  scene["mirror"])
    assert not res.uv_outliers.any() and "min_images" in res.note


def test_image_mask_to_uv_follows_the_sampling_map():
    H, W, Tt = 40, 60, 8
    # texel (r, c) samples the pixel centre (x, y) = (5c + 2.5, 4r + 1.5) ...
    c, r = np.meshgrid(np.arange(Tt), np.arange(Tt))
    x, y = 5 * c + 2.5, 4 * r + 1.5
    smap = np.stack([2 * x / W - 1, 2 * y / H - 1], -1).astype(np.float32)
    smap[0, 0] = -2  # ... except one texel outside the layout
    mask = np.zeros((H, W), bool)
    mask[9, 12] = True  # pixel centre (12.5, 9.5) = texel (2, 2)
    mask[0, 2] = True  # read only by the texel outside the layout
    got = O.image_mask_to_uv(mask, smap)
    assert got.sum() == 1 and got[2, 2]
    # a sample between pixels reads both: both set it (its colour mixes them)
    smap[3, 3] = [2 * 20.0 / W - 1, 2 * 13.5 / H - 1]  # between pixels x=19 and x=20
    m2 = np.zeros((H, W), bool)
    m2[13, 19] = True
    assert O.image_mask_to_uv(m2, smap)[3, 3]
    assert O.image_mask_to_uv(m2[None], smap[None]).shape == (1, Tt, Tt)


def test_padding_and_saturation_masks():
    rng = np.random.default_rng(0)
    img = rng.integers(30, 220, (64, 80, 3)).astype(np.uint8)
    img[:, :20] = 0  # left padding
    img[30:34, 40:44] = 0  # a dark spot inside: flat and black, but not on the border
    img[50:52, 60:62] = 255  # a clipped highlight
    pad = O.padding_mask(img, dilate_px=0)
    assert pad[:, :20].all() and not pad[:, 21:].any()
    sat = O.saturated_mask(img)
    assert sat[30:34, 40:44].all() and sat[50:52, 60:62].all() and sat[:, :20].all()
    assert sat[:, 20:].sum() == 16 + 4


def test_without_mediapipe_the_cues_are_skipped(monkeypatch):
    monkeypatch.setattr(O, "mediapipe_occlusion_dir", lambda: None)
    img = np.zeros((32, 32, 3), np.uint8)
    r = O.image_occlusion(img, np.ones((32, 32), bool))
    assert "not installed" in r.skipped["hands"] and "not installed" in r.skipped["background"]
    assert r.padding.all() and r.occluded_fraction == 1.0  # a black frame is padding
    off = O.image_occlusion(img, np.ones((32, 32), bool), OcclusionConfig(enabled=False))
    assert not off.occlusion_mask.any() and len(off.skipped) == 4


def test_config_is_strict():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        OcclusionConfig(em_iter=3)
    with pytest.raises(ValidationError):
        OcclusionConfig(folds=1)


# ------------------------------------------------------------------ mediapipe, real photos
needs_mp = pytest.mark.skipif(O.mediapipe_occlusion_dir() is None,
                              reason="needs mediapipe >=0.10,<0.10.22 with its bundled Hands "
                                     "and SelfieSegmentation models")


@pytest.fixture(scope="module")
def photo_faces(shared):
    from facecorpus.tasks.landmarks import LandmarkDetector, face_oval, mediapipe_solutions_dir
    from facecorpus.tasks.masks import polygon_mask
    from PIL import Image

    if mediapipe_solutions_dir() is None:
        pytest.skip("needs mediapipe's FaceMesh for the face region")
    out = {}
    with LandmarkDetector(None) as det:
        for name in ("official_portrait.jpg", "oval_office_portrait.jpg"):
            img = np.asarray(Image.open(shared / "images" / name).convert("RGB"))
            lm = det.detect(img, name)
            out[name] = (img, polygon_mask(face_oval(lm.points), img.shape[:2]), lm.box)
    return out


@needs_mp
def test_real_portrait_no_hands_and_person_covers_the_face(photo_faces):
    img, region, _ = photo_faces["official_portrait.jpg"]
    r = O.image_occlusion(img, region)
    assert r.skipped == {}
    assert not r.hands.any()  # a portrait without hands
    assert r.background.sum() / region.sum() < 0.01  # the selfie mask covers the face
    assert r.occluded_fraction < 0.02
    # the person mask is not trivially everything: the painted background is not person
    p = O.segmenter().person_probability(img)
    assert (p[:150, :150] < 0.5).mean() > 0.9


@needs_mp
def test_real_photo_hand_found_below_the_face(photo_faces):
    # the three-quarter portrait: arms crossed, the subject's left hand on his right forearm
    img, region, box = photo_faces["oval_office_portrait.jpg"]
    r = O.image_occlusion(img, region)
    H, W = img.shape[:2]
    assert r.hands.any()
    ys, xs = np.nonzero(r.hands)
    assert ys.min() > box[3]  # below the chin
    assert 0.6 * W < xs.mean() < 0.85 * W and 0.65 * H < ys.mean() < 0.85 * H
    assert not (r.hands & region).any() and r.occluded_fraction < 0.02


@needs_mp
def test_segmenter_pickles_without_graphs(photo_faces):
    seg = O.OcclusionSegmenter()
    img = photo_faces["official_portrait.jpg"][0]
    p = seg.person_probability(img[::4, ::4])
    blob = pickle.dumps(seg)
    assert len(blob) < 10_000
    back = pickle.loads(blob)
    assert back._graphs is None
    np.testing.assert_allclose(back.person_probability(img[::4, ::4]), p, atol=1e-5)
    seg.close()
    back.close()


def test_mirror_cue_flags_the_side_the_model_explains_worse():
    Tt = 32
    c, r = np.meshgrid(np.arange(Tt), np.arange(Tt))
    mirror = np.stack([r, Tt - 1 - c], -1).astype(np.int32)  # a left-right flip
    y = np.full((Tt, Tt, 3), 0.5, np.float32) * (1 + 0.2 * (r / Tt))[..., None]
    y[:, Tt // 2:] *= 1.1  # light from one side: a global ratio, not an occluder
    mask = np.ones((Tt, Tt), bool)
    y[5:12, 3:9] = [0.1, 0.1, 0.1]  # occluder on the left half only
    residual = np.zeros_like(y)
    residual[5:12, 3:9] = -0.4  # ... where the model fits worse
    got = O.mirror_inconsistent(y, mask, residual, mirror, 0.15, sigma=np.full(3, 0.02))
    truth = np.zeros((Tt, Tt), bool)
    truth[5:12, 3:9] = True
    np.testing.assert_array_equal(got, truth)
    # a mismatch the model explains on both sides (natural asymmetry) is not flagged
    assert not O.mirror_inconsistent(y, mask, np.zeros_like(y), mirror, 0.15).any()


def test_occluded_fraction_counts_within_the_visible_layout():
    vis = np.zeros((2, 4, 4), bool)
    vis[0, :2] = True  # 8 visible texels
    occ = np.zeros_like(vis)
    occ[0, 0] = True  # 4 of them occluded
    occ[0, 3] = True  # not visible: does not count
    layout = np.ones((4, 4), bool)
    layout[0, 0] = False  # one occluded visible texel lies off the layout
    np.testing.assert_allclose(O.occluded_fraction(occ, vis), [0.5, 0.0])
    np.testing.assert_allclose(O.occluded_fraction(occ, vis, layout), [3 / 7, 0.0])


def test_cross_fitting_reuses_a_fold_only_when_its_prior_is_unchanged(scene):
    """Every round rebuilt from scratch (the definition) gives the same masks as the
    cross-fitting that skips folds whose training texels did not change."""
    from facecorpus.tasks.prior import pca_with_missing, robust_mean_texture

    cfg = OcclusionConfig(rounds=3)
    kw = {"uv_normals": scene["normals"]}
    vis = scene["uv_visible_mask"]
    uv = scene["uv_visible"]
    N = len(vis)
    fold = np.arange(N) % cfg.folds
    out = np.zeros(vis.shape, bool)
    for _ in range(cfg.rounds):
        new = np.zeros_like(out)
        for k in range(cfg.folds):
            j, o = fold == k, fold != k
            prior = robust_mean_texture(uv[o], vis[o] & ~out[o], scene["mirror"])
            if cfg.pca_rank > 0 and o.sum() >= cfg.pca_min_images:
                prior.basis, prior.std = pca_with_missing(uv[o], vis[o] & ~out[o],
                                                          prior.mean, cfg.pca_rank)
            new[j] = O.uv_outliers(uv[j], vis[j], prior, scene["mirror"], cfg,
                                   uv_normals=kw["uv_normals"][j])
        done = np.array_equal(new, out)
        out = new
        if done:
            break
    got = O.cross_fitted_outliers(uv, vis, scene["mirror"], cfg, **kw).uv_outliers
    np.testing.assert_array_equal(got, out)
    assert out.any()


def test_residual_light_absorbs_one_sided_shading_but_not_an_occluder():
    """``occlusion.em_light: residual``: directional shading left in the de-lit colour (a
    near-flat stage-2 light) is face, not occluder, once the EM refits band 0-1 on inliers;
    with a gain only it flags the dark side. A dark patch is found either way."""
    from facecorpus.tasks.prior import TexturePrior
    from scipy import ndimage as ndi

    T = 64
    rng = np.random.default_rng(4)
    yy, xx = (np.mgrid[:T, :T] + 0.5) / T * 2 - 1
    r2 = xx ** 2 + yy ** 2
    mask = r2 < 0.8
    normals = np.stack([xx, -yy, np.sqrt(np.clip(1 - r2, 0, 1))], -1).astype(np.float32)
    tex = (np.array([0.7, 0.5, 0.4]) * (1 + 0.1 * ndi.gaussian_filter(
        rng.standard_normal((T, T, 1)), 2))).astype(np.float32)
    nx = normals[..., :1]
    light = np.where(nx > 0, 1 + 0.8 * nx, 1 + 0.1 * nx)  # a key light on one side
    y = np.clip(tex * light + rng.normal(0, 0.01, (T, T, 3)), 0, 1).astype(np.float32)
    patch = (np.abs(xx + 0.3) < 0.12) & (np.abs(yy - 0.1) < 0.12)
    y[patch] = 0.08
    prior = TexturePrior(tex)
    cfg = OcclusionConfig(mirror=False)
    flat = np.ones_like(y)
    gain = O.uv_outliers(y[None], mask[None], prior, None, cfg, uv_shading=flat[None])[0]
    resid = O.uv_outliers(y[None], mask[None], prior, None, cfg, uv_shading=flat[None],
                          uv_normals=normals[None])[0]
    clean = mask & ~ndi.binary_dilation(patch, iterations=3)
    assert gain[clean].mean() > 0.15  # the side in shadow (or in light) is called occluded
    assert resid[clean].mean() < 0.03
    assert resid[patch].mean() > 0.7 and gain[patch].mean() > 0.7


def test_em_light_config():
    from facecorpus.configs import load_config, parse_set
    from facecorpus.core.errors import ConfigError

    assert load_config(None, "pseudo_gt", parse_set(
        ["occlusion.em_light=residual"])).occlusion.em_light == "residual"
    with pytest.raises(ConfigError):
        load_config(None, "pseudo_gt", parse_set(["occlusion.em_light=joint"]))
