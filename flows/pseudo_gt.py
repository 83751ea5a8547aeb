"""The pseudo-GT flow: photos -> landmarks -> 3DMM fit -> UV unwrap -> prior -> Poisson blend.

Work unit: a **shard** = ``output.samples_per_shard`` consecutive inputs (input order after
listing). Three phases, because the texture prior is built from the whole corpus:

1. **analyse** (one task per shard): ingest, landmarks + crop, stage-1 fit, face masks,
   unwrap. Saved to ``OUT/_work/analysis-<shard>-<key>.npz`` (no pickle), so a rerun never
   repeats it.
2. **prior** (once): robust mean UV texture (+ PCA) of all visible texels, or the model's
   albedo, or a user texture; ``OUT/_work/prior-<key>.npz`` and ``OUT/prior.png``.
3. **finish** (one task per shard): per-image prior fit, optional stage-2 photometric
   refinement + re-unwrap, occlusion rejection, two-pass blend, re-render metrics; the shard
   is committed whole by the dataset writer with its rejected rows, and a contact sheet
   ``OUT/sheets/shard-<id>.png`` (input | fitted overlay | uv_visible | uv_pseudo_gt |
   re-render) is written.

Resume: every shard has a content key (config, model, its inputs' bytes, and for phase 3 the
prior); committed shards with the same key are skipped, analyses with the same key are
reused. ``inputs = accepted + rejected`` holds per shard and overall.

Outputs under ``OUT``: ``dataset/`` (Zarr + Parquet; ``dataset/uv_regions.npz`` holds the
model's UV layout, mirror map and centre/side region masks, with PNGs beside it),
``summary.json``, ``sheets/``, ``prior.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from facecorpus.configs.pseudo_gt import PseudoGTConfig
from facecorpus.flows import runtime

log = logging.getLogger("facecorpus.pseudo_gt")

DATASET = "dataset"
WORK = "_work"
METRICS = ("landmark_rmse", "landmark_nme", "photometric_error", "rerender_l1",
           "rerender_psnr", "rerender_ssim", "visible_fraction")


# --------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None
                ) -> PseudoGTConfig:
    """Read a YAML config (default: the shipped ``pseudo_gt.yaml``), apply dotted
    ``overrides`` ({"fit.camera": "perspective"}), validate."""
    from facecorpus.configs import default_config_path
    from facecorpus.configs.base import read_yaml, validate

    p = Path(path) if path else default_config_path("pseudo_gt.yaml")
    data = read_yaml(p)
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = value
    return validate(PseudoGTConfig, data, str(p))


def content_config(cfg: PseudoGTConfig) -> dict:
    """What determines the output bytes (not how it is scheduled)."""
    return cfg.model_dump(mode="json", exclude={"workers", "task_runner", "dask_address",
                                                "retries"})


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- context
@dataclass(eq=False)
class Context:
    """What every shard shares (built once per process, cached by config content)."""

    cfg: PseudoGTConfig
    config_hash: str
    model: object
    layout: np.ndarray  # (T, T) bool texels of the UV layout
    mirror_map: np.ndarray  # (T, T, 2) int32
    template: np.ndarray  # (68, 2) landmark template (fallback detector)
    _detector: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # one detection at a time per process: mediapipe's landmarker is not thread-safe and
    # shards may run on a thread pool
    detect_lock: threading.Lock = field(default_factory=threading.Lock)

    def detector(self):
        from facecorpus.tasks.landmarks import LandmarkDetector

        with self._lock:
            if self._detector is None:
                lc = self.cfg.landmarks
                self._detector = LandmarkDetector(self.template, lc.mediapipe_model,
                                                  lc.fallback)
            return self._detector


_CONTEXTS: dict[str, Context] = {}
_CONTEXT_LOCK = threading.Lock()


def build_context(cfg: PseudoGTConfig) -> Context:
    key = _hash(json.dumps(content_config(cfg), sort_keys=True))
    with _CONTEXT_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            from facecorpus.meshops.catalog import load_model
            from facecorpus.meshops.uv import rasterize_uv, uv_mirror_map
            from facecorpus.tasks.landmarks import landmark_template

            model = load_model(cfg.model)
            T = cfg.unwrap.uv_size
            ctx = Context(cfg, _hash(key, model.content_hash())[:32], model,
                          rasterize_uv(model.uv, model.uv_triangles, T).mask.copy(),
                          uv_mirror_map(model, T), landmark_template(model))
            _CONTEXTS[key] = ctx
        return ctx


# --------------------------------------------------------------------------- planning
@dataclass
class ShardPlan:
    shard: int
    records: list[dict]  # InputRecord fields (landmarks as lists), "duplicate_of" when dup
    key: str  # content key of phase 1 (config + model + inputs)


def _record_dict(r, dup: str | None) -> dict:
    return {"source_uri": r.source_uri, "sha256": r.sha256, "subject_id": r.subject_id,
            "mask_uri": r.mask_uri, "duplicate_of": dup,
            "landmarks": None if r.landmarks is None else np.asarray(r.landmarks).tolist()}


def plan_shards(ctx: Context, input_spec: str) -> list[ShardPlan]:
    """List inputs, hash their bytes (duplicates are marked, rejected later in their shard),
    cut into shards and give each its content key."""
    from facecorpus.tasks.ingest import deduplicate, list_inputs

    records = list_inputs(input_spec)
    unique, dup_rows = deduplicate(records)
    dup_of = {r["source_uri"]: r["reason"] for r in dup_rows}
    digest = {r.source_uri: r.sha256 for r in unique}
    rows = []
    for r in records:
        d = _record_dict(r, dup_of.get(r.source_uri))
        d["sha256"] = digest.get(r.source_uri, "")
        rows.append(d)
    n = ctx.cfg.output.samples_per_shard
    plans = []
    for s in range(0, len(rows), n):
        chunk = rows[s:s + n]
        key = _hash(ctx.config_hash, json.dumps(chunk, sort_keys=True))[:40]
        plans.append(ShardPlan(s // n, chunk, key))
    return plans


def _record(d: dict):
    from facecorpus.tasks.ingest import InputRecord

    lm = None if d["landmarks"] is None else np.asarray(d["landmarks"], np.float32)
    return InputRecord(d["source_uri"], lm, d["mask_uri"], d["subject_id"], d["sha256"])


# --------------------------------------------------------------------------- phase 1
def _analysis_path(out: Path, plan: ShardPlan) -> Path:
    return out / WORK / f"analysis-{plan.shard:05d}-{plan.key[:16]}.npz"


def _save_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def analyse_shard(cfg: PseudoGTConfig, plan: ShardPlan, out: str | os.PathLike) -> dict:
    """Phase 1 of one shard; returns counts. Idempotent: an existing analysis is reused."""
    out = Path(out)
    path = _analysis_path(out, plan)
    if path.is_file():
        a = _load_npz(path)
        return {"shard": plan.shard, "reused": True, "accepted": len(a["sample_uri"]),
                "rejected": len(json.loads(str(a["rejected"])))}
    arrays = analyse_records(build_context(cfg), plan.records)
    _save_npz(path, arrays)
    return {"shard": plan.shard, "reused": False, "accepted": len(arrays["sample_uri"]),
            "rejected": len(json.loads(str(arrays["rejected"])))}


def analyse_records(ctx: Context, records: list[dict]) -> dict:
    """Ingest, landmarks, fit (stage 1), masks and unwrap of a list of input records.

    Returns a dict of plain arrays (N accepted images) plus ``rejected`` (JSON text).
    """
    from facecorpus.tasks.fit import FitOptions, fit_landmarks
    from facecorpus.tasks.ingest import IngestOptions, Rejection, ingest_one
    from facecorpus.tasks.landmarks import align_face
    from facecorpus.tasks.masks import face_mask, segmentation_mask
    from facecorpus.tasks.unwrap import unwrap_one

    cfg, model = ctx.cfg, ctx.model
    S, T = cfg.landmarks.crop_size, cfg.unwrap.uv_size
    ic = cfg.ingest
    opts = IngestOptions(ic.max_megapixels, ic.grayscale, ic.alpha)
    rejected: list[dict] = []
    kept: list[tuple] = []  # (record dict, ingested, aligned)
    det = ctx.detector()
    for d in records:
        if d.get("duplicate_of"):
            rejected.append({"source_uri": d["source_uri"], "stage": "ingest",
                             "reason": d["duplicate_of"]})
            continue
        try:
            ing = ingest_one(_record(d), opts)
            with ctx.detect_lock:
                lm = det.detect(ing.image, d["source_uri"], given=ing.record.landmarks)
            kept.append((d, ing, align_face(ing.image, lm, S, mask=ing.mask)))
        except Rejection as e:
            rejected.append(e.row())
    fc = cfg.fit
    n = len(kept)
    out: dict[str, np.ndarray] = {}
    if n:
        fit = fit_landmarks(model, np.stack([a.landmarks for _, _, a in kept]), S, FitOptions(
            camera=fc.camera, fov_deg=fc.fov_deg, n_id=fc.n_id, n_exp=fc.n_exp,
            rounds=fc.rounds, iters_per_round=fc.iters_per_round,
            slide_min_yaw=fc.slide_min_yaw, max_nme=fc.max_nme))
        ok = np.isfinite(fit.landmark_nme) & (fit.landmark_nme < fc.max_nme)
        for i in np.flatnonzero(~ok):
            rejected.append({"source_uri": kept[i][0]["source_uri"], "stage": "fit",
                             "reason": f"fit diverged: landmark error {fit.landmark_nme[i]:.3f}"
                                       f" of the inter-ocular distance > {fc.max_nme}"})
        idx = np.flatnonzero(ok)
        kept = [kept[i] for i in idx]
        fit = fit.select(idx)
        n = len(kept)
    cols: dict[str, list] = {k: [] for k in (
        "image", "mask", "seg_mask", "landmarks", "affine", "uv_visible", "uv_visible_mask",
        "uv_sampling_map", "uv_view_weight")}
    for i, (_d, _ing, a) in enumerate(kept):
        v, cam = fit.vertices(model, i), fit.camera_for(i)
        fm = face_mask(model, v, cam, oval=a.oval, given=a.mask, region=cfg.unwrap.face_region,
                       erode_px=cfg.unwrap.erode_px)
        u = unwrap_one(a.image, v, cam, model, T, fm, min_cos=cfg.unwrap.min_cos)
        cols["image"].append(a.image)
        cols["mask"].append(fm)
        cols["seg_mask"].append(segmentation_mask(model, v, cam, cfg.unwrap.face_region))
        cols["landmarks"].append(a.landmarks)
        cols["affine"].append(a.affine)
        cols["uv_visible"].append(u.uv_visible[0])
        cols["uv_visible_mask"].append(u.uv_visible_mask[0])
        cols["uv_sampling_map"].append(u.uv_sampling_map[0])
        cols["uv_view_weight"].append(u.uv_view_weight[0])
    shapes = {"image": (S, S, 3), "mask": (S, S), "seg_mask": (S, S), "landmarks": (68, 2),
              "affine": (2, 3), "uv_visible": (T, T, 3), "uv_visible_mask": (T, T),
              "uv_sampling_map": (T, T, 2), "uv_view_weight": (T, T)}
    # float16 maps halve the work files (outputs are 8-bit / float16 anyway)
    dtypes = {"image": np.uint8, "mask": bool, "seg_mask": bool, "uv_visible_mask": bool,
              "uv_visible": np.float16, "uv_sampling_map": np.float16,
              "uv_view_weight": np.float16}
    for k, parts in cols.items():
        out[k] = (np.stack(parts) if parts else np.zeros((0, *shapes[k]))).astype(
            dtypes.get(k, np.float32))
    out["sample_uri"] = np.array([d["source_uri"] for d, _, _ in kept], dtype=np.str_)
    out["sha256"] = np.array([ing.sha256 for _, ing, _ in kept], dtype=np.str_)
    out["subject_id"] = np.array([d["subject_id"] for d, _, _ in kept], dtype=np.str_)
    out["landmark_source"] = np.array([a.source for _, _, a in kept], dtype=np.str_)
    out["orig_size"] = np.array([ing.image.shape[:2] for _, ing, _ in kept], np.int32
                                ).reshape(-1, 2)
    if n:
        for f in ("yaw", "pitch", "roll", "scale", "focal", "alpha", "beta", "landmark_rmse",
                  "landmark_nme", "iterations", "converged"):
            out["fit_" + f] = np.asarray(getattr(fit, f))
        out["fit_translation"] = fit.translation.reshape(n, -1)
    out["rejected"] = np.array(json.dumps(rejected))
    return out


def _fit_from_arrays(a: dict, cfg: PseudoGTConfig):
    from facecorpus.tasks.fit import FitResult

    n = len(a["sample_uri"])
    return FitResult(
        camera=cfg.fit.camera, image_size=cfg.landmarks.crop_size,
        yaw=a["fit_yaw"], pitch=a["fit_pitch"], roll=a["fit_roll"],
        translation=a["fit_translation"], scale=a["fit_scale"], focal=a["fit_focal"],
        alpha=a["fit_alpha"], beta=a["fit_beta"], landmark_rmse=a["fit_landmark_rmse"],
        landmark_nme=a["fit_landmark_nme"], iterations=a["fit_iterations"],
        converged=a["fit_converged"].astype(bool),
        photometric_error=np.full(n, np.nan, np.float32))


# --------------------------------------------------------------------------- phase 2
def build_prior_from_analyses(ctx: Context, out: Path, plans: list[ShardPlan]):
    """The run's texture prior (cached under ``_work`` by the analyses' keys)."""
    from facecorpus.tasks.prior import TexturePrior, build_prior

    pc = ctx.cfg.prior
    key = _hash(ctx.config_hash, *[p.key for p in plans])[:24]
    path = out / WORK / f"prior-{key}.npz"
    if path.is_file():
        z = _load_npz(path)
        return TexturePrior(z["mean"], z.get("basis"), z.get("std"), str(z["source"])), key
    # an even subsample of at most max_images over the whole corpus, read shard by shard
    # (npz members load on access: only the selected maps are ever in memory)
    counts = []
    for p in plans:
        with np.load(_analysis_path(out, p), allow_pickle=False) as z:
            counts.append(len(z["sample_uri"]))
    total = sum(counts)
    sel = np.unique(np.linspace(0, total - 1, min(total, pc.max_images)).round().astype(int))
    T = ctx.cfg.unwrap.uv_size
    vis, msk = [np.zeros((0, T, T, 3), np.float32)], [np.zeros((0, T, T), bool)]
    start = 0
    for p, n in zip(plans, counts, strict=True):
        local = sel[(sel >= start) & (sel < start + n)] - start
        start += n
        if local.size:
            with np.load(_analysis_path(out, p), allow_pickle=False) as z:
                vis.append(z["uv_visible"][local].astype(np.float32))
                msk.append(z["uv_visible_mask"][local])
    vis, msk = np.concatenate(vis), np.concatenate(msk)
    prior = build_prior(vis, msk, model=ctx.model, mirror_map=ctx.mirror_map, kind=pc.kind,
                        texture_path=pc.texture, pca_rank=pc.pca_rank,
                        pca_min_images=pc.pca_min_images)
    prior.mean = np.where(ctx.layout[..., None], prior.mean, 0).astype(np.float32)
    arrays = {"mean": prior.mean, "source": np.array(prior.source)}
    if prior.basis is not None:
        arrays.update(basis=prior.basis, std=prior.std)
    _save_npz(path, arrays)
    from PIL import Image

    Image.fromarray((np.clip(prior.mean, 0, 1) * 255 + 0.5).astype(np.uint8)).save(
        out / "prior.png")
    return prior, key


# --------------------------------------------------------------------------- phase 3
def schema(ctx: Context, n_id: int, n_exp: int):
    from facecorpus.datasets.store import DatasetSchema, FieldSpec

    S, T = ctx.cfg.landmarks.crop_size, ctx.cfg.unwrap.uv_size
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
        "uv_pseudo_gt": FieldSpec((T, T, 3), "uint8", "srgb", "complete pseudo-GT UV map"),
        "uv_source": FieldSpec((T, T, 1), "uint8", "0 prior/1 visible/2 mirrored",
                               "where each uv_pseudo_gt texel came from"),
        "id_coeffs": FieldSpec((max(n_id, 1),), "float32", "model units", "identity alpha"),
        "exp_coeffs": FieldSpec((max(n_exp, 1),), "float32", "model units", "expression beta"),
        "sh": FieldSpec((27,), "float32", "SH coefficients", "fitted light (stage 2) or 0"),
    }
    spc = ctx.cfg.output.samples_per_shard
    attrs = {"model": ctx.model.name, "model_hash": ctx.model.content_hash(),
             "camera": ctx.cfg.fit.camera, "config": content_config(ctx.cfg),
             "uv_regions": "uv_regions.npz"}
    return DatasetSchema(f, samples_per_shard=spc, samples_per_chunk=1, producer="pseudo_gt",
                         config_hash=ctx.config_hash, attrs=attrs)


def open_writer(ctx: Context, out: str | os.PathLike):
    from facecorpus.datasets.store import DatasetWriter

    m = ctx.model
    n_id = m.n_id if ctx.cfg.fit.n_id is None else min(ctx.cfg.fit.n_id, m.n_id)
    n_exp = m.n_exp if ctx.cfg.fit.n_exp is None else min(ctx.cfg.fit.n_exp, m.n_exp)
    root = Path(out) / DATASET
    root.parent.mkdir(parents=True, exist_ok=True)
    return DatasetWriter(str(root), schema(ctx, n_id, n_exp))


@dataclass
class ShardResult:
    shard: int
    skipped: bool = False
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def finish_key(plan: ShardPlan, prior_key: str) -> str:
    return f"{plan.key[:40]}:{prior_key}"


def finish_shard(cfg: PseudoGTConfig, writer, plan: ShardPlan, out: str | os.PathLike,
                 prior_key: str) -> dict:
    """Phase 3 of one shard; commits it. Skips a shard committed with the same key."""
    t0 = time.perf_counter()
    ctx = build_context(cfg)
    key = finish_key(plan, prior_key)
    res = ShardResult(plan.shard, inputs=len(plan.records))
    if writer.is_committed(plan.shard, key):
        res.skipped = True
        info = writer.shard_info(plan.shard)
        res.accepted, res.rejected = info.n_samples, info.n_rejected
        return asdict(res)
    out = Path(out)
    a = _load_npz(_analysis_path(out, plan))
    prior = _load_prior(out, prior_key)
    arrays, rows, rejected, sheet_rows = finish_arrays(ctx, a, prior)
    if not rows:  # every input rejected: empty arrays of the schema's shapes
        arrays = {k: np.zeros((0, *f.shape), f.dtype) for k, f in writer.schema.fields.items()}
    writer.write_shard(plan.shard, arrays, rows, key=key, rejected=rejected)
    if cfg.output.sheets and sheet_rows:
        from facecorpus.sheets import contact_sheet

        contact_sheet(sheet_rows, out / "sheets" / f"shard-{plan.shard:05d}.png", cell=128,
                      labels=["input", "fitted overlay", "uv_visible", "uv_pseudo_gt",
                              "re-render"])
    res.accepted, res.rejected = len(rows), len(rejected)
    for r in rejected:
        res.reasons[r["reason"]] = res.reasons.get(r["reason"], 0) + 1
    res.seconds = time.perf_counter() - t0
    return asdict(res)


def _load_prior(out: Path, prior_key: str):
    from facecorpus.tasks.prior import TexturePrior

    z = _load_npz(out / WORK / f"prior-{prior_key}.npz")
    return TexturePrior(z["mean"], z.get("basis"), z.get("std"), str(z["source"]))


def finish_arrays(ctx: Context, a: dict, prior):
    """Per-image prior, (stage 2), occlusion rejection, blend, metrics, rows, sheet rows."""
    from facecorpus.tasks.blend import blend_batch
    from facecorpus.tasks.unwrap import reject_occlusions

    cfg, _model = ctx.cfg, ctx.model
    rejected = json.loads(str(a["rejected"]))
    n = len(a["sample_uri"])
    T = cfg.unwrap.uv_size
    fit = _fit_from_arrays(a, cfg) if n else None
    uv_vis, uv_mask = a["uv_visible"].astype(np.float32), a["uv_visible_mask"]
    uv_map, uv_w = a["uv_sampling_map"].astype(np.float32), a["uv_view_weight"].astype(
        np.float32)
    sh = np.zeros((n, 27), np.float32)
    if n:
        per_image = prior.fit_to_visible(uv_vis, uv_mask)
        if cfg.fit.photometric_iters > 0:
            fit, uv_vis, uv_mask, uv_map, uv_w, per_image = _stage2(ctx, a, fit, per_image,
                                                                     prior)
            sh = fit.sh.astype(np.float32)
        if cfg.unwrap.occlusion_threshold is not None:
            uv_mask = reject_occlusions(uv_vis, uv_mask, per_image,
                                        cfg.unwrap.occlusion_threshold)
            uv_vis = np.where(uv_mask[..., None], uv_vis, 0).astype(np.float32)
            per_image = prior.fit_to_visible(uv_vis, uv_mask)
        bl = blend_batch(uv_vis, uv_mask, per_image, ctx.mirror_map, mixed=cfg.blend.mixed,
                         layout_mask=ctx.layout)
    else:
        bl = None
    rows, sheet_rows = [], []
    rr_images = []
    for i in range(n):
        m = rerender_metrics(ctx, fit, i, a["image"][i], a["mask"][i], bl.uv_pseudo_gt[i])
        rr_images.append(m.pop("_rerender"))
        uri = str(a["sample_uri"][i])
        sid = str(a["sha256"][i])[:16]
        row = {"sample_id": sid, "source_uri": uri, "subject_id": str(a["subject_id"][i]) or sid,
               "group": "", "yaw": float(fit.yaw[i]), "pitch": float(fit.pitch[i]),
               "roll": float(fit.roll[i]), "split": _split(sid, cfg.output.val_fraction),
               "sha256": str(a["sha256"][i]), "landmark_source": str(a["landmark_source"][i]),
               "landmark_rmse": float(fit.landmark_rmse[i]),
               "landmark_nme": float(fit.landmark_nme[i]),
               "photometric_error": float(fit.photometric_error[i]),
               "iterations": int(fit.iterations[i]), "converged": bool(fit.converged[i]),
               "camera": fit.camera, "scale": float(fit.scale[i]),
               "focal": float(fit.focal[i]),
               "visible_fraction": float(uv_mask[i][ctx.layout].mean()),
               "orig_height": int(a["orig_size"][i][0]), "orig_width": int(a["orig_size"][i][1])}
        t = np.zeros(3)
        t[:fit.translation.shape[1]] = fit.translation[i]
        row.update(tx=float(t[0]), ty=float(t[1]), tz=float(t[2]))
        for r_ in range(2):
            for c_ in range(3):
                row[f"crop_a{r_}{c_}"] = float(a["affine"][i][r_, c_])
        row.update(m)
        rows.append(row)
    u8 = _to_u8
    arrays = {
        "image": a["image"].astype(np.uint8),
        "mask": a["mask"][..., None].astype(np.uint8),
        "seg_mask": a["seg_mask"][..., None].astype(np.uint8),
        "landmarks": a["landmarks"].astype(np.float32),
        "uv_visible": u8(uv_vis) if n else np.zeros((0, T, T, 3), np.uint8),
        "uv_visible_mask": uv_mask[..., None].astype(np.uint8),
        "uv_sampling_map": uv_map.astype(np.float16),
        "uv_view_weight": u8(uv_w[..., None]) if n else np.zeros((0, T, T, 1), np.uint8),
        "uv_pseudo_gt": u8(bl.uv_pseudo_gt) if n else np.zeros((0, T, T, 3), np.uint8),
        "uv_source": (bl.uv_source[..., None] if n else np.zeros((0, T, T, 1))).astype(np.uint8),
        "id_coeffs": _pad_cols(a.get("fit_alpha"), n),
        "exp_coeffs": _pad_cols(a.get("fit_beta"), n),
        "sh": sh,
    }
    if fit is not None:
        arrays["id_coeffs"] = _pad_cols(fit.alpha, n)
        arrays["exp_coeffs"] = _pad_cols(fit.beta, n)
    for i in range(n):
        sheet_rows.append([a["image"][i], overlay(ctx, fit, i, a["image"][i], a["landmarks"][i]),
                           uv_vis[i], bl.uv_pseudo_gt[i], rr_images[i]])
    return arrays, rows, rejected, sheet_rows


def _pad_cols(x, n):
    if x is None or x.size == 0:
        return np.zeros((n, 1), np.float32)
    return np.asarray(x, np.float32).reshape(n, -1)


def _to_u8(x):
    return (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def _split(sample_id: str, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def _stage2(ctx, a, fit, per_image, prior):
    """Photometric refinement with the per-image prior as albedo, then unwrap again."""
    from facecorpus.tasks.fit import PhotometricOptions, refine_photometric
    from facecorpus.tasks.unwrap import unwrap_one

    cfg, model = ctx.cfg, ctx.model
    fit = refine_photometric(model, fit, a["image"], a["mask"], per_image, a["landmarks"],
                             PhotometricOptions(iters=cfg.fit.photometric_iters,
                                                lr=cfg.fit.photometric_lr))
    outs = [unwrap_one(a["image"][i], fit.vertices(model, i), fit.camera_for(i), model,
                       cfg.unwrap.uv_size, a["mask"][i], min_cos=cfg.unwrap.min_cos)
            for i in range(len(fit))]
    vis = np.concatenate([o.uv_visible for o in outs])
    msk = np.concatenate([o.uv_visible_mask for o in outs])
    return (fit, vis, msk, np.concatenate([o.uv_sampling_map for o in outs]),
            np.concatenate([o.uv_view_weight for o in outs]), prior.fit_to_visible(vis, msk))


def rerender_metrics(ctx, fit, i, image, mask, uv_pseudo_gt) -> dict:
    """Re-render ``uv_pseudo_gt`` with the fitted parameters (unlit: the map carries the
    photo's shading) and compare with the photo over the face mask: L1 (0-1), PSNR, SSIM."""
    from facecorpus.renderers.render import render
    from skimage.metrics import structural_similarity

    model = ctx.model
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


def overlay(ctx, fit, i, image, landmarks) -> np.ndarray:
    """The photo with the fitted mesh (shaded, half transparent) and landmarks drawn."""
    from facecorpus.renderers.render import render

    r = render(fit.vertices(ctx.model, i), ctx.model.triangles, fit.camera_for(i),
               outputs=("image",))
    photo = image.astype(np.float32) / 255.0
    m = r.mask[0][..., None]
    img = np.where(m, 0.5 * photo + 0.5 * r.image[0], photo)
    from facecorpus.tasks.fit import project_landmarks

    lm_fit = project_landmarks(ctx.model, fit.select([i]))[0]
    for pts, colour in ((landmarks, (0.0, 1.0, 0.0)), (lm_fit, (1.0, 0.2, 0.2))):
        for x, y in pts:
            c, r_ = int(x), int(y)
            if 0 <= r_ < img.shape[0] and 0 <= c < img.shape[1]:
                img[max(r_ - 1, 0):r_ + 2, max(c - 1, 0):c + 2] = colour
    return img


# --------------------------------------------------------------------------- uv regions
def export_uv_regions(ctx: Context, root: Path) -> Path:
    """The model's UV layout, mirror map and centre/side region masks (texels seen by a
    frontal view and by views turned 60 degrees either way, mean face, cos > 0.3)."""
    from facecorpus.renderers.cameras import framing_camera
    from facecorpus.sheets import contact_sheet
    from facecorpus.tasks.unwrap import unwrap_one

    model, T = ctx.model, ctx.cfg.unwrap.uv_size
    v = model.vertices
    seen = {}
    # positive yaw turns the nose to image right: the head turns to the subject's left and
    # the camera sees the subject's *right* cheek (renderers.cameras conventions)
    for name, yaw in (("centre", 0.0), ("right", 60.0), ("left", -60.0)):
        cam = framing_camera(v, 256, 256, yaw=yaw)
        img = np.zeros((256, 256, 3), np.float32)
        u = unwrap_one(img, v, cam, model, T, None, min_cos=0.3)
        seen[name] = u.uv_visible_mask[0]
    regions = {"layout": ctx.layout, "centre": seen["centre"],
               "side_left": seen["left"] & ~seen["centre"],
               "side_right": seen["right"] & ~seen["centre"]}
    path = root / "uv_regions.npz"
    tmp = root / f".uv_regions.npz.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, mirror_map=ctx.mirror_map, **{k: v.astype(np.uint8) for k, v in
                                                   regions.items()})
    os.replace(tmp, path)
    contact_sheet([[r.astype(np.float32) for r in regions.values()]], root / "uv_regions.png",
                  cell=T, labels=list(regions))
    return path


