"""The synthesis stages of one shard: DR augmentation draws, multi-pose rendering, UV maps.

:class:`Stages` is the table of stage functions the composition calls (the public seam).
:func:`synthesize` computes the faces ``[lo, hi)`` of a shard: every face is isolated (an
exception or non-finite output of one face rejects that face with its stage and reason).
Every random draw of face i comes from ``(seed, stream, i)`` only, so shards are
byte-identical whatever worker, order or number of workers computes them.

Shapes: P poses per face, S image size, U UV size, V vertices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from facecorpus.core import hashing
from facecorpus.core.errors import RejectedRow
from facecorpus.tasks import augment, isolation
from facecorpus.tasks import render_views as rv

CODE_VERSION = 1  # bump when the bytes these stages write change without a release


@dataclass(frozen=True)
class Stages:
    sample: Callable = augment.sample_face
    view_params: Callable = rv.sample_view_params
    render: Callable = rv.render_views
    uv_texture: Callable = rv.resize_texture
    uv_position: Callable = rv.uv_position_map


STAGES = Stages()


@dataclass(eq=False)
class State:
    """What every shard of a run shares (built once per process)."""

    model: object
    ncc: np.ndarray  # (V, 3)
    corner_uv: np.ndarray  # (F, 3, 2)
    prepared: object  # augment.PreparedSources
    groups: np.ndarray  # (n_faces,) group of every new face
    yaws: np.ndarray  # (P,)
    backgrounds: object  # tasks.backgrounds.BackgroundSource

    @property
    def n_poses(self) -> int:
        return int(self.yaws.shape[0])


@dataclass
class Shard:
    """One shard's faces and views: arrays per field, manifest rows, rejected rows."""

    faces: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    face_rows: list = field(default_factory=list)
    view_rows: list = field(default_factory=list)
    rejected: list = field(default_factory=list)


def split(seed: int, index: int, val_fraction: float) -> str:
    return ("val" if augment.face_rng(seed, augment.STREAM_SPLIT, index).random() < val_fraction
            else "train")


def synthesize(state: State, cfg, lo: int, hi: int, uri_prefix: str,
               stages: Stages = STAGES) -> Shard:
    """Augment and render faces ``lo .. hi-1`` (see the module docstring)."""
    a, oc = cfg.augment, cfg.output
    out = Shard()
    views = {k: [] for k in ("image", "pncc", "mask", "depth")}
    faces = {k: [] for k in ("vertices", "uv_texture", "uv_position")}
    for i in range(lo, hi):
        group = str(state.groups[i])
        uri = f"{uri_prefix}/face/{i}"
        extra = {"face_index": i, "group": group}
        sres, rej = isolation.one("augment", uri, lambda i=i, group=group, uri=uri: stages.sample(
            i, group, state.prepared, seed=cfg.seed, m=a.m, r_range=(a.r_min, a.r_max),
            theta_max=a.theta_max, max_flip_ratio=a.max_flip_ratio,
            self_intersection=a.self_intersection, max_attempts=a.max_attempts, uri=uri))
        if rej:
            out.rejected += [RejectedRow(r.source_uri, r.stage, r.reason, r.error,
                                         {**extra, "parents": ""}) for r in rej]
            continue
        out.rejected += sres.rejections
        face = sres.face
        if face is None:
            out.rejected.append(RejectedRow(uri, "augment", f"all {a.max_attempts} draws "
                                            "rejected", "check", {**extra, "parents": ""}))
            continue
        made, rej = isolation.one("render", uri, lambda i=i, face=face: _render_face(
            state, cfg, stages, i, face))
        if rej:
            out.rejected += [RejectedRow(r.source_uri, r.stage, r.reason, r.error,
                                         {**extra, "parents": ""}) for r in rej]
            continue
        v, uv_tex, uv_pos, params = made
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
        _rows(out, state, cfg, i, group, uri, face, params, v)
    out.faces, out.views = faces, views
    return out


