"""The pseudo-GT stages of one shard, composed from the tested batch functions.

:class:`Stages` is the table of stage functions the composition calls (the public seam: a
caller passes ``dataclasses.replace(STAGES, blend=...)`` to swap one). Two steps:

- :func:`analyse` — ingest → landmarks → crop → stage-1 fit → face masks → unwrap;
  (:class:`Analysis`: arrays of the accepted images + rejected rows).
- :func:`finish` — per-image prior → stage-2 refinement + re-unwrap → occlusion rejection →
  two-pass blend → re-render metrics → manifest rows and contact-sheet rows.

Every step is per-sample isolated (:mod:`facecorpus.tasks.isolation`): an exception or a
non-finite result of one image rejects that image, with its stage and reason.

Shapes: N images, S crop size, T UV size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from facecorpus.core.atomic import npz_bytes
from facecorpus.core.errors import RejectedRow, SampleRejected
from facecorpus.tasks import albedo as albedo_mod
from facecorpus.tasks import blend as blend_mod
from facecorpus.tasks import fit as fit_mod
from facecorpus.tasks import ingest as ingest_mod
from facecorpus.tasks import isolation
from facecorpus.tasks import joint_fit as joint_mod
from facecorpus.tasks import landmarks as lm_mod
from facecorpus.tasks import masks as masks_mod
from facecorpus.tasks import nonrigid as nonrigid_mod
from facecorpus.tasks import occlusion as occ_mod
from facecorpus.tasks import skin as skin_mod
from facecorpus.tasks import unwrap as unwrap_mod

METRICS = ("landmark_rmse", "landmark_nme", "photometric_error", "rerender_l1",
           "rerender_psnr", "rerender_ssim", "visible_fraction")
CODE_VERSION = 2  # bump when the bytes these stages write change without a release


@dataclass(frozen=True)
class Stages:
    """The stage functions a shard runs (module-level functions: picklable to workers)."""

    ingest: Callable = ingest_mod.ingest_one
    align: Callable = lm_mod.align_face
    fit: Callable = fit_mod.fit_landmarks
    face_mask: Callable = masks_mod.face_mask
    seg_mask: Callable = masks_mod.segmentation_mask
    unwrap: Callable = unwrap_mod.unwrap_one
    refine: Callable = fit_mod.refine_photometric
    occlusion: Callable = unwrap_mod.reject_occlusions  # the legacy colour rule
    image_occlusion: Callable = occ_mod.image_occlusion
    uv_outliers: Callable = occ_mod.cross_fitted_outliers
    skin_outliers: Callable = skin_mod.skin_outliers
    blend: Callable = blend_mod.blend_batch
    nonrigid: Callable = nonrigid_mod.refine_nonrigid
    delight: Callable = albedo_mod.delight
    albedo_light: Callable = albedo_mod.fit_albedo_light


STAGES = Stages()


@dataclass(eq=False)
class State:
    """What every shard of a run shares, built once per process: the model, its UV layout
    and mirror map, the landmark template and (lazily) the detector."""

    model: object
    layout: np.ndarray  # (T, T) bool texels of the UV layout
    mirror_map: np.ndarray  # (T, T, 2) int32
    template: np.ndarray  # (68, 2)
    landmarks_cfg: object
    _detector: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # one detection at a time per process: mediapipe's graphs are not thread-safe
    detect_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, cfg) -> State:
        from facecorpus.meshops.catalog import load_model
        from facecorpus.meshops.uv import rasterize_uv, uv_mirror_map

        model = load_model(cfg.model)
        if cfg.fit.landmarks == "dense":
            _dense_correspondence_or_fail(model)
        T = cfg.unwrap.uv_size
        return cls(model, rasterize_uv(model.uv, model.uv_triangles, T).mask.copy(),
                   uv_mirror_map(model, T), lm_mod.landmark_template(model), cfg.landmarks)

    def detector(self):
        with self._lock:
            if self._detector is None:
                lc = self.landmarks_cfg
                self._detector = lm_mod.LandmarkDetector(self.template, lc.mediapipe_model,
                                                         lc.fallback)
            return self._detector

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()


def landmark_backend(landmarks_cfg) -> dict:
    """Which landmark backend a run would use, and the bytes it would use, without building
    it: part of every analyse key (the box fallback and mediapipe give different fits)."""
    import importlib.metadata as md

    from facecorpus.core import hashing

    lc = landmarks_cfg
    path = lm_mod.find_mediapipe_model(lc.mediapipe_model)
    if path is not None:
        return {"backend": "mediapipe_tasks", "model_sha256": hashing.file_sha256(path),
                "mediapipe": md.version("mediapipe")}
    if lm_mod.mediapipe_solutions_dir() is not None:
        return {"backend": "mediapipe", "mediapipe": md.version("mediapipe")}
    return {"backend": lc.fallback}


# --------------------------------------------------------------------------- analyse
@dataclass
class Analysis:
    """The analyse step's output for one shard: ``arrays`` (N accepted images: image, mask,
    seg_mask, landmarks, affine, uv_*, fit_* parameters, sample metadata) and ``rejected``."""

    arrays: dict
    rejected: list[RejectedRow]

    @property
    def n(self) -> int:
        return len(self.arrays["sample_uri"])

    def to_bytes(self) -> bytes:
        """A pickle-free compressed ``.npz`` (the rejected rows as JSON text)."""
        import json

        return npz_bytes({**self.arrays, "rejected": np.array(json.dumps(
            [dataclasses.asdict(r) for r in self.rejected]))})

    @classmethod
    def from_bytes(cls, data: bytes) -> Analysis:
        import io
        import json

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        return cls(a, [RejectedRow(**r) for r in json.loads(str(a.pop("rejected")))])


_SHAPES = {"image": ((None, None, 3), np.uint8), "mask": ((None, None), bool),
           "seg_mask": ((None, None), bool), "landmarks": ((68, 2), np.float32),
           "affine": ((2, 3), np.float32), "uv_visible": ((0, 0, 3), np.float16),
           "uv_visible_mask": ((0, 0), bool), "uv_sampling_map": ((0, 0, 2), np.float16),
           "uv_view_weight": ((0, 0), np.float16), "occlusion_mask": ((None, None), bool),
           "uv_occlusion_mask": ((0, 0), bool)}


def _stack(parts: list, key: str, S: int, T: int) -> np.ndarray:
    shape, dtype = _SHAPES[key]
    shape = tuple(S if d is None else (T if d == 0 else d) for d in shape)
    # float16 maps halve the work files (outputs are 8-bit / float16 anyway)
    return (np.stack(parts) if parts else np.zeros((0, *shape))).astype(dtype)


def analyse(state: State, inputs: list, cfg, stages: Stages = STAGES) -> Analysis:
    """Ingest, landmarks, crop, stage-1 fit, masks and unwrap of one shard's inputs
    (:class:`facecorpus.tasks.inputs.PlannedInput` records)."""
    model, S, T = state.model, cfg.landmarks.crop_size, cfg.unwrap.uv_size
    rejected: list[RejectedRow] = []
    todo = []
    for p in inputs:
        r = p.rejection()
        (rejected.append(r) if r else todo.append(p))
    uris = [p.source_uri for p in todo]

    def read(p):
        lm = None if p.landmarks is None else np.asarray(p.landmarks, np.float32)
        return stages.ingest(ingest_mod.InputRecord(p.source_uri, lm, p.mask_uri,
                                                    p.subject_id, p.sha256), cfg.ingest)

    kept, ings, rej = isolation.each("ingest", uris, read, todo)
    rejected += rej
    todo, uris = [todo[i] for i in kept], [uris[i] for i in kept]
    det = state.detector()

    lc = cfg.landmarks

    def find(p, ing):
        with state.detect_lock:
            return det.detect_all(ing.image, p.source_uri, given=ing.record.landmarks,
                                  min_face_px=lc.min_face_px, max_faces=lc.max_faces)

    kept, found, rej = isolation.each("landmarks", uris, find, todo, ings)
    rejected += rej
    _ptodo, _pings, _puris = todo, ings, uris
    # several faces per photo: each face is its own sample (same source_uri, face_index k)
    todo, ings, uris, faces, fidx = [], [], [], [], []
    for i, fl in zip(kept, found, strict=True):
        for k, lm in enumerate(fl):
            for xs, x in ((todo, _ptodo[i]), (ings, _pings[i]), (uris, _puris[i]),
                          (faces, lm), (fidx, k)):
                xs.append(x)

    # the photo's URI in align's own errors (a replaced align stage may not take it)
    named = _accepts(stages.align, "source_uri")

    def locate(p, ing, lm):
        kw = {"source_uri": p.source_uri} if named else {}
        return stages.align(ing.image, lm, S, mask=ing.mask, **kw)

    kept, aligned, rej = isolation.each("landmarks", uris, locate, todo, ings, faces)
    rejected += _tag(rej, kept, fidx)
    todo, ings, uris, fidx = ([xs[i] for i in kept] for xs in (todo, ings, uris, fidx))
    lms = np.stack([a.landmarks for a in aligned]) if aligned else np.zeros((0, 68, 2))

    # dense mediapipe points (NaN rows: given 68-point landmarks) when the fit uses them
    dense = None
    if cfg.fit.landmarks == "dense" and _accepts(stages.fit, "dense") and aligned:
        dense = np.stack([np.full((478, 2), np.nan, np.float32) if a.dense is None
                          else _pad478(a.dense) for a in aligned])

    # the photo's EXIF focal in crop pixels (the crop's scale), the centre of the focal prior
    focal_prior = None
    if (cfg.fit.camera == "perspective" and cfg.fit.focal == "estimate" and aligned
            and _accepts(stages.fit, "focal_prior")):
        focal_prior = np.array([_crop_focal(ing, a) for ing, a in zip(ings, aligned)])

    def fit_some(idx):
        kw = {} if dense is None else {"dense": dense[idx]}
        if focal_prior is not None:
            kw["focal_prior"] = focal_prior[idx]
        f = stages.fit(model, lms[idx], S, cfg.fit, **kw)
        return [f.select([k]) for k in range(len(idx))]

    kept, fits, rej = isolation.batched("fit", uris, fit_some, len(todo))
    rejected += _tag(rej, kept, fidx)
    sel = lambda xs: [xs[i] for i in kept]
    todo, ings, aligned, uris, fidx = sel(todo), sel(ings), sel(aligned), sel(uris), sel(fidx)
    fit = _concat_fits(fits)
    good, rej = _fit_checks("fit", uris, fit, cfg.fit.max_nme)
    rejected += _tag(rej, good, fidx)
    sel = lambda xs: [xs[i] for i in good]
    todo, ings, aligned, uris, fidx = sel(todo), sel(ings), sel(aligned), sel(uris), sel(fidx)
    fit = fit.select(good) if fit is not None else None
    if cfg.joint_subjects and fit is not None and len(todo):  # one identity per subject
        fit = joint_mod.fit_joint(model, fit, lms_of(aligned), [p.subject_id for p in todo],
                                  cfg.fit)
        good, rej = _fit_checks("fit", uris, fit, cfg.fit.max_nme)
        rejected += _tag(rej, good, fidx)
        sel = lambda xs: [xs[i] for i in good]
        todo, ings, aligned, uris, fidx = (sel(xs) for xs in (todo, ings, aligned, uris, fidx))
        fit = fit.select(good)

    uc = cfg.unwrap

    def unwrap(i, a):
        v, cam = fit.vertices(model, i), fit.camera_for(i)
        fm = stages.face_mask(model, v, cam, oval=lm_mod.oval_for(a.landmarks, uc),
                              given=a.mask, region=uc.face_region,
                              erode_px=uc.erode_px)
        u = stages.unwrap(a.image, v, cam, model, T, fm, min_cos=uc.min_cos)
        seg = stages.seg_mask(model, v, cam, uc.face_region)
        if not np.isfinite(u.uv_visible).all() or not np.isfinite(u.uv_sampling_map).all():
            raise ValueError("non-finite UV maps")
        return fm, seg, u

    kept, outs, rej = isolation.each("unwrap", uris, unwrap, list(range(len(todo))), aligned)
    rejected += _tag(rej, kept, fidx)
    sel = lambda xs: [xs[i] for i in kept]
    todo, ings, aligned, uris, fidx = sel(todo), sel(ings), sel(aligned), sel(uris), sel(fidx)
    fit = fit.select(kept) if fit is not None else None

    def image_occlusion(a, o):
        with state.detect_lock:  # mediapipe graphs: one at a time per process
            io = stages.image_occlusion(a.image, o[0], cfg.occlusion)
        io = _trust_person(io)
        uv_occ = (occ_mod.image_mask_to_uv(io.occlusion_mask, o[2].uv_sampling_map[0])
                  & o[2].uv_visible_mask[0])
        if skin_layout is not None:  # no light yet: the prior is built from these texels
            # seeds only: these flags steer stage 2's light through image space, and grown
            # on lit colour they moved its fit (measured: -0.2 dB clean-pixel rerender PSNR
            # on two of the three shared photos); the finish judges them and grows from them
            sk = stages.skin_outliers(o[2].uv_visible, o[2].uv_visible_mask, skin_layout,
                                      cfg.occlusion, uv_occlusion_mask=uv_occ[None],
                                      grow=False)[0]
            if sk.any():  # in image space too: stage 2 must not fit light to a collar
                uv_occ |= sk
                back = skin_mod.uv_mask_to_image(sk, o[2].uv_sampling_map[0],
                                                 io.occlusion_mask.shape)
                io = dataclasses.replace(io, occlusion_mask=io.occlusion_mask
                                         | (back & o[0].astype(bool)))
        return io, uv_occ

    skin_layout = (skin_mod.skin_layout(model, T)
                   if cfg.occlusion.enabled and cfg.occlusion.skin else None)

    kept, occs, rej = isolation.each("occlusion", uris, image_occlusion, aligned, outs)
    rejected += _tag(rej, kept, fidx)
    sel = lambda xs: [xs[i] for i in kept]
    todo, ings, aligned, uris, fidx, outs = (sel(xs) for xs in (todo, ings, aligned, uris,
                                                                fidx, outs))
    fit = fit.select(kept) if fit is not None else None
    cols = {"image": [a.image for a in aligned], "mask": [o[0] for o in outs],
            "seg_mask": [o[1] for o in outs], "landmarks": [a.landmarks for a in aligned],
            "affine": [a.affine for a in aligned],
            "uv_visible": [o[2].uv_visible[0] for o in outs],
            "uv_visible_mask": [o[2].uv_visible_mask[0] for o in outs],
            "uv_sampling_map": [o[2].uv_sampling_map[0] for o in outs],
            "uv_view_weight": [o[2].uv_view_weight[0] for o in outs],
            "occlusion_mask": [io.occlusion_mask for io, _ in occs],
            "uv_occlusion_mask": [uo for _, uo in occs]}
    out = {k: _stack(v, k, S, T) for k, v in cols.items()}
    out["sample_uri"] = np.array([p.source_uri for p in todo], dtype=np.str_)
    out["sha256"] = np.array([ing.sha256 for ing in ings], dtype=np.str_)
    out["subject_id"] = np.array([p.subject_id for p in todo], dtype=np.str_)
    out["group"] = np.array([getattr(p, "group", "") for p in todo], dtype=np.str_)
    out["landmark_source"] = np.array([a.source for a in aligned], dtype=np.str_)
    out["face_index"] = np.array(fidx, np.int32)
    out["occlusion_skipped"] = np.array([",".join(sorted(io.skipped)) for io, _ in occs],
                                        dtype=np.str_)
    out["orig_size"] = np.array([ing.image.shape[:2] for ing in ings], np.int32).reshape(-1, 2)
    n = len(todo)
    if n:
        for f in ("yaw", "pitch", "roll", "scale", "focal", "alpha", "beta", "landmark_rmse",
                  "landmark_nme", "iterations", "converged"):
            out["fit_" + f] = np.asarray(getattr(fit, f))
        out["fit_translation"] = fit.translation.reshape(n, -1)
    return Analysis(out, rejected)


def _dense_correspondence_or_fail(model) -> None:
    """fit.landmarks=dense needs the model's dense correspondence: fail the run before any
    work, not every sample."""
    from facecorpus.core.errors import AssetUnavailableError

    try:
        fit_mod.dense_correspondence(model)
    except FileNotFoundError as e:
        raise AssetUnavailableError(f"fit.landmarks=dense: {e}") from e


def _crop_focal(ing, aligned) -> float:
    """EXIF focal (px of the photo) mapped into the crop, NaN without one."""
    f = getattr(ing, "focal_px", lambda: None)()
    if f is None:
        return float("nan")
    return f * float(np.sqrt(abs(np.linalg.det(np.asarray(aligned.affine)[:, :2]))))


def _pad478(d: np.ndarray) -> np.ndarray:
    """(468|478, 2) -> (478, 2), missing iris points NaN."""
    out = np.full((478, 2), np.nan, np.float32)
    out[:len(d)] = d[:478]
    return out


def lms_of(aligned) -> np.ndarray:
    """(N, 68, 2) crop landmarks of aligned faces."""
    return np.stack([a.landmarks for a in aligned]).astype(np.float32)


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        ps = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values())


MAX_BACKGROUND = 0.5  # person segmentation calling more of the face region background: failed


def _trust_person(io):
    """Drop the person-segmentation cue when it calls most of the fitted face region
    background: it found no person at all (measured: a rendered procedural face, 97 % of its
    face region), not an occluder; the other cues stay and ``skipped`` says why."""
    region = io.face_region
    if not io.background.any() or (io.background & region).sum() <= MAX_BACKGROUND * max(
            int(region.sum()), 1):
        return io
    union = (io.hands | io.padding | io.saturated) & region
    none = np.zeros_like(io.background)
    return dataclasses.replace(io, occlusion_mask=union, background=none, skipped={
        **io.skipped, "background": f"person segmentation called > {MAX_BACKGROUND:.0%} of "
                                    "the face region background (no person found)"})


def _tag(rejected: list[RejectedRow], kept: list[int], fidx: list[int]) -> list[RejectedRow]:
    """The rejected rows of one per-face step (in sample order, as ``tasks.isolation``
    returns them) with their face: ``face k`` in the reason for k > 0 (``face_index`` is
    the manifest's column; the photo's first face keeps the plain reason)."""
    gone = sorted(set(range(len(fidx))) - set(kept))
    if len(gone) != len(rejected):
        return rejected
    out = []
    for i, r in zip(gone, rejected, strict=True):
        k = int(fidx[i])
        out.append(dataclasses.replace(r, reason=f"{r.reason} (face {k})") if k else r)
    return out


def _concat_fits(fits: list):
    if not fits:
        return None
    if len(fits) == 1:
        return fits[0]
    f0 = fits[0]
    kw = {}
    for fld in dataclasses.fields(f0):
        v = getattr(f0, fld.name)
        if isinstance(v, np.ndarray):
            kw[fld.name] = np.concatenate([getattr(f, fld.name) for f in fits])
        elif fld.name == "sh" and v is not None:
            kw[fld.name] = np.concatenate([f.sh for f in fits])
        else:
            kw[fld.name] = v
    return dataclasses.replace(f0, **kw)


def _fit_checks(stage: str, uris: list[str], fit, max_nme: float
                ) -> tuple[list[int], list[RejectedRow]]:
    """Reject fits that must not be used: ``tasks.fit.fit_failures`` (bad landmarks,
    non-finite parameters, a landmark error that says the fit diverged)."""
    if fit is None or not len(uris):
        return [], []
    why = fit_mod.fit_failures(fit, max_nme, "stage 2" if stage == "fit2" else "stage 1")
    keep = [i for i in range(len(uris)) if why[i] is None]
    return keep, [RejectedRow(uris[i], stage, f"fit diverged: {why[i]}"
                              if why[i].startswith("landmark error") else str(why[i]))
                  for i in range(len(uris)) if why[i] is not None]


def fit_from_arrays(a: dict, cfg):
    n = len(a["sample_uri"])
    return fit_mod.FitResult(
        camera=cfg.fit.camera, image_size=cfg.landmarks.crop_size,
        yaw=a["fit_yaw"], pitch=a["fit_pitch"], roll=a["fit_roll"],
        translation=a["fit_translation"], scale=a["fit_scale"], focal=a["fit_focal"],
        alpha=a["fit_alpha"], beta=a["fit_beta"], landmark_rmse=a["fit_landmark_rmse"],
        landmark_nme=a["fit_landmark_nme"], iterations=a["fit_iterations"],
        converged=a["fit_converged"].astype(bool),
        photometric_error=np.full(n, np.nan, np.float32))


def select_arrays(a: dict, idx) -> dict:
    idx = np.asarray(idx, np.int64)
    return {k: (v[idx] if isinstance(v, np.ndarray) and v.ndim and k != "rejected" else v)
            for k, v in a.items()}


# --------------------------------------------------------------------------- finish
@dataclass
class Finished:
    """The finish step's output: dataset arrays, manifest rows, rejected rows, sheet rows."""

    arrays: dict
    rows: list[dict]
    rejected: list[RejectedRow]
    sheet_rows: list


