"""The pseudo-GT flow: photos -> landmarks -> 3DMM fit -> UV unwrap -> prior -> Poisson blend.

A :class:`PseudoGTJob` on the shard core (:mod:`facecorpus.flows.shards`). **plan**: list and
hash the inputs, keep each in the shard it was in before (new ones fill the last shard, then
new shards), key every shard by inputs' content, config, model, landmark backend, code version
and the texture prior's version; the model is checked against an existing dataset first.
**prepare** (driver): analyse the shards to run (ingest → landmarks → stage-1 fit → masks →
unwrap, saved as ``OUT/_work/analysis-<shard>-<key>.npz``), then reuse the stored texture prior
or build it once (:mod:`facecorpus.flows.prior_store`). **run/commit** (a task per shard):
:func:`facecorpus.tasks.pseudo_gt.finish`, then the shard is committed whole with its rejected
rows and ``OUT/sheets/shard-<id>.png``. Workers read and write under OUT: with a remote cluster
OUT must be a path every worker sees, or an fsspec URL.
"""

from __future__ import annotations

import json
import time

import numpy as np
from facecorpus.configs.base import content_config
from facecorpus.configs.pseudo_gt import PseudoGTConfig
from facecorpus.core import hashing
from facecorpus.flows import prior_store, runtime, shards
from facecorpus.flows.shards import DatasetPart, ShardOutput, ShardSpec, ShardStats
from facecorpus.tasks import pseudo_gt as stages_mod
from facecorpus.tasks.inputs import (
    PlannedInput,
    assign_shards,
    committed_membership,
    hash_inputs,
    list_planned,
)

DATASET, WORK = "dataset", "_work"
# config sections that shape the analyse step (the rest only the finish step)
ANALYSE_SECTIONS = ("model", "ingest", "landmarks", "fit", "unwrap", "joint_subjects")


def load_config(path=None, overrides: dict | None = None) -> PseudoGTConfig:
    from facecorpus.configs import load_config as load

    return load(path, "pseudo_gt", overrides)


