"""The synthesis flow: DR shape augmentation -> multi-pose rendering -> sharded datasets.

Work unit: a **shard** = the fixed face-index range ``[s * F, (s + 1) * F)`` (F =
``output.faces_per_shard``); all poses of a face are in its shard. A shard is computed by
:func:`synthesize_shard` (pure arrays in the middle, one whole-shard write per dataset at the
end) and committed atomically by the dataset writer, so

- **resumable**: a rerun skips shards committed with the same content key; a shard killed
  half-way has no manifest part and is recomputed;
- **deterministic**: every random draw of face i comes from (seed, stream, i) only
  (:func:`facecorpus.tasks.augment.face_rng`), so the same config and seed give
  byte-identical shards whatever the number of workers or the order shards run in.

Outputs under ``OUT``:

- ``views/``: one sample per face x pose: ``image``, ``pncc``, ``mask`` (+ ``depth``), 128 x 128.
- ``faces/``: one sample per face: ``uv_texture``, ``uv_position`` (UV maps), ``vertices``.
  Rejected draws (with reasons) are committed with the faces shard.
- ``summary.json`` and ``summary_sheet.png`` (one face across all poses: image | PNCC | mask).

Prefect orchestrates the shards (``task_runner``: threads, or a local Dask cluster of
processes); :func:`run_shards` runs the same shard function without Prefect.
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
from facecorpus.core.errors import ConfigError, InputError
from facecorpus.configs.synthesis import SynthesisConfig
from facecorpus.flows import runtime

log = logging.getLogger("facecorpus.synthesis")

VIEWS = "views"
FACES = "faces"


# --------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike, overrides: dict | None = None) -> SynthesisConfig:
    """Read a YAML config, apply dotted ``overrides`` ({"augment.n_faces": 10}), validate
    (one ConfigError listing every problem with its key path)."""
    from facecorpus.configs.base import read_yaml, validate

    data = read_yaml(path)
    kind = data.get("kind", "synthesis")
    if kind != "synthesis":
        raise ConfigError(f"{path}: kind: '{kind}' but a 'synthesis' config was expected")
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for k in parts[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{k}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return validate(SynthesisConfig, data, str(path))


def content_config(cfg: SynthesisConfig) -> dict:
    """The part of the config that determines the output bytes (not how it is scheduled)."""
    return cfg.model_dump(mode="json", exclude={"workers", "task_runner"})


# --------------------------------------------------------------------------- context
def load_model(spec: str):
    """``procedural`` | ``ict`` | ``ict:<region>`` | a model file (``meshops.catalog``)."""
    from facecorpus.meshops.catalog import load_model as catalog_load

    return catalog_load(spec)


@dataclass(eq=False)
class Context:
    """Everything a shard needs that is the same for all shards (built once per process)."""

    cfg: SynthesisConfig
    config_hash: str
    model: object
    ncc: np.ndarray  # (V, 3)
    corner_uv: np.ndarray  # (F, 3, 2)
    prepared: object  # tasks.augment.PreparedSources
    groups: np.ndarray  # (n_faces,) group of every new face
    yaws: np.ndarray  # (P,)
    backgrounds: object  # tasks.backgrounds.BackgroundSource

    @property
    def n_poses(self) -> int:
        return int(self.yaws.shape[0])


_CONTEXTS: dict[str, Context] = {}
_CONTEXT_LOCK = threading.Lock()


def build_context(cfg: SynthesisConfig, sources_dir: str | os.PathLike | None = None
                  ) -> Context:
    """Model, sources (DR-encoded), group assignment: cached per process by config content.

    With ``sources_dir``, the prepared sources are memory-mapped from there, or computed
    and written there when absent (the driver does this once before any shard runs, so
    worker processes share one copy and never re-encode).
    """
    key = hashlib.sha256(json.dumps(content_config(cfg), sort_keys=True).encode()).hexdigest()
    ckey = f"{key}:{sources_dir}"
    with _CONTEXT_LOCK:
        ctx = _CONTEXTS.get(ckey)
        if ctx is not None:
            return ctx
        ctx = _build_context(cfg, key, sources_dir)
        _CONTEXTS[ckey] = ctx
        return ctx


def sources_dir_for(cfg: SynthesisConfig, out: str | os.PathLike) -> Path:
    """Where a run keeps its prepared sources: ``OUT/.sources/<hash of what shapes them>``."""
    shaping = {k: content_config(cfg)[k] for k in ("model", "seed", "subjects")}
    h = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    return Path(out) / ".sources" / h


def _build_context(cfg: SynthesisConfig, key: str, sources_dir) -> Context:
    from facecorpus.meshops.geometry import ncc
    from facecorpus.tasks import augment
    from facecorpus.tasks.backgrounds import BackgroundSource

    model = load_model(cfg.model)
    if sources_dir is not None and (Path(sources_dir) / "done.json").is_file():
        prepared = augment.load_prepared(sources_dir, model.triangles)
    else:
        prepared = augment.prepare_sources(_make_subjects(cfg, model), model.triangles)
        if sources_dir is not None:
            augment.save_prepared(prepared, sources_dir)
    subjects = prepared.subjects
    ratios = augment.group_ratios_for(subjects, cfg.augment.group_ratios)
    groups = augment.assign_groups(cfg.augment.n_faces, ratios, cfg.seed)
    h = hashlib.sha256((key + model.content_hash()).encode()).hexdigest()[:32]
    return Context(cfg=cfg, config_hash=h, model=model, ncc=ncc(model.vertices),
                   corner_uv=np.ascontiguousarray(model.uv[model.uv_triangles], np.float32),
                   prepared=prepared, groups=groups,
                   yaws=np.asarray(cfg.poses.yaws(), np.float32),
                   backgrounds=BackgroundSource(cfg.background.kind, cfg.background.folder))


def _make_subjects(cfg: SynthesisConfig, model):
    from facecorpus.tasks import augment
    from facecorpus.tasks.render_views import albedo_uv_map

    sc = cfg.subjects
    tsize = sc.texture_size
    albedo_uv = albedo_uv_map(model, tsize) if model.has_albedo else None
    if sc.source == "random":
        return augment.random_subjects(model, sc.n_random, coeff_std=sc.coeff_std,
                                       n_groups=sc.n_groups, seed=cfg.seed,
                                       texture_size=tsize, albedo_uv=albedo_uv)
    if sc.source == "meshes":
        return augment.subjects_from_meshes(model, sc.meshes, groups_csv=sc.groups_csv,
                                            texture_size=tsize, seed=cfg.seed,
                                            albedo_uv=albedo_uv)
    return augment.subjects_from_dataset(model, sc.dataset, group_column=sc.group_column,
                                         embedding_column=sc.embedding_column,
                                         texture_size=tsize)


# --------------------------------------------------------------------------- datasets
def schemas(ctx: Context):
    """(views schema, faces schema) of a run."""
    from facecorpus.datasets.store import DatasetSchema, FieldSpec

    cfg = ctx.cfg
    S, U, P, F = (cfg.output.image_size, cfg.output.uv_size, ctx.n_poses,
                  cfg.output.faces_per_shard)
    vf = {"image": FieldSpec((S, S, 3), "uint8", "srgb", "textured, lit face over a background"),
          "pncc": FieldSpec((S, S, 3), "uint8", "ncc*255", "mean-shape NCC per pixel, 0 outside"),
          "mask": FieldSpec((S, S, 1), "uint8", "0/1", "1 where the face covers the pixel")}
    if cfg.output.depth:
        vf["depth"] = FieldSpec((S, S, 1), "float16", "mm relative to cam_distance",
                                "depth_mm = depth + cam_distance on the mask, 0 outside")
    ff = {"vertices": FieldSpec((ctx.model.n_vertices, 3), "float32", "mm",
                                "the new face in model space")}
    if cfg.output.uv_maps:
        ff["uv_texture"] = FieldSpec((U, U, 3), "uint8", "srgb", "UV texture of the face")
        ff["uv_position"] = FieldSpec((U, U, 3), "float32", "mm",
                                      "model-space surface point per texel, 0 outside the layout")
    attrs = {"model": ctx.model.name, "model_hash": ctx.model.content_hash(),
             "yaws": [float(y) for y in ctx.yaws], "config": content_config(cfg)}
    comp = {"compression": cfg.output.compression,
            "compression_level": cfg.output.compression_level}
    views = DatasetSchema(vf, samples_per_shard=F * P, samples_per_chunk=P, producer="synthesis",
                          config_hash=ctx.config_hash, attrs=attrs, **comp)
    faces = DatasetSchema(ff, samples_per_shard=F, samples_per_chunk=1,
                          producer="synthesis-faces", config_hash=ctx.config_hash, attrs=attrs,
                          **comp)
    return views, faces


def open_writers(ctx: Context, out: str | os.PathLike):
    """Create (or reopen, checking the schema) both datasets; picklable writers."""
    from facecorpus.datasets.store import DatasetWriter

    vs, fs = schemas(ctx)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return DatasetWriter(str(out / VIEWS), vs), DatasetWriter(str(out / FACES), fs)


def shard_key(ctx: Context, shard_id: int) -> str:
    return f"{ctx.config_hash}:{shard_id}"


# --------------------------------------------------------------------------- the shard
@dataclass
class ShardResult:
    shard: int
    skipped: bool = False
    faces: int = 0
    pairs: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time (all threads) spent on this shard
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)


def _split(seed: int, index: int, val_fraction: float) -> str:
    from facecorpus.tasks.augment import STREAM_SPLIT, face_rng

    return "val" if face_rng(seed, STREAM_SPLIT, index).random() < val_fraction else "train"


def synthesize_shard(cfg: SynthesisConfig, writers, shard_id: int,
                     sources_dir: str | None = None) -> ShardResult:
    """Augment, render and commit one shard (faces dataset first, views last).

    A failure of one face (sampling exhausted, or an exception while rendering it) is a
    rejected row with its reason; the shard still commits.
    """
    from facecorpus.tasks import augment
    from facecorpus.tasks.render_views import (
        CAMERA_COLUMNS,
        render_views,
        resize_texture,
        sample_view_params,
        uv_position_map,
    )

    t0, c0 = time.perf_counter(), time.process_time()
    ctx = build_context(cfg, sources_dir)
    vw, fw = writers
    key = shard_key(ctx, shard_id)
    res = ShardResult(shard_id)
    if vw.is_committed(shard_id, key) and fw.is_committed(shard_id, key):
        res.skipped = True
        return res
    a, po, lc, oc = cfg.augment, cfg.poses, cfg.lighting, cfg.output
    lo = shard_id * oc.faces_per_shard
    hi = min(a.n_faces, lo + oc.faces_per_shard)
    model = ctx.model
    subj = ctx.prepared.subjects
    P, S = ctx.n_poses, oc.image_size
    views = {k: [] for k in ("image", "pncc", "mask", "depth")}
    faces = {k: [] for k in ("vertices", "uv_texture", "uv_position")}
    vrows, frows, rejected = [], [], []
    for i in range(lo, hi):
        group = str(ctx.groups[i])
        uri = f"synthesis:{ctx.config_hash[:12]}/face/{i}"
        sres = augment.sample_face(i, group, ctx.prepared, seed=cfg.seed, m=a.m,
                                   r_range=(a.r_min, a.r_max), theta_max=a.theta_max,
                                   max_flip_ratio=a.max_flip_ratio,
                                   self_intersection=a.self_intersection,
                                   max_attempts=a.max_attempts)
        for r in sres.rejections:
            rejected.append({"source_uri": f"{uri}/attempt/{r.attempt}", "stage": "augment",
                             "reason": r.reason, "face_index": i, "group": group,
                             "parents": ",".join(str(subj.subject_ids[p]) for p in r.parents)})
        face = sres.face
        if face is None:
            rejected.append({"source_uri": uri, "stage": "augment",
                             "reason": f"all {a.max_attempts} draws rejected", "face_index": i,
                             "group": group, "parents": ""})
            continue
        try:
            rng = augment.face_rng(cfg.seed, augment.STREAM_RENDER, i)
            params = sample_view_params(rng, ctx.yaws, pitch_jitter=po.pitch_jitter,
                                        roll_jitter=po.roll_jitter,
                                        ambient=(lc.ambient_min, lc.ambient_max),
                                        directional_std=lc.directional_std,
                                        tint_std=lc.tint_std)
            bgs = ctx.backgrounds.sample_many(rng, P, S)
            tex = subj.textures[face.texture_subject]
            v = render_views(face.vertices, model.triangles, ctx.corner_uv, tex, ctx.ncc, params,
                             bgs, size=S, camera=po.camera, distance=po.distance_mm,
                             margin=po.margin)
            if oc.uv_maps:
                uv_tex = resize_texture(tex, oc.uv_size)
                uv_pos = uv_position_map(face.vertices, model.triangles, model.uv,
                                         model.uv_triangles, oc.uv_size)
        except (InputError, ValueError, FloatingPointError) as e:
            rejected.append({"source_uri": uri, "stage": "render", "reason": str(e),
                             "face_index": i, "group": group, "parents": ""})
            continue
        fid = f"f{i:08d}"
        views["image"].append(v.image)
        views["pncc"].append(v.pncc)
        views["mask"].append(v.mask)
        if oc.depth:
            rel = np.where(v.mask > 0, v.depth - v.camera[:, 3][:, None, None, None], 0.0)
            views["depth"].append(rel.astype(np.float16))
        faces["vertices"].append(face.vertices[None])
        if oc.uv_maps:
            faces["uv_texture"].append(uv_tex[None])
            faces["uv_position"].append(uv_pos[None])
        tsub = subj.subject_ids[face.texture_subject]
        split = _split(cfg.seed, i, oc.val_fraction)
        parents = ",".join(str(subj.subject_ids[p]) for p in face.parents)
        weights = ",".join(f"{w:.6f}" for w in face.weights)
        frows.append({"sample_id": fid, "source_uri": uri, "subject_id": fid, "group": group,
                      "split": split, "face_index": i, "parents": parents, "weights": weights,
                      "texture_subject": tsub, "attempt": face.attempt})
        for k in range(P):
            row = {"sample_id": f"{fid}_p{k:02d}", "source_uri": uri, "subject_id": fid,
                   "group": group, "yaw": float(params.yaw[k]), "pitch": float(params.pitch[k]),
                   "roll": float(params.roll[k]), "split": split, "face_index": i,
                   "pose_index": k, "texture_subject": tsub, "camera": po.camera}
            for c, name in enumerate(CAMERA_COLUMNS):
                row[name] = float(v.camera[k, c])
            vrows.append(row)
    n = len(frows)
    vs, fs = vw.schema, fw.schema
    def cat(parts, spec):
        return (np.concatenate(parts) if parts
                else np.zeros((0, *spec.shape), spec.dtype))
    varr = {k: cat(views[k], vs.fields[k]) for k in vs.fields}
    farr = {k: cat(faces[k], fs.fields[k]) for k in fs.fields}
    fi = fw.write_shard(shard_id, farr, frows, key=key, rejected=rejected)
    vi = vw.write_shard(shard_id, varr, vrows, key=key)
    res.faces, res.pairs, res.rejected = n, n * P, len(rejected)
    for r in rejected:
        res.reasons[r["reason"]] = res.reasons.get(r["reason"], 0) + 1
    res.checksums = {FACES: fi.checksums, VIEWS: vi.checksums}
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = time.process_time() - c0
    return res


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _shard_worker(cfg_json: str, writers, shard_id: int, threads: int,
                  sources_dir: str | None = None) -> dict:
    """Process-friendly entry point (plain JSON config in, plain dict out)."""
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    cfg = SynthesisConfig.model_validate_json(cfg_json)
    return asdict(synthesize_shard(cfg, writers, shard_id, sources_dir))


# --------------------------------------------------------------------------- orchestration
def pending_shards(ctx: Context, writers) -> tuple[list[int], list[int]]:
    """(to do, already committed with this content) shard ids."""
    vw, fw = writers
    done_v, done_f = vw.committed_shards(), fw.committed_shards()
    todo, done = [], []
    for s in range(ctx.cfg.n_shards()):
        k = shard_key(ctx, s)
        (done if done_v.get(s) == k and done_f.get(s) == k else todo).append(s)
    return todo, done


class _Progress:
    def __init__(self, total_shards: int, done: int, pairs_per_shard: int):
        self.total, self.done, self.t0, self.pairs = total_shards, done, time.perf_counter(), 0
        self.pairs_per_shard = pairs_per_shard

    def update(self, r: dict) -> None:
        self.done += 1
        self.pairs += r["pairs"]
        dt = max(time.perf_counter() - self.t0, 1e-9)
        left = self.total - self.done
        eta = left * self.pairs_per_shard / max(self.pairs / dt, 1e-9)
        log.info("shard %d committed (%d/%d): %d pairs, %d rejected; %.1f pairs/s; ETA %.0f s",
                 r["shard"], self.done, self.total, r["pairs"], r["rejected"], self.pairs / dt,
                 eta)


def run_shards(cfg: SynthesisConfig, out: str | os.PathLike, *,
               max_shards: int | None = None) -> dict:
    """Run pending shards in this process, in order, without Prefect (tests, benchmarks)."""
    sd = str(sources_dir_for(cfg, out))
    ctx = build_context(cfg, sd)
    writers = open_writers(ctx, out)
    todo, done = pending_shards(ctx, writers)
    if max_shards is not None:
        todo = todo[:max_shards]
    results = [asdict(synthesize_shard(cfg, writers, s, sd)) for s in todo]
    return finish(cfg, out, results, skipped=len(done))


def synthesis_flow_fn(cfg_json: str, out: str, max_shards: int | None = None) -> dict:
    """Body of the Prefect flow: one task per pending shard on the flow's task runner."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    cfg = SynthesisConfig.model_validate_json(cfg_json)
    sd = str(sources_dir_for(cfg, out))
    ctx = build_context(cfg, sd)  # prepares (and caches) the sources once, here
    writers = open_writers(ctx, out)
    todo, done = pending_shards(ctx, writers)
    if max_shards is not None:
        todo = todo[:max_shards]
    log.info("synthesis: %d shards (%d committed, %d to do), %d faces x %d poses",
             cfg.n_shards(), len(done), len(todo), cfg.augment.n_faces, ctx.n_poses)
    shard_task = task(_shard_worker, name="synthesize-shard", cache_policy=NO_CACHE,
                      retries=0)
    threads = _threads_per_worker(cfg.workers)
    futures = [shard_task.with_options(task_run_name=f"shard-{s}").submit(
        cfg_json, writers, s, threads, sd) for s in todo]
    prog = _Progress(len(todo) + len(done), len(done),
                     cfg.output.faces_per_shard * ctx.n_poses)
    results = []
    for fut in as_completed(futures):
        r = fut.result()
        prog.update(r)
        results.append(r)
    return finish(cfg, out, results, skipped=len(done))