def finish(state: State, analysis: Analysis, prior, cfg, stages: Stages = STAGES, *,
           prior_version: str = "", schema_fields: dict | None = None) -> Finished:
    """Per-image prior, stage 2, occlusion rejection, blend, metrics of one analysed shard."""
    model = state.model
    a = analysis.arrays
    rejected = list(analysis.rejected)
    uris = [str(u) for u in a["sample_uri"]]
    n = len(uris)
    if n == 0:
        return Finished(_empty(schema_fields), [], rejected, [])
    fit = fit_from_arrays(a, cfg)
    uv_vis = a["uv_visible"].astype(np.float32)
    uv_mask = a["uv_visible_mask"]
    uv_map = a["uv_sampling_map"].astype(np.float32)
    uv_w = a["uv_view_weight"].astype(np.float32)
    per_image = prior.fit_to_visible(uv_vis, uv_mask)
    keep, rej = isolation.check_finite("prior", uris, "per-image prior", per_image)
    rejected += rej
    fc, uc = cfg.fit, cfg.unwrap
    sh = np.zeros((n, 27), np.float32)
    if fc.photometric_iters > 0 and len(keep):
        sub = fit.select(keep)

        # the image-space occlusion cues (hands, background, padding, clipped pixels) are
        # known from the analysis: stage 2 must not fit pose and light to them
        fit_mask = a["mask"] & ~a["occlusion_mask"].astype(bool)

        def refine_some(idx):
            ii = np.asarray(keep)[idx]
            r = stages.refine(model, sub.select(idx), a["image"][ii], fit_mask[ii],
                              per_image[ii], a["landmarks"][ii], fc)
            return [r.select([k]) for k in range(len(idx))]

        kuris = [uris[i] for i in keep]
        k2, fits, rej = isolation.batched("fit2", kuris, refine_some, len(keep))
        rejected += rej
        keep = [keep[i] for i in k2]
        fit2 = _concat_fits(fits)
        good, rej = _fit_checks("fit2", [uris[i] for i in keep], fit2, fc.max_nme)
        rejected += rej
        keep = [keep[i] for i in good]
        fit2 = fit2.select(good) if fit2 is not None else None

        def reunwrap(j, i):
            u = stages.unwrap(a["image"][i], fit2.vertices(model, j), fit2.camera_for(j),
                              model, uc.uv_size, a["mask"][i], min_cos=uc.min_cos)
            if not np.isfinite(u.uv_visible).all():
                raise ValueError("non-finite UV maps after stage 2")
            return u

        k3, outs, rej = isolation.each("unwrap", [uris[i] for i in keep], reunwrap,
                                       list(range(len(keep))), keep)
        rejected += rej
        keep = [keep[i] for i in k3]
        fit = fit2.select(k3) if fit2 is not None else None
        sh = fit.sh.astype(np.float32) if fit is not None else np.zeros((0, 27), np.float32)
        if outs:
            uv_vis = np.concatenate([o.uv_visible for o in outs])
            uv_mask = np.concatenate([o.uv_visible_mask for o in outs])
            uv_map = np.concatenate([o.uv_sampling_map for o in outs])
            uv_w = np.concatenate([o.uv_view_weight for o in outs])
        else:
            uv_vis = uv_vis[:0]
            uv_mask, uv_map, uv_w = uv_mask[:0], uv_map[:0], uv_w[:0]
        per_image = prior.fit_to_visible(uv_vis, uv_mask) if len(keep) else per_image[:0]
    else:
        fit = fit.select(keep)
        sh = sh[keep]
        uv_vis, uv_mask, uv_map, uv_w = uv_vis[keep], uv_mask[keep], uv_map[keep], uv_w[keep]
        per_image = per_image[keep]
    a = select_arrays(a, keep)
    uris = [uris[i] for i in keep]
    n = len(keep)
    if n == 0:
        return Finished(_empty(schema_fields), [], rejected, [])
    fidx = [int(x) for x in a.get("face_index", np.zeros(n, np.int32))]
    if cfg.nonrigid.enabled:
        k7, fit, outs, rej = _nonrigid(state, cfg, stages, a, fit, uris)
        rejected += _tag(rej, k7, fidx)
        if not k7:
            return Finished(_empty(schema_fields), [], rejected, [])
        a, sh, per_image = select_arrays(a, k7), sh[k7], per_image[k7]
        uris, fidx, n = [uris[i] for i in k7], [fidx[i] for i in k7], len(k7)
        uv_vis = np.concatenate([o.uv_visible for o in outs])
        uv_mask = np.concatenate([o.uv_visible_mask for o in outs])
        uv_map = np.concatenate([o.uv_sampling_map for o in outs])
        uv_w = np.concatenate([o.uv_view_weight for o in outs])
        per_image = prior.fit_to_visible(uv_vis, uv_mask)
    seen_mask = uv_mask.copy()  # visible before occlusion removal
    uv_occ = np.zeros_like(uv_mask)
    T = uc.uv_size
    oc = cfg.occlusion
    lit = fc.photometric_iters > 0

    residual = oc.em_light == "residual"

    def shading(j):
        """(SH irradiance of the stage-2 light or None, the normals the EM fits a light on or
        None): unlit, the EM fits the whole light; lit and ``residual``, the light left in
        the de-lit colour (stage 2 fits its light against a *lit* corpus prior, so the
        photo's directional shading mostly stays in the colour)."""
        n_uv = occ_mod.uv_normals(model, fit.vertices(model, j), fit.camera_for(j).rotation, T)
        if not lit:
            return None, n_uv
        return occ_mod.irradiance_on(n_uv, sh[j]), n_uv if residual else None

    def image_occ(j):  # the image-space cues moved into UV with the final sampling map
        return occ_mod.image_mask_to_uv(a["occlusion_mask"][j], uv_map[j]) & uv_mask[j]

    need_em = oc.enabled and oc.outliers and n >= oc.min_images
    skin_layout = skin_mod.skin_layout(model, T) if oc.enabled and oc.skin else None

    def occ_cues(j):  # image cues, then the skin cue (any shard size) on the lit albedo
        known = image_occ(j)
        sh_j = shading(j) if need_em or (skin_layout is not None and lit) else (None, None)
        if skin_layout is not None:
            known = known | stages.skin_outliers(
                uv_vis[j][None], uv_mask[j][None], skin_layout, oc,
                uv_shading=sh_j[0][None] if lit else None, uv_occlusion_mask=known[None])[0]
        return known, sh_j if need_em else None

    k5, occ_in, rej = isolation.each("occlusion", uris, occ_cues, list(range(n)))
    rejected += _tag(rej, k5, fidx)
    if len(k5) < n:
        a, fit, sh = select_arrays(a, k5), fit.select(k5), sh[k5]
        uv_vis, uv_mask, uv_map, uv_w = uv_vis[k5], uv_mask[k5], uv_map[k5], uv_w[k5]
        seen_mask, per_image = seen_mask[k5], per_image[k5]
        uris, fidx = [uris[i] for i in k5], [fidx[i] for i in k5]
        n = len(k5)
        if n == 0:
            return Finished(_empty(schema_fields), [], rejected, [])
    uv_occ_img = (np.stack([o[0] for o in occ_in]) if occ_in
                  else np.zeros_like(uv_mask))
    uv_occ = uv_occ_img.copy()
    if need_em and n >= oc.min_images:
        shade = np.stack([o[1][0] for o in occ_in]) if lit else None
        normals = (np.stack([o[1][1] for o in occ_in]) if occ_in[0][1][1] is not None
                   else None)

        def outliers_some(idx):
            r = stages.uv_outliers(uv_vis[idx], uv_mask[idx], state.mirror_map, oc,
                                   uv_shading=None if shade is None else shade[idx],
                                   uv_normals=None if normals is None else normals[idx],
                                   uv_occlusion_mask=uv_occ_img[idx])
            return list(r.uv_outliers)

        k6, outl, rej = isolation.batched("occlusion", uris, outliers_some, n)
        rejected += _tag(rej, k6, fidx)
        if len(k6) < n:
            a, fit, sh = select_arrays(a, k6), fit.select(k6), sh[k6]
            uv_vis, uv_mask, uv_map, uv_w = uv_vis[k6], uv_mask[k6], uv_map[k6], uv_w[k6]
            seen_mask, per_image, uv_occ = seen_mask[k6], per_image[k6], uv_occ[k6]
            uris, fidx = [uris[i] for i in k6], [fidx[i] for i in k6]
            n = len(k6)
            if n == 0:
                return Finished(_empty(schema_fields), [], rejected, [])
        uv_occ = uv_occ | np.stack(outl)
    occluded = occ_mod.occluded_fraction(uv_occ, seen_mask, state.layout)
    if uv_occ.any():
        uv_mask = uv_mask & ~uv_occ
        uv_vis = np.where(uv_mask[..., None], uv_vis, 0).astype(np.float32)
        per_image = prior.fit_to_visible(uv_vis, uv_mask)
    if uc.occlusion_threshold is not None:
        uv_mask = stages.occlusion(uv_vis, uv_mask, per_image, uc.occlusion_threshold)
        uv_vis = np.where(uv_mask[..., None], uv_vis, 0).astype(np.float32)
        per_image = prior.fit_to_visible(uv_vis, uv_mask)

    def blend_some(idx):
        b = stages.blend(uv_vis[idx], uv_mask[idx], per_image[idx], state.mirror_map,
                         mixed=cfg.blend.mixed, layout_mask=state.layout,
                         solver=blend_mod.solver_for(cfg.blend), visible=cfg.blend.visible,
                         edge_trim=cfg.blend.edge_trim)
        if not np.isfinite(b.uv_pseudo_gt).all():
            raise ValueError("non-finite uv_pseudo_gt")
        return list(zip(b.uv_pseudo_gt, b.uv_source, strict=True))

    keep, blended, rej = isolation.batched("blend", uris, blend_some, n)
    rejected += _tag(rej, keep, fidx)
    albedo = [None] * len(keep)
    if cfg.albedo.enabled:
        ka, albedo, rej = isolation.each(
            "albedo", [uris[i] for i in keep],
            lambda j, i: _albedo(state, cfg, stages, fit, a, i, sh[i], blended[j][0],
                                 prior.mean, uv_mask[i] & _unclipped(uv_vis[i])),
            list(range(len(keep))), keep)
        rejected += _tag(rej, ka, [fidx[i] for i in keep])
        keep, blended = [keep[i] for i in ka], [blended[i] for i in ka]

    def describe(j, i):
        row, sheet = _row_and_sheet(state, cfg, fit, a, i, blended[j][0], uv_vis[i],
                                    uv_mask[i], prior_version, uv_occ[i])
        row["occluded_fraction"] = float(occluded[i])
        if albedo[j] is not None:
            sheet.append(albedo[j]["uv_albedo"].astype(np.float32) / 255.0)
        return row, sheet

    k4, made, rej = isolation.each("metrics", [uris[i] for i in keep], describe,
                                   list(range(len(keep))), keep)
    rejected += _tag(rej, k4, [fidx[i] for i in keep])
    keep, blended = [keep[i] for i in k4], [blended[i] for i in k4]
    albedo = [albedo[i] for i in k4]
    if not keep:
        return Finished(_empty(schema_fields), [], rejected, [])
    rows = [m[0] for m in made]
    sheet_rows = [m[1] for m in made]
    k = np.asarray(keep, np.int64)
    n = len(keep)
    T = cfg.unwrap.uv_size
    fk = fit.select(keep) if n else None
    arrays = {
        "image": a["image"][k].astype(np.uint8),
        "mask": a["mask"][k][..., None].astype(np.uint8),
        "seg_mask": a["seg_mask"][k][..., None].astype(np.uint8),
        "landmarks": a["landmarks"][k].astype(np.float32),
        "uv_visible": _to_u8(uv_vis[k]),
        "uv_visible_mask": uv_mask[k][..., None].astype(np.uint8),
        "uv_sampling_map": uv_map[k].astype(np.float16),
        "uv_view_weight": _to_u8(uv_w[k][..., None]),
        "uv_pseudo_gt": (_to_u8(np.stack([b[0] for b in blended])) if n
                         else np.zeros((0, T, T, 3), np.uint8)),
        "occlusion_mask": a["occlusion_mask"][k][..., None].astype(np.uint8),
        "uv_occlusion_mask": uv_occ[k][..., None].astype(np.uint8),
        "uv_source": (np.stack([b[1] for b in blended])[..., None] if n
                      else np.zeros((0, T, T, 1))).astype(np.uint8),
        "id_coeffs": _pad_cols(fk.alpha if fk is not None else None, n),
        "exp_coeffs": _pad_cols(fk.beta if fk is not None else None, n),
        "sh": sh[k].astype(np.float32),
    }
    if cfg.nonrigid.enabled:
        arrays["vertex_offsets"] = fk.vertex_offsets.astype(np.float32)
    if cfg.albedo.enabled:
        for name in ALBEDO_FIELDS:
            arrays[name] = np.stack([x[name] for x in albedo])
    return Finished(arrays, rows, rejected, sheet_rows)