# --------------------------------------------------------------------------- orchestration
def _analyse_worker(cfg_json: str, plan: dict, out: str) -> dict:
    cfg = PseudoGTConfig.model_validate_json(cfg_json)
    return analyse_shard(cfg, ShardPlan(**plan), out)


def _finish_worker(cfg_json: str, writer, plan: dict, out: str, prior_key: str) -> dict:
    cfg = PseudoGTConfig.model_validate_json(cfg_json)
    return finish_shard(cfg, writer, ShardPlan(**plan), out, prior_key)


class _Progress:
    """Log lines with counts and ETA (one per finished shard), and a tqdm bar on a TTY."""

    def __init__(self, phase: str, total: int):
        self.phase, self.total, self.done, self.t0 = phase, total, 0, time.perf_counter()
        self.bar = None
        try:
            import sys

            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=phase, unit="shard")
        except ImportError:  # tqdm is a dependency; the log lines remain
            self.bar = None

    def update(self, r: dict) -> None:
        self.done += 1
        dt = time.perf_counter() - self.t0
        eta = (self.total - self.done) * dt / max(self.done, 1)
        if self.bar is not None:
            self.bar.update(1)
        log.info("%s: shard %d done (%d/%d; accepted %s, rejected %s)%s; ETA %.0f s",
                 self.phase, r["shard"], self.done, self.total, r.get("accepted"),
                 r.get("rejected"), " [reused]" if r.get("reused") or r.get("skipped") else "",
                 eta)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_local(cfg: PseudoGTConfig, input_spec: str, out: str | os.PathLike, *,
              max_shards: int | None = None) -> dict:
    """The whole flow in this process, without Prefect (tests, benchmarks, debugging)."""
    def submit(fn, *args):
        return fn(*args)

    return _run(cfg, input_spec, Path(out), max_shards, submit, lambda fs: fs)