class PseudoGTJob(shards.ShardJob):
    name = "pseudo-gt"
    # its BLAS calls are small and many (occlusion EM, model shape): one thread computes
    # them at less CPU than a pool spinning between calls (docs/benchmarks.md, #12)
    blas_threads = 1

    def __init__(self, cfg: PseudoGTConfig, input_spec: str, out: str, *,
                 rebuild_prior: bool = False, stages: stages_mod.Stages = stages_mod.STAGES):
        self.cfg, self.input_spec, self.out = cfg, str(input_spec), str(out)
        self.rebuild_prior, self.stages = rebuild_prior, stages
        self.content = content_config(cfg)
        self.fingerprint = hashing.digest("pseudo_gt", self.content, n=24)
        self.prior: prior_store.StoredPrior | None = None
        self._writer = None

    def __getstate__(self):  # workers get the recipe, never the built state
        d = dict(self.__dict__)
        d["prior"] = None
        return d

    @property
    def state(self) -> stages_mod.State:
        return shards.worker_state(self.fingerprint, lambda: stages_mod.State.build(self.cfg))

    # ------------------------------------------------------------------ dataset
    def writer(self):
        if self._writer is None:
            from facecorpus.datasets.store import DatasetWriter

            c = self.cfg
            # the switches that add fields, only when on (default layouts keep their hash)
            extra = [k for k, on in (("nonrigid", c.nonrigid.enabled),
                                     ("albedo", c.albedo.enabled)) if on]
            layout = hashing.digest(c.landmarks.crop_size, c.unwrap.uv_size,
                                    c.output.samples_per_shard, *extra, n=32)
            sch = stages_mod.schema(self.state, self.cfg, self.content, layout)
            self._writer = DatasetWriter(shards.join(self.out, DATASET), sch)
        return self._writer

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[ShardSpec]:
        shards.check_model(shards.join(self.out, DATASET), self.state.model.content_hash(),
                           self.cfg.model)
        inputs = hash_inputs(list_planned(self.input_spec))
        members_path = shards.join(self.out, WORK, "membership.json")
        known = json.loads(shards.get_bytes(members_path) or b"{}")
        known.update(committed_membership(shards.join(self.out, DATASET)))
        where = assign_shards([p.source_uri for p in inputs], known,
                              self.cfg.output.samples_per_shard,
                              subjects={p.source_uri: p.subject_id for p in inputs}
                              if self.cfg.joint_subjects else None)
        shards.put_bytes(members_path, json.dumps(where, indent=0).encode())
        by_shard: dict[int, list[PlannedInput]] = {s: [] for s in set(known.values())}
        for p in inputs:
            by_shard.setdefault(where[p.source_uri], []).append(p)
        self.prior = (None if self.rebuild_prior else
                      prior_store.reusable(self.out, self.cfg, self.state, len(inputs)))
        st, writer = self.state, self.writer()
        common = {k: self.content[k] for k in ANALYSE_SECTIONS}
        common_parts = {"config": common, "model": st.model.content_hash(),
                        "landmark_backend": stages_mod.landmark_backend(self.cfg.landmarks)}
        finish_cfg = {k: v for k, v in self.content.items() if k not in ANALYSE_SECTIONS}
        old_stats = shards.read_stats(self.out)
        specs = []
        for sid in sorted(by_shard):
            items = by_shard[sid]
            ak = shards.stage_key("pseudo_gt.analyse", stages_mod.CODE_VERSION,
                                  inputs=[p.key_part() for p in items], **common_parts)
            spec = ShardSpec(sid, "", [p.__dict__ for p in items],
                             {"analyse": ak.key, "finish_config": finish_cfg})
            spec.explain = shards.part_digests({
                **{k: v for k, v in ak.parts.items() if k != "inputs"},
                "inputs": {p.source_uri: p.key_part() for p in items},
                "finish_config": finish_cfg})
            self._set_key(spec)
            info = writer.shard_info(sid)
            spec.why = shards.why_runs(spec, info.key if info else None, old_stats.get(sid))
            specs.append(spec)
        return specs

    def _set_key(self, spec: ShardSpec) -> None:
        spec.parts["prior"] = self.prior.version if self.prior else "pending"
        spec.explain["prior"] = spec.parts["prior"]
        spec.key = shards.stage_key("pseudo_gt.finish", stages_mod.CODE_VERSION,
                                    **spec.parts).key

    def is_done(self, spec: ShardSpec) -> bool:
        return self.writer().is_committed(spec.id, spec.key)

    # ------------------------------------------------------------------ prepare
    def _analysis_path(self, spec: ShardSpec) -> str:
        return shards.join(self.out, WORK,
                           f"analysis-{spec.id:05d}-{spec.parts['analyse'][:16]}.npz")

    def analysis(self, spec: ShardSpec) -> stages_mod.Analysis:
        """The shard's analysis: read back when it exists, else computed and saved."""
        path = self._analysis_path(spec)
        data = shards.get_bytes(path)
        if data is not None:
            return stages_mod.Analysis.from_bytes(data)
        res = stages_mod.analyse(self.state, [PlannedInput(**d) for d in spec.items], self.cfg,
                                 self.stages)
        shards.put_bytes(path, res.to_bytes())
        return res

    def prepare(self, todo, specs, ex) -> None:
        # a prior built now is built from the whole corpus, not only the shards run now
        build = self.prior is None and bool(todo)
        targets = specs if build else todo
        need = [s for s in targets if not shards.exists(self._analysis_path(s))]
        t0 = time.perf_counter()
        shards.map_with_progress(ex, analyse_shard, [(self, s) for s in need], "analyse")
        t1 = time.perf_counter()
        if build:
            self.prior = prior_store.build_and_save(self.out, self.cfg, self.state,
                                                    [self._analysis_path(s) for s in specs])
        self.prepare_seconds = {"analyse": round(t1 - t0, 3),
                                "prior": round(time.perf_counter() - t1, 3)}
        for s in todo:
            self._set_key(s)
        self.export_uv_regions()

    # ------------------------------------------------------------------ run
    def run(self, spec: ShardSpec) -> ShardOutput:
        if self.prior is None or self.prior.version != spec.parts["prior"]:
            self.prior = prior_store.load_current(
                self.out, prior_store.recipe(self.cfg, self.state.model.content_hash()))
        a = self.analysis(spec)
        fin = stages_mod.finish(self.state, a, self.prior.prior, self.cfg, self.stages,
                                prior_version=self.prior.version,
                                schema_fields=self.writer().schema.fields)
        st = ShardStats(spec.id, inputs=len(spec.items), accepted=len(fin.rows),
                        rejected=len(fin.rejected))
        st.count(fin.rejected)
        return ShardOutput({DATASET: DatasetPart(fin.arrays, fin.rows, fin.rejected)}, st,
                           {"sheet_rows": fin.sheet_rows})

    def commit(self, spec: ShardSpec, output: ShardOutput) -> None:
        part = output.parts[DATASET]
        order = {d["source_uri"]: k for k, d in enumerate(spec.items)}
        rejected = sorted(part.rejected, key=lambda r: order.get(r.source_uri, len(order)))
        self.writer().write_shard(spec.id, part.arrays, part.rows, key=spec.key,
                                  rejected=[r.row() for r in rejected], overwrite=True,
                                  made_by=shards.made_by(self.state.model.content_hash()))
        if self.cfg.output.sheets and output.extras["sheet_rows"]:
            shards.write_sheet(shards.join(self.out, "sheets", f"shard-{spec.id:05d}.png"),
                               output.extras["sheet_rows"], cell=128,
                               labels=stages_mod.sheet_labels(self.cfg))

    def export_uv_regions(self) -> None:
        """``dataset/uv_regions.npz``: layout, mirror map, centre/side masks (+ a PNG)."""
        root, T = shards.join(self.out, DATASET), self.cfg.unwrap.uv_size
        data, regions = stages_mod.uv_regions_npz(self.state, T)
        shards.put_bytes(shards.join(root, "uv_regions.npz"), data)
        shards.write_sheet(shards.join(root, "uv_regions.png"),
                           [[r.astype(np.float32) for r in regions.values()]], cell=T,
                           labels=list(regions))

    def summarize(self, specs, stats, *, skipped) -> dict:
        from facecorpus.flows import summary

        return summary.pseudo_gt_summary(self, specs, stats, skipped=skipped)