ALBEDO_FIELDS = ("uv_albedo", "uv_irradiance", "uv_mask", "face_mask", "albedo_sh")


def _albedo(state, cfg, stages, fit, a, i, sh_i, uv_pseudo_gt, reflectance, seen) -> dict:
    """One sample's de-lit texture and masks, from the pseudo-GT as stored (8-bit), so the
    stored ``uv_albedo x uv_irradiance`` reproduces the stored ``uv_pseudo_gt``.
    ``light: refit`` solves the light on ``seen`` (visible, unoccluded texels) with the
    prior's mean ``reflectance`` (T, T, 3) (``tasks.albedo`` module docstring)."""
    model, ac = state.model, cfg.albedo
    v, cam = fit.vertices(model, i), fit.camera_for(i)
    pgt = _to_u8(uv_pseudo_gt)[None]
    if albedo_mod.light_mode(ac.light, cfg.prior.kind, model.has_albedo) == "refit":
        basis = albedo_mod.uv_sh_basis(model, v, cam.rotation, cfg.unwrap.uv_size)
        sh_i = stages.albedo_light(pgt[0], reflectance, basis, seen, ac)
    al = stages.delight(pgt, np.asarray(sh_i, np.float32)[None], model, v[None],
                        cam.rotation[None], min_irradiance=ac.min_irradiance,
                        max_albedo=ac.max_albedo)
    if not (np.isfinite(al.uv_albedo).all() and np.isfinite(al.uv_irradiance).all()):
        raise ValueError("non-finite albedo")
    proj = masks_mod.projected_region_mask(model, v, cam, cfg.unwrap.face_region)
    fm = albedo_mod.face_mask_image(a["seg_mask"][i].astype(bool), proj,
                                    a["occlusion_mask"][i].astype(bool))
    return {"uv_albedo": _to_u8(al.uv_albedo[0]),
            "uv_irradiance": al.uv_irradiance[0].astype(np.float16),
            "uv_mask": al.uv_mask[0][..., None].astype(np.uint8),
            "face_mask": fm[..., None].astype(np.uint8),
            "albedo_sh": al.sh[0].astype(np.float32)}


