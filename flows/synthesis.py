"""The synthesis flow: DR shape augmentation -> multi-pose rendering -> sharded datasets.

A :class:`SynthesisJob` on the shard core (:mod:`facecorpus.flows.shards`). A shard is the
fixed face-index range ``[s * F, (s + 1) * F)`` with all poses of its faces, computed by
:func:`facecorpus.tasks.synthesis.synthesize` and committed to ``OUT/faces`` (vertices, UV
maps, rejected draws) then ``OUT/views`` (image, pncc, mask, depth), views last. Its key
covers the config, the model, the content of the sources (pseudo-GT dataset commit records,
mesh and texture bytes) and of the background folder, and the code version; so a rerun
skips shards committed with the same key, and 1 or N workers write byte-identical files.

The sources are DR-encoded once per recipe in the driver into ``OUT/.sources/<digest>``
(memory-mapped by every worker); the digest covers the model and the sources' content.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from facecorpus.configs.base import content_config
from facecorpus.configs.synthesis import SynthesisConfig
from facecorpus.core import hashing
from facecorpus.flows import runtime, shards
from facecorpus.flows.shards import DatasetPart, ShardOutput, ShardSpec, ShardStats
from facecorpus.tasks import synthesis as stages_mod

log = logging.getLogger("facecorpus.synthesis")

VIEWS, FACES = "views", "faces"


def load_config(path, overrides: dict | None = None) -> SynthesisConfig:
    from facecorpus.configs import load_config as load

    return load(path, "synthesis", overrides)


class SynthesisJob(shards.ShardJob):
    name = "synthesis"

    def __init__(self, cfg: SynthesisConfig, out, *, stages=stages_mod.STAGES):
        self.cfg, self.out, self.stages = cfg, str(out), stages
        self.content = content_config(cfg)
        model_hash = stages_mod.load_model(cfg.model).content_hash()
        self.parts = {"config": self.content, "model": model_hash,
                      "sources": stages_mod.sources_content(cfg)}
        recipe = {k: self.parts[k] for k in ("model", "sources")}
        recipe["subjects"], recipe["seed"] = self.content["subjects"], cfg.seed
        digest = hashing.digest(recipe, n=16)
        if shards.is_url(self.out):
            # memory-mapping needs local files: on an object store each process prepares
            # the sources once into its machine's cache (same recipe digest, same bytes)
            from facecorpus.meshops.assets import cache_dir

            self.sources_dir = str(cache_dir() / "sources" / digest)
        else:
            self.sources_dir = shards.join(self.out, ".sources", digest)
        self.key = shards.stage_key("synthesis.shard", stages_mod.CODE_VERSION,
                                    **self.parts).key
        self.fingerprint = hashing.digest(self.key, self.sources_dir, n=24)
        self._writers = None

    @property
    def state(self) -> stages_mod.State:
        return shards.worker_state(self.fingerprint,
                                   lambda: stages_mod.build_state(self.cfg, self.sources_dir))

    def writers(self):
        """(views, faces) writers; created here, in the driver, before any shard runs."""
        if self._writers is None:
            from facecorpus.datasets.store import DatasetWriter

            vs, fs = schemas(self.cfg, self.state)
            self._writers = (DatasetWriter(shards.join(self.out, VIEWS), vs),
                             DatasetWriter(shards.join(self.out, FACES), fs))
        return self._writers

    def plan(self) -> list[ShardSpec]:
        F, n = self.cfg.output.faces_per_shard, self.cfg.augment.n_faces
        self.writers()
        old_stats = shards.read_stats(self.out)
        explain = shards.part_digests(shards.stage_key(
            "synthesis.shard", stages_mod.CODE_VERSION, **self.parts).parts)
        specs = []
        for s in range(self.cfg.n_shards()):
            spec = ShardSpec(s, f"{self.key}:{s}", [s * F, min(n, (s + 1) * F)],
                             explain=explain)
            info = self._writers[0].shard_info(s)
            spec.why = shards.why_runs(spec, info.key if info else None, old_stats.get(s))
            specs.append(spec)
        return specs

    def is_done(self, spec: ShardSpec) -> bool:
        return all(w.is_committed(spec.id, spec.key) for w in self.writers())

    def threads_per_shard(self) -> int:
        return max(1, (os.cpu_count() or 1) // max(1, self.cfg.workers))

    def run(self, spec: ShardSpec) -> ShardOutput:
        import numba

        numba.set_num_threads(min(self.threads_per_shard(), numba.config.NUMBA_NUM_THREADS))
        lo, hi = spec.items
        st = self.state
        sh = stages_mod.synthesize(st, self.cfg, lo, hi, f"synthesis:{self.key[:12]}",
                                   self.stages)
        vw, fw = self.writers()

        def cat(parts, spec_):
            return (np.concatenate(parts) if parts
                    else np.zeros((0, *spec_.shape), spec_.dtype))

        varr = {k: cat(sh.views[k], vw.schema.fields[k]) for k in vw.schema.fields}
        farr = {k: cat(sh.faces[k], fw.schema.fields[k]) for k in fw.schema.fields}
        stats = ShardStats(spec.id, inputs=hi - lo, accepted=len(sh.face_rows),
                           rejected=len(sh.rejected),
                           extra={"pairs": len(sh.view_rows)})
        stats.count(sh.rejected)
        return ShardOutput({FACES: DatasetPart(farr, sh.face_rows, sh.rejected),
                            VIEWS: DatasetPart(varr, sh.view_rows)}, stats)

    def commit(self, spec: ShardSpec, output: ShardOutput) -> None:
        vw, fw = self.writers()
        f, v = output.parts[FACES], output.parts[VIEWS]
        made = shards.made_by(self.parts["model"])
        fw.write_shard(spec.id, f.arrays, f.rows, key=spec.key,
                       rejected=[r.row() for r in f.rejected], overwrite=True, made_by=made)
        vw.write_shard(spec.id, v.arrays, v.rows, key=spec.key, overwrite=True, made_by=made)

    def summarize(self, specs, stats, *, skipped) -> dict:
        from facecorpus.flows import summary

        return summary.synthesis_summary(self, stats, skipped=skipped)


def schemas(cfg: SynthesisConfig, state: stages_mod.State):
    """(views schema, faces schema) of a run."""
    from facecorpus.datasets.store import DatasetSchema, FieldSpec

    S, U, P, F = cfg.output.image_size, cfg.output.uv_size, state.n_poses, \
        cfg.output.faces_per_shard
    vf = {"image": FieldSpec((S, S, 3), "uint8", "srgb", "textured, lit face over a background"),
          "pncc": FieldSpec((S, S, 3), "uint8", "ncc*255", "mean-shape NCC per pixel, 0 outside"),
          "mask": FieldSpec((S, S, 1), "uint8", "0/1", "1 where the face covers the pixel")}
    if cfg.output.depth:
        vf["depth"] = FieldSpec((S, S, 1), "float16", "mm relative to cam_distance",
                                "depth_mm = depth + cam_distance on the mask, 0 outside")
    ff = {"vertices": FieldSpec((state.model.n_vertices, 3), "float32", "mm",
                                "the new face in model space")}
    if cfg.output.uv_maps:
        ff["uv_texture"] = FieldSpec((U, U, 3), "uint8", "srgb", "UV texture of the face")
        ff["uv_position"] = FieldSpec((U, U, 3), "float32", "mm",
                                      "model-space surface point per texel, 0 outside the layout")
    attrs = {"model": state.model.name, "model_hash": state.model.content_hash(),
             "yaws": [float(y) for y in state.yaws], "config": content_config(cfg)}
    comp = {"compression": cfg.output.compression,
            "compression_level": cfg.output.compression_level}
    # what fixes the arrays' layout; content changes are the shard keys' business
    layout = hashing.digest(S, U, P, F, cfg.output.depth, cfg.output.uv_maps, n=32)
    views = DatasetSchema(vf, samples_per_shard=F * P, samples_per_chunk=P, producer="synthesis",
                          config_hash=layout, attrs=attrs, **comp)
    faces = DatasetSchema(ff, samples_per_shard=F, samples_per_chunk=1,
                          producer="synthesis-faces", config_hash=layout, attrs=attrs, **comp)
    return views, faces


# --------------------------------------------------------------------------- entry points
def run_shards(cfg: SynthesisConfig, out, *, max_shards: int | None = None,
               stages=stages_mod.STAGES) -> dict:
    """Pending shards in this process, one after another, without Prefect."""
    return shards.run_job(SynthesisJob(cfg, out, stages=stages), cfg, prefect=False,
                          max_shards=max_shards)


def synthesis_flow_fn(cfg_json: str, out: str, max_shards: int | None = None) -> dict:
    """Body of the Prefect flow: one task per pending shard; settings from ``cfg_json``."""
    cfg = SynthesisConfig.model_validate_json(cfg_json)
    job = SynthesisJob(cfg, out)
    job.state  # noqa: B018 - prepare (and cache) the sources once, here, before any shard
    return shards.run_job(job, cfg, prefect=True, max_shards=max_shards)


def run_synthesis(cfg: SynthesisConfig, out, *, max_shards: int | None = None) -> dict:
    """Run the synthesis flow through Prefect on the configured task runner."""
    return runtime.run_flow(synthesis_flow_fn, "synthesis", cfg, str(out), max_shards)


def make_deployment(cfg: SynthesisConfig, out, cron: str, name: str = "synthesis",
                    max_shards: int | None = None):
    return runtime.deployment(
        runtime.make_flow(synthesis_flow_fn, "synthesis"), f"{__name__}:synthesis_flow", name,
        cron, {"cfg_json": cfg.model_dump_json(), "out": str(out), "max_shards": max_shards})


def __getattr__(name: str):
    if name == "synthesis_flow":
        return runtime.make_flow(synthesis_flow_fn, "synthesis")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