def make_task_runner(cfg: SynthesisConfig):
    return runtime.make_task_runner(cfg.task_runner, cfg.workers)


def run_synthesis(cfg: SynthesisConfig, out: str | os.PathLike, *,
                  max_shards: int | None = None) -> dict:
    """Run the synthesis flow through Prefect on the configured task runner."""
    from prefect import flow

    fl = flow(synthesis_flow_fn, name="synthesis", task_runner=make_task_runner(cfg),
              validate_parameters=False, log_prints=False)
    with runtime.prefect_api_for_workers(cfg.task_runner == "dask"):
        return fl(cfg.model_dump_json(), str(out), max_shards)


# --------------------------------------------------------------------------- demo
def demo_step(ctx) -> None:
    """The `facecorpus demo` synthesis step: ``configs/synthesis_demo.yaml`` on the demo's
    model, with the demo's pseudo-GT dataset as sources when an earlier step made one (else
    random model samples). Runs shards in-process (no Prefect server start for 8 faces)."""
    from facecorpus.configs import default_config_path

    out = Path(ctx.out) / "synthesis"
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.npz"
    if not model_path.is_file():
        ctx.model.save(model_path)
    overrides: dict = {"model": str(model_path)}
    pgt = next((p for k, p in sorted(ctx.artifacts.items())
                if "pseudo_gt" in k and (Path(p) / "schema.json").is_file()), None)
    if pgt:
        overrides.update({"subjects.source": "pseudo_gt", "subjects.dataset": str(pgt),
                          "augment.group_ratios": None})
    cfg = load_config(default_config_path("synthesis_demo.yaml"), overrides)
    s = run_shards(cfg, out)
    ctx.artifacts["synthesis_views"] = str(out / VIEWS)
    ctx.artifacts["synthesis_faces"] = str(out / FACES)
    if s.get("sheet"):
        ctx.artifacts["synthesis_sheet"] = s["sheet"]
    ctx.facts["synthesis"] = {k: s[k] for k in ("faces", "pairs", "poses_per_face",
                                                "rejected_draws", "faces_by_group")}
    ctx.facts["synthesis"]["sources"] = f"pseudo-GT dataset {pgt}" if pgt else "random samples"
    ctx.say(f"synthesis: {s['faces']} faces x {s['poses_per_face']} poses = {s['pairs']} "
            f"image/PNCC pairs from {ctx.facts['synthesis']['sources']}; sheet {s.get('sheet')}")