def analyse_shard(job: PseudoGTJob, spec: ShardSpec) -> dict:
    """Worker entry of the analyse phase (its result feeds the progress line)."""
    a = job.analysis(spec)
    return {"shard": spec.id, "inputs": len(spec.items), "accepted": a.n,
            "rejected": len(a.rejected)}


# --------------------------------------------------------------------------- entry points
def run_local(cfg: PseudoGTConfig, input_spec, out, *, max_shards: int | None = None,
              rebuild_prior: bool = False, stages=stages_mod.STAGES) -> dict:
    """The whole flow without Prefect: shards one after another in this process (tests,
    benchmarks, debugging), or on the Dask scheduler at ``dask_address``."""
    job = PseudoGTJob(cfg, input_spec, out, rebuild_prior=rebuild_prior, stages=stages)
    return shards.run_job(job, cfg, prefect=False, max_shards=max_shards)


def pseudo_gt_flow_fn(cfg_json: str, input_spec: str, out: str, max_shards: int | None = None,
                      rebuild_prior: bool = False) -> dict:
    """Body of the Prefect flow: every setting comes from ``cfg_json``, so a scheduled run
    runs exactly like the command that served it."""
    cfg = PseudoGTConfig.model_validate_json(cfg_json)
    job = PseudoGTJob(cfg, input_spec, out, rebuild_prior=rebuild_prior)
    return shards.run_job(job, cfg, prefect=True, max_shards=max_shards)


def run_pseudo_gt(cfg: PseudoGTConfig, input_spec, out, *, max_shards: int | None = None,
                  rebuild_prior: bool = False) -> dict:
    """Run the flow through Prefect on the configured task runner."""
    return runtime.run_flow(pseudo_gt_flow_fn, "pseudo-gt", cfg, str(input_spec), str(out),
                            max_shards, rebuild_prior)


def make_deployment(cfg: PseudoGTConfig, input_spec, out, cron: str, name: str = "pseudo-gt",
                    max_shards: int | None = None):
    """A Prefect deployment on a cron schedule (e.g. ``"0 3 * * *"``): each scheduled run
    resumes the same OUT with the same settings, so only new or changed inputs are computed."""
    return runtime.deployment(
        runtime.make_flow(pseudo_gt_flow_fn, "pseudo-gt"), f"{__name__}:pseudo_gt_flow", name,
        cron, {"cfg_json": cfg.model_dump_json(), "input_spec": str(input_spec), "out": str(out),
               "max_shards": max_shards, "rebuild_prior": False})


def __getattr__(name: str):
    # built on first access so importing this module stays Prefect-free
    if name == "pseudo_gt_flow":
        return runtime.make_flow(pseudo_gt_flow_fn, "pseudo-gt")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