def _render_face(state: State, cfg, stages: Stages, i: int, face):
    po, lc, oc = cfg.poses, cfg.lighting, cfg.output
    model, subj = state.model, state.prepared.subjects
    rng = augment.face_rng(cfg.seed, augment.STREAM_RENDER, i)
    params = stages.view_params(rng, state.yaws, pitch_jitter=po.pitch_jitter,
                                roll_jitter=po.roll_jitter,
                                ambient=(lc.ambient_min, lc.ambient_max),
                                directional_std=lc.directional_std, tint_std=lc.tint_std)
    bgs = state.backgrounds.sample_many(rng, state.n_poses, oc.image_size)
    tex = subj.textures[face.texture_subject]
    v = stages.render(face.vertices, model.triangles, state.corner_uv, tex, state.ncc, params,
                      bgs, size=oc.image_size, camera=po.camera, distance=po.distance_mm,
                      margin=po.margin)
    uv_tex = uv_pos = None
    if oc.uv_maps:
        uv_tex = stages.uv_texture(tex, oc.uv_size)
        uv_pos = stages.uv_position(face.vertices, model.triangles, model.uv,
                                    model.uv_triangles, oc.uv_size)
    if not isolation.finite_rows(v.depth.astype(np.float32), v.camera).all() or (
            uv_pos is not None and not np.isfinite(uv_pos).all()):
        raise ValueError("non-finite render output")
    return v, uv_tex, uv_pos, params


def _rows(out: Shard, state: State, cfg, i, group, uri, face, params, v) -> None:
    subj = state.prepared.subjects
    fid = f"f{i:08d}"
    tsub = subj.subject_ids[face.texture_subject]
    sp = split(cfg.seed, i, cfg.output.val_fraction)
    out.face_rows.append({
        "sample_id": fid, "source_uri": uri, "subject_id": fid, "group": group, "split": sp,
        "face_index": i, "parents": ",".join(str(subj.subject_ids[p]) for p in face.parents),
        "weights": ",".join(f"{w:.6f}" for w in face.weights), "texture_subject": tsub,
        "attempt": face.attempt})
    for k in range(state.n_poses):
        row = {"sample_id": f"{fid}_p{k:02d}", "source_uri": uri, "subject_id": fid,
               "group": group, "yaw": float(params.yaw[k]), "pitch": float(params.pitch[k]),
               "roll": float(params.roll[k]), "split": sp, "face_index": i, "pose_index": k,
               "texture_subject": tsub, "camera": cfg.poses.camera}
        for c, name in enumerate(rv.CAMERA_COLUMNS):
            row[name] = float(v.camera[k, c])
        out.view_rows.append(row)


# --------------------------------------------------------------------------- preparation
def load_model(spec: str):
    """``procedural`` | ``ict`` | ``ict:<region>`` | a model file (``meshops.catalog``)."""
    from facecorpus.meshops.catalog import load_model as catalog_load

    return catalog_load(spec)


def _files_digest(paths) -> list:
    return [[os.path.basename(p), hashing.file_sha256(p)] for p in sorted(paths)]


def sources_content(cfg) -> dict:
    """The content of what the sources and backgrounds are read from (never their paths)."""
    import glob

    sc, bc = cfg.subjects, cfg.background
    out: dict = {"source": sc.source}
    if sc.source == "pseudo_gt":
        from facecorpus.datasets.store import open_dataset

        ds = open_dataset(sc.dataset)
        cols = [c for c in ("sample_id", "subject_id", sc.group_column, sc.embedding_column)
                if c and c in ds.manifest.column_names]
        out["dataset"] = hashing.digest([(i.shard, i.key, i.checksums) for i in ds.shards.values()],
                                        ds.manifest.select(cols).to_pydict())
    elif sc.source == "meshes":
        p = sc.meshes
        paths = glob.glob(os.path.join(p, "*")) if os.path.isdir(p) else glob.glob(p)
        out["meshes"] = _files_digest(q for q in paths if os.path.isfile(q))
        out["groups_csv"] = hashing.file_sha256(sc.groups_csv) if sc.groups_csv else None
    if bc.kind == "folder" and bc.folder:
        out["backgrounds"] = _files_digest(
            q for q in glob.glob(os.path.join(bc.folder, "*")) if os.path.isfile(q))
    return out


def build_state(cfg, sources_dir: str | None = None) -> State:
    """Model, DR-encoded sources (memory-mapped from ``sources_dir`` when prepared there, else
    computed and written there), group assignment, poses, backgrounds."""
    from pathlib import Path

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
    ratios = augment.group_ratios_for(prepared.subjects, cfg.augment.group_ratios)
    return State(
        model=model, ncc=ncc(model.vertices),
        corner_uv=np.ascontiguousarray(model.uv[model.uv_triangles], np.float32),
        prepared=prepared, groups=augment.assign_groups(cfg.augment.n_faces, ratios, cfg.seed),
        yaws=np.asarray(cfg.poses.yaws(), np.float32),
        backgrounds=BackgroundSource(cfg.background.kind, cfg.background.folder))


def _make_subjects(cfg, model):
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