def _run(cfg, input_spec, out: Path, max_shards, submit, gather) -> dict:
    ctx = build_context(cfg)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_shards(ctx, input_spec)
    cfg_json = cfg.model_dump_json()
    log.info("pseudo-gt: %d inputs in %d shards", sum(len(p.records) for p in plans),
             len(plans))
    prog = _Progress("analyse", len(plans))
    results_a = []
    for r in gather([submit(_analyse_worker, cfg_json, asdict(p), str(out)) for p in plans]):
        prog.update(r)
        results_a.append(r)
    prog.close()
    prior, prior_key = build_prior_from_analyses(ctx, out, plans)
    log.info("texture prior: %s (%s)", prior.source, prior_key)
    writer = open_writer(ctx, out)
    export_uv_regions(ctx, Path(writer.url) if "://" not in writer.url else out / DATASET)
    todo = [p for p in plans if not writer.is_committed(p.shard, finish_key(p, prior_key))]
    done = len(plans) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    prog = _Progress("finish", len(todo))
    results = []
    for r in gather([submit(_finish_worker, cfg_json, writer, asdict(p), str(out), prior_key)
                     for p in todo]):
        prog.update(r)
        results.append(r)
    prog.close()
    return summarize(ctx, out, plans, results, skipped=done)


def pseudo_gt_flow_fn(cfg_json: str, input_spec: str, out: str,
                      max_shards: int | None = None) -> dict:
    """Body of the Prefect flow: shard tasks on the flow's task runner."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    cfg = PseudoGTConfig.model_validate_json(cfg_json)
    tasks = {
        _analyse_worker: task(_analyse_worker, name="analyse-shard", cache_policy=NO_CACHE,
                              retries=cfg.retries, retry_delay_seconds=1),
        _finish_worker: task(_finish_worker, name="finish-shard", cache_policy=NO_CACHE,
                             retries=cfg.retries, retry_delay_seconds=1),
    }

    def submit(fn, *args):
        return tasks[fn].submit(*args)

    def gather(futures):
        for f in as_completed(futures):
            yield f.result()

    return _run(cfg, input_spec, Path(out), max_shards, submit, gather)


def make_task_runner(cfg: PseudoGTConfig):
    return runtime.make_task_runner(cfg.task_runner, cfg.workers, cfg.dask_address)


def prefect_api(cfg: PseudoGTConfig):
    """One Prefect API for every process of the run (see :mod:`facecorpus.flows.runtime`)."""
    return runtime.prefect_api_for_workers(cfg.task_runner == "dask" and not cfg.dask_address)


def make_flow(cfg: PseudoGTConfig | None = None):
    """The Prefect flow object (the configured task runner, or the default Dask one)."""
    from prefect import flow

    return flow(pseudo_gt_flow_fn, name="pseudo-gt",
                task_runner=make_task_runner(cfg or PseudoGTConfig()),
                validate_parameters=False, log_prints=False)


def run_pseudo_gt(cfg: PseudoGTConfig, input_spec: str, out: str | os.PathLike, *,
                  max_shards: int | None = None) -> dict:
    """Run the flow through Prefect on the configured task runner."""
    with prefect_api(cfg):
        return make_flow(cfg)(cfg.model_dump_json(), str(input_spec), str(out), max_shards)


def make_deployment(cfg: PseudoGTConfig, input_spec: str, out: str | os.PathLike, cron: str,
                    name: str = "pseudo-gt"):
    """A Prefect deployment of this flow on a cron schedule (e.g. ``"0 3 * * *"``): each
    scheduled run resumes the same OUT, so only new or changed inputs are processed."""
    from prefect.deployments.runner import EntrypointType

    dep = make_flow(cfg).to_deployment(
        name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"cfg_json": cfg.model_dump_json(), "input_spec": str(input_spec),
                    "out": str(out), "max_shards": None})
    # runs load the flow by import path: this module's lazily built `pseudo_gt_flow`
    dep.entrypoint = f"{__name__}:pseudo_gt_flow"
    return dep


def __getattr__(name: str):
    # `pseudo_gt_flow` is built on first access so importing this module stays Prefect-free
    if name == "pseudo_gt_flow":
        return make_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_pseudo_gt(cfg: PseudoGTConfig, input_spec: str, out: str | os.PathLike, cron: str
                    ) -> None:
    """Serve the deployment (blocks; needs a Prefect server: ``PREFECT_API_URL``)."""
    from prefect import serve

    serve(make_deployment(cfg, input_spec, out, cron))


# --------------------------------------------------------------------------- summary
def summarize(ctx: Context, out: Path, plans: list[ShardPlan], results: list[dict], *,
              skipped: int) -> dict:
    """``summary.json`` from what is committed: counts (inputs = accepted + rejected),
    rejection reasons, metric histograms and medians."""
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(str(out / DATASET))
    man, rej = ds.manifest, ds.rejected
    committed = {int(s) for s in set(man.column("shard").to_pylist())} if man.num_rows else set()
    committed |= {int(s) for s in set(rej.column("shard").to_pylist())} if rej.num_rows else set()
    inputs = sum(len(p.records) for p in plans if p.shard in committed)
    reasons: dict[str, int] = {}
    stages: dict[str, int] = {}
    for r, s in zip(rej.column("reason").to_pylist() if rej.num_rows else [],
                    rej.column("stage").to_pylist() if rej.num_rows else [], strict=True):
        reasons[r] = reasons.get(r, 0) + 1
        stages[s] = stages.get(s, 0) + 1
    hist, medians = {}, {}
    for m in METRICS + ("yaw",):
        if man.num_rows and m in man.column_names:
            x = np.asarray(man.column(m).to_numpy(zero_copy_only=False), np.float64)
            x = x[np.isfinite(x)]
            if x.size:
                counts, edges = np.histogram(x, bins=10)
                hist[m] = {"edges": [round(float(e), 5) for e in edges],
                           "counts": counts.tolist()}
                medians[m] = round(float(np.median(x)), 5)
    summary = {
        "out": str(out), "shards": len(plans), "shards_committed": len(committed),
        "shards_run": len(results), "shards_skipped": skipped,
        "inputs": inputs, "accepted": man.num_rows, "rejected": rej.num_rows,
        "counts_add_up": inputs == man.num_rows + rej.num_rows,
        "rejected_by_stage": stages,
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "landmark_sources": _value_counts(man, "landmark_source"),
        "medians": medians, "histograms": hist,
        "sheets": sorted(str(p) for p in (out / "sheets").glob("shard-*.png")),
        "seconds_in_shards": round(sum(r.get("seconds", 0.0) for r in results), 2),
    }
    runtime.write_json_atomic(out / "summary.json", summary)
    return summary


def _value_counts(table, col: str) -> dict:
    if not table.num_rows or col not in table.column_names:
        return {}
    out: dict[str, int] = {}
    for v in table.column(col).to_pylist():
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def format_summary(s: dict) -> str:
    lines = [f"pseudo-gt -> {s['out']}",
             (f"  shards: {s['shards_committed']}/{s['shards']} committed ({s['shards_run']} run "
             f"now, {s['shards_skipped']} already done)"),
             (f"  inputs {s['inputs']} = accepted {s['accepted']} + rejected {s['rejected']}"
             f"  ({'ok' if s['counts_add_up'] else 'MISMATCH'})"),
             f"  landmarks: {s['landmark_sources']}"]
    for reason, n in list(s["rejected_by_reason"].items())[:10]:
        lines.append(f"    {n:5d}  {reason}")
    if s["medians"]:
        lines.append("  medians: " + ", ".join(f"{k} {v:g}" for k, v in s["medians"].items()))
    if s["sheets"]:
        lines.append(f"  sheets: {s['sheets'][0]}" + (f" (+{len(s['sheets']) - 1})"
                                                     if len(s["sheets"]) > 1 else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- demo
def demo_step(ctx) -> None:
    """`facecorpus demo`: this flow (Prefect, thread runner) with the demo's model on
    scikit-image's astronaut, or on every photo of ``--input``."""
    out = ctx.out / "pseudo_gt"
    if ctx.input is not None:
        inputs = str(ctx.input)
    else:
        from PIL import Image
        from skimage.data import astronaut

        folder = ctx.out / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / "astronaut.png"
        if not p.is_file():
            Image.fromarray(astronaut()).save(p)
        inputs = str(folder)
    # the demo's model step falls back to the procedural fixture when ICT is unreachable
    model = "ict" if ctx.model is not None and ctx.model.name.startswith("ict") else "procedural"
    cfg = load_config(None, {"model": model, "task_runner": "threads"})
    ctx.say(f"pseudo-GT flow on {inputs} with the {model} model ...")
    s = run_pseudo_gt(cfg, inputs, out)
    ctx.artifacts["pseudo_gt_dataset"] = str(out / DATASET)
    ctx.artifacts["pseudo_gt_summary"] = str(out / "summary.json")
    if s["sheets"]:
        ctx.artifacts["pseudo_gt_sheet"] = s["sheets"][0]
    ctx.facts["pseudo_gt"] = {k: s[k] for k in ("inputs", "accepted", "rejected",
                                                "counts_add_up", "landmark_sources",
                                                "medians", "rejected_by_reason")}
    for line in format_summary(s).splitlines():
        ctx.say(line)