def _unclipped(uv_visible: np.ndarray) -> np.ndarray:
    """(T, T) bool texels whose photo colour did not clip at 8-bit white in any channel: the
    light solve skips the others (the blend can move a clipped texel below white, so the
    pseudo-GT alone does not show the clipping)."""
    return (np.asarray(uv_visible) < 254.5 / 255).all(-1)


def sheet_labels(cfg) -> list[str]:
    """The contact sheet's column labels for this config."""
    return SHEET_LABELS + (["uv_albedo"] if cfg.albedo.enabled else [])


def _nonrigid(state, cfg, stages, a, fit, uris):
    """The non-rigid refinement of every sample (``tasks.nonrigid``) and the unwrap with the
    refined mesh and camera: (kept indices, the :class:`~facecorpus.tasks.nonrigid
    .RefinedFit` of the kept, their unwraps, rejected rows with stage ``nonrigid``)."""
    model, uc, S = state.model, cfg.unwrap, cfg.landmarks.crop_size

    def one(j):
        f = fit.select([j])
        nr = stages.nonrigid(model, f, a["landmarks"][j:j + 1], S, cfg.nonrigid)
        if nr.failure[0] is not None:
            raise SampleRejected(uris[j], "nonrigid", str(nr.failure[0]))
        rf = nonrigid_mod.refined_fit(f, nr)
        u = stages.unwrap(a["image"][j], rf.vertices(model, 0), rf.camera_for(0), model,
                          uc.uv_size, a["mask"][j], min_cos=uc.min_cos)
        if not np.isfinite(u.uv_visible).all():
            raise ValueError("non-finite UV maps after the non-rigid refinement")
        return rf, u

    kept, res, rej = isolation.each("nonrigid", uris, one, list(range(len(uris))))
    rf = _concat_fits([r[0] for r in res])
    return kept, rf, [r[1] for r in res], rej