# --------------------------------------------------------------------------- summary
def finish(cfg: SynthesisConfig, out: str | os.PathLike, results: list[dict], *,
           skipped: int) -> dict:
    """Write ``summary.json`` and ``summary_sheet.png`` from what is committed on disk."""
    from facecorpus.datasets.store import open_dataset
    from facecorpus.sheets import contact_sheet

    out = Path(out)
    views = open_dataset(str(out / VIEWS))
    faces = open_dataset(str(out / FACES))
    rej = faces.rejected
    reasons: dict[str, int] = {}
    stages: dict[str, int] = {}
    if rej.num_rows:
        for r, s in zip(rej.column("reason").to_pylist(), rej.column("stage").to_pylist(),
                        strict=True):
            reasons[r] = reasons.get(r, 0) + 1
            stages[s] = stages.get(s, 0) + 1
    groups: dict[str, int] = {}
    if faces.manifest.num_rows:
        for g in faces.manifest.column("group").to_pylist():
            groups[g] = groups.get(g, 0) + 1
    summary = {
        "out": str(out), "n_shards": cfg.n_shards(),
        "shards_committed": len(views.shards), "shards_run": len(results),
        "shards_skipped": skipped,
        "faces_requested": cfg.augment.n_faces, "faces": faces.manifest.num_rows,
        "pairs": views.manifest.num_rows, "poses_per_face": len(cfg.poses.yaws()),
        "rejected_draws": int(rej.num_rows), "rejected_by_stage": stages,
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "faces_by_group": dict(sorted(groups.items())),
        "seconds_in_shards": round(sum(r["seconds"] for r in results), 3),
        "cpu_seconds_in_shards": round(sum(r.get("cpu_seconds", 0.0) for r in results), 3),
        "pairs_this_run": int(sum(r["pairs"] for r in results)),
    }
    if views.manifest.num_rows:
        P = summary["poses_per_face"]
        first = views.manifest.column("index").to_numpy()[:P]
        img, pn, mk = (views.read(k, first) for k in ("image", "pncc", "mask"))
        sheet = contact_sheet([list(img), list(pn), [m * 255 for m in mk]],
                              out / "summary_sheet.png", cell=96,
                              labels=[f"{y:+.0f}" for y in cfg.poses.yaws()])
        summary["sheet"] = str(sheet)
    runtime.write_json_atomic(out / "summary.json", summary)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"synthesis -> {s['out']}",
             (f"  shards: {s['shards_committed']}/{s['n_shards']} committed "
             f"({s['shards_run']} run now, {s['shards_skipped']} already done)"),
             (f"  faces: {s['faces']}/{s['faces_requested']}  pairs: {s['pairs']} "
             f"({s['poses_per_face']} poses/face)  groups: {s['faces_by_group']}"),
             f"  rejected draws: {s['rejected_draws']} {s['rejected_by_stage']}"]
    for reason, n in list(s["rejected_by_reason"].items())[:8]:
        lines.append(f"    {n:6d}  {reason}")
    if s.get("sheet"):
        lines.append(f"  sheet: {s['sheet']}")
    return "\n".join(lines)