def _empty(schema_fields: dict | None) -> dict:
    if schema_fields is None:
        return {}
    return {k: np.zeros((0, *f.shape), f.dtype) for k, f in schema_fields.items()}


def _row_and_sheet(state, cfg, fit, a, i, uv_pseudo_gt, uv_vis, uv_mask, prior_version,
                   uv_occ=None):
    m = rerender_metrics(state, fit, i, a["image"][i], a["mask"][i], uv_pseudo_gt)
    rerendered = m.pop("_rerender")
    uri = str(a["sample_uri"][i])
    k = int(a["face_index"][i]) if "face_index" in a else 0
    sid = str(a["sha256"][i])[:16] + (f"-f{k}" if k else "")
    row = {"sample_id": sid, "source_uri": uri, "face_index": k, "subject_id": str(a["subject_id"][i]) or sid,
           "group": str(a["group"][i]) if "group" in a else "",
           "yaw": float(fit.yaw[i]), "pitch": float(fit.pitch[i]),
           "roll": float(fit.roll[i]), "split": split(sid, cfg.output.val_fraction),
           "sha256": str(a["sha256"][i]), "landmark_source": str(a["landmark_source"][i]),
           "landmark_rmse": float(fit.landmark_rmse[i]),
           "landmark_nme": float(fit.landmark_nme[i]),
           "photometric_error": float(fit.photometric_error[i]),
           "iterations": int(fit.iterations[i]), "converged": bool(fit.converged[i]),
           "camera": fit.camera, "scale": float(fit.scale[i]), "focal": float(fit.focal[i]),
           "visible_fraction": float(uv_mask[state.layout].mean()),
           "orig_height": int(a["orig_size"][i][0]), "orig_width": int(a["orig_size"][i][1]),
           "occlusion_skipped": str(a["occlusion_skipped"][i]) if "occlusion_skipped" in a
           else ""}
    t = np.zeros(3)
    t[:fit.translation.shape[1]] = fit.translation[i]
    row.update(tx=float(t[0]), ty=float(t[1]), tz=float(t[2]))
    for r_ in range(2):
        for c_ in range(3):
            row[f"crop_a{r_}{c_}"] = float(a["affine"][i][r_, c_])
    row.update(m)
    if prior_version:
        row["prior_version"] = prior_version
    if getattr(fit, "focal_scale", None) is not None:  # non-rigid: the refined focal
        row["focal_scale"] = float(fit.focal_scale[i])
    occ = np.zeros(uv_vis.shape[:2], bool) if uv_occ is None else uv_occ
    # occluded texels red over the (occlusion-removed) visible map
    occ_view = np.where(occ[..., None], np.array([1.0, 0.0, 0.0], np.float32), uv_vis)
    sheet = [a["image"][i], overlay(state, fit, i, a["image"][i], a["landmarks"][i]), occ_view,
             uv_pseudo_gt, rerendered]
    return row, sheet


def _pad_cols(x, n):
    if x is None or x.size == 0:
        return np.zeros((n, 1), np.float32)
    return np.asarray(x, np.float32).reshape(n, -1)


def _to_u8(x):
    return (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def split(sample_id: str, val_fraction: float) -> str:
    """train/val from a hash of the sample id: stable whatever shard or run makes it."""
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def rerender_metrics(state, fit, i, image, mask, uv_pseudo_gt) -> dict:
    """Re-render ``uv_pseudo_gt`` with the fitted parameters (unlit: the map carries the
    photo's shading) and compare with the photo over the face mask: L1 (0-1), PSNR, SSIM."""
    from facecorpus.renderers.render import render
    from skimage.metrics import structural_similarity

    model = state.model
    amb = np.zeros(27, np.float32)
    amb[0::9] = 2 / np.sqrt(np.pi)  # irradiance 1: plain texture lookup
    r = render(fit.vertices(model, i), model.triangles, fit.camera_for(i), outputs=("image",),
               uv=model.uv, uv_triangles=model.uv_triangles, uv_texture=uv_pseudo_gt, sh=amb)
    photo = image.astype(np.float32) / 255.0
    rr = r.image[0]
    m = mask & r.mask[0]
    out = {"rerender_l1": float("nan"), "rerender_psnr": float("nan"),
           "rerender_ssim": float("nan")}
    if m.sum() >= 16:
        d = rr[m] - photo[m]
        mse = float((d ** 2).mean())
        _, smap = structural_similarity(photo, rr, channel_axis=-1, data_range=1.0, full=True)
        out = {"rerender_l1": float(np.abs(d).mean()),
               "rerender_psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
               "rerender_ssim": float(smap[m].mean())}
    out["_rerender"] = np.where(r.mask[0][..., None], rr, photo * 0.3)
    return out


def overlay(state, fit, i, image, landmarks) -> np.ndarray:
    """The photo with the fitted mesh (shaded, half transparent) and landmarks drawn."""
    from facecorpus.renderers.render import render

    r = render(fit.vertices(state.model, i), state.model.triangles, fit.camera_for(i),
               outputs=("image",))
    photo = image.astype(np.float32) / 255.0
    m = r.mask[0][..., None]
    img = np.where(m, 0.5 * photo + 0.5 * r.image[0], photo)
    lm_fit = fit_mod.project_landmarks(state.model, fit.select([i]))[0]
    for pts, colour in ((landmarks, (0.0, 1.0, 0.0)), (lm_fit, (1.0, 0.2, 0.2))):
        for x, y in pts:
            c, r_ = int(x), int(y)
            if 0 <= r_ < img.shape[0] and 0 <= c < img.shape[1]:
                img[max(r_ - 1, 0):r_ + 2, max(c - 1, 0):c + 2] = colour
    return img


SHEET_LABELS = ["input", "fitted overlay", "uv_visible (occluded red)", "uv_pseudo_gt",
                "re-render"]


# --------------------------------------------------------------------------- dataset
def schema(state: State, cfg, content_config: dict, layout_hash: str):
    """The pseudo-GT dataset's schema (``config_hash``: what fixes the layout of the arrays,
    so a content change recomputes shards instead of refusing the dataset)."""
    from facecorpus.datasets.store import DatasetSchema, FieldSpec

    m = state.model
    n_id = m.n_id if cfg.fit.n_id is None else min(cfg.fit.n_id, m.n_id)
    n_exp = m.n_exp if cfg.fit.n_exp is None else min(cfg.fit.n_exp, m.n_exp)
    S, T = cfg.landmarks.crop_size, cfg.unwrap.uv_size
    f = {
        "image": FieldSpec((S, S, 3), "uint8", "srgb", "aligned face crop"),
        "mask": FieldSpec((S, S, 1), "uint8", "0/1", "sampling face mask (eroded)"),
        "seg_mask": FieldSpec((S, S, 1), "uint8", "0/1",
                              "convex hull of the projected face-boundary vertices"),
        "landmarks": FieldSpec((68, 2), "float32", "px", "68 Multi-PIE points in the crop"),
        "uv_visible": FieldSpec((T, T, 3), "uint8", "srgb", "photo sampled into UV"),
        "uv_visible_mask": FieldSpec((T, T, 1), "uint8", "0/1", "visible texels"),
        "uv_sampling_map": FieldSpec((T, T, 2), "float16", "grid_sample xy",
                                     "normalised image x, y per texel (align_corners=False), "
                                     "-2 outside the layout"),
        "uv_view_weight": FieldSpec((T, T, 1), "uint8", "cos*255", "view-angle cosine"),
        "occlusion_mask": FieldSpec((S, S, 1), "uint8", "0/1", "image-space occlusion cues "
                                    "(hands, background, padding, saturation) in the crop"),
        "uv_occlusion_mask": FieldSpec((T, T, 1), "uint8", "0/1", "occluded texels (image "
                                       "cues in UV | cross-fitted outliers), removed from "
                                       "uv_visible_mask and filled like invisible ones"),
        "uv_pseudo_gt": FieldSpec((T, T, 3), "uint8", "srgb", "complete pseudo-GT UV map"),
        "uv_source": FieldSpec((T, T, 1), "uint8", "0 prior/1 visible/2 mirrored",
                               "where each uv_pseudo_gt texel came from"),
        "id_coeffs": FieldSpec((max(n_id, 1),), "float32", "model units", "identity alpha"),
        "exp_coeffs": FieldSpec((max(n_exp, 1),), "float32", "model units", "expression beta"),
        "sh": FieldSpec((27,), "float32", "SH coefficients", "fitted light (stage 2) or 0"),
    }
    if cfg.nonrigid.enabled:
        f["vertex_offsets"] = FieldSpec((m.n_vertices, 3), "float32", "mm", "non-rigid "
                                        "corrective field dP: the mesh is shape(id, exp) + dP")
    if cfg.albedo.enabled:
        f.update({
            "uv_albedo": FieldSpec((T, T, 3), "uint8", "linear 0-1 x 255", "uv_pseudo_gt / "
                                   "uv_irradiance, clipped to [0, albedo.max_albedo]"),
            "uv_irradiance": FieldSpec((T, T, 3), "float16", "irradiance", "SH irradiance of "
                                       "the fitted mesh under albedo_sh (unclamped); "
                                       "uv_albedo x this re-renders uv_pseudo_gt on uv_mask"),
            "albedo_sh": FieldSpec((27,), "float32", "SH coefficients", "the light uv_albedo "
                                   "was de-lit by: albedo.light refit (albedo-space solve) "
                                   "or stage2 (= sh)"),
            "uv_mask": FieldSpec((T, T, 1), "uint8", "0/1", "M_uv: layout texels with "
                                 "irradiance >= albedo.min_irradiance and unclipped albedo"),
            "face_mask": FieldSpec((S, S, 1), "uint8", "0/1", "M_face = seg_mask x the "
                                   "fitted face region's projection, minus occlusion_mask"),
        })
    attrs = {"model": m.name, "model_hash": m.content_hash(), "camera": cfg.fit.camera,
             "config": content_config, "uv_regions": "uv_regions.npz"}
    return DatasetSchema(f, samples_per_shard=cfg.output.samples_per_shard, samples_per_chunk=1,
                         producer="pseudo_gt", config_hash=layout_hash, attrs=attrs)


def uv_regions(state: State, uv_size: int) -> dict:
    """The model's UV layout and centre/side region masks (texels seen by a frontal view and
    by views turned 60 degrees either way, mean face, cos > 0.3)."""
    from facecorpus.renderers.cameras import framing_camera

    v = state.model.vertices
    seen = {}
    # positive yaw turns the nose to image right: the head turns to the subject's left and
    # the camera sees the subject's *right* cheek (renderers.cameras conventions)
    for name, yaw in (("centre", 0.0), ("right", 60.0), ("left", -60.0)):
        cam = framing_camera(v, 256, 256, yaw=yaw)
        img = np.zeros((256, 256, 3), np.float32)
        u = unwrap_mod.unwrap_one(img, v, cam, state.model, uv_size, None, min_cos=0.3)
        seen[name] = u.uv_visible_mask[0]
    return {"layout": state.layout, "centre": seen["centre"],
            "side_left": seen["left"] & ~seen["centre"],
            "side_right": seen["right"] & ~seen["centre"]}


def uv_regions_npz(state: State, uv_size: int) -> tuple[bytes, dict]:
    """(the ``uv_regions.npz`` bytes: mirror map + :func:`uv_regions` as uint8, the regions)."""
    import io

    regions = uv_regions(state, uv_size)
    buf = io.BytesIO()
    np.savez(buf, mirror_map=state.mirror_map,
             **{k: v.astype(np.uint8) for k, v in regions.items()})
    return buf.getvalue(), regions
