"""The rotate-and-render flow: a pseudo-GT dataset -> large-pose views over their photos.

A :class:`RotateRenderJob` on the shard core (:mod:`facecorpus.flows.shards`). Output shard
s covers the source's global indices ``[s * K, (s + 1) * K)`` (K = ``samples_per_shard``,
default the source's own shard size), computed by
:func:`facecorpus.tasks.rotate_render.rotate_batch` and committed to ``OUT/views`` (image,
mask, hole_mask; rows with the target pose and ``source_sample_id``) with one rejected row
per refused source sample. Its key covers the content config, the model, the code and the
content of exactly those source samples (commit records + manifest rows), so a rerun skips
unchanged shards and a changed source shard recomputes only the shards over it.
"""

from __future__ import annotations

from facecorpus.configs.base import content_config
from facecorpus.configs.rotate_render import LOCATION_FIELDS, RotateRenderConfig
from facecorpus.core import hashing
from facecorpus.core.errors import ConfigError
from facecorpus.flows import shards
from facecorpus.flows.shards import DatasetPart, ShardOutput, ShardSpec, ShardStats
from facecorpus.tasks import rotate_render as rr

VIEWS = "views"


def load_config(path=None, overrides: dict | None = None) -> RotateRenderConfig:
    from facecorpus.configs import load_config as load

    return load(path, "rotate_render", overrides)


class RotateRenderJob(shards.ShardJob):
    name = "rotate-render"

    def __init__(self, cfg: RotateRenderConfig, out=None):
        self.out = str(out or cfg.out or "")
        if not cfg.source or not self.out:
            raise ConfigError("rotate-render needs a source (--source) and an out (--out)")
        self.cfg, self._writer = cfg, None
        self.root, ds = rr.open_source(cfg.source)  # checked here, before any work
        # a process keeps the source it opened only while its commits are the same
        self.fingerprint = hashing.digest(self.root, cfg.model, sorted(
            (s, i.key, i.checksums) for s, i in ds.shards.items()), n=24)
        st = shards.worker_state(self.fingerprint, lambda: _State(self.root, cfg.model, ds))
        self.content = {k: v for k, v in content_config(cfg).items() if k not in LOCATION_FIELDS}
        self.model_hash = st.model.content_hash()
        self.K = cfg.samples_per_shard or ds.schema.samples_per_shard
        self.S = ds.schema.fields["image"].shape[0]

    @property
    def state(self):  # (model, source dataset), once per process
        return shards.worker_state(self.fingerprint, lambda: _State(self.root, self.cfg.model))

    def writer(self):
        if self._writer is None:
            from facecorpus.datasets.store import DatasetWriter

            attrs = {"model_hash": self.model_hash, "config": self.content,
                     "source_model": self.state.ds.schema.attrs.get("model")}
            self._writer = DatasetWriter(shards.join(self.out, VIEWS), rr.schema(
                self.S, self.cfg.views_per_sample, self.K, attrs, self.cfg.compression_level))
        return self._writer

    def plan(self) -> list[ShardSpec]:
        ds, w = self.state.ds, self.writer()
        index = ds.manifest.column("index").to_numpy()
        old_stats = shards.read_stats(self.out)
        specs = []
        for s in sorted({int(i) // self.K for i in index}):
            idx, digest = rr.shard_content(ds, s * self.K, (s + 1) * self.K)
            key = shards.stage_key("rotate_render.shard", rr.CODE_VERSION,
                                   config=self.content, model=self.model_hash, source=digest)
            spec = ShardSpec(s, key.key, idx, explain=shards.part_digests(key.parts))
            info = w.shard_info(s)
            spec.why = shards.why_runs(spec, info.key if info else None, old_stats.get(s))
            specs.append(spec)
        return specs

    def is_done(self, spec: ShardSpec) -> bool:
        return self.writer().is_committed(spec.id, spec.key)

    def run(self, spec: ShardSpec) -> ShardOutput:
        c, st = self.cfg, self.state
        batch = rr.read_sources(st.ds, spec.items)
        offsets = rr.draw_offsets(c.seed, [r["sample_id"] for r in batch.rows],
                                  c.views_per_sample, *c.yaw_offset_range)
        res = rr.rotate_batch(st.model, batch, offsets, max_abs_yaw=c.max_abs_yaw,
                              hole_fill=c.hole_fill, hole_dilate_px=c.hole_dilate_px,
                              inpaint_radius=c.inpaint_radius,
                              inpaint_downscale=c.inpaint_downscale, min_mask_px=c.min_mask_px,
                              lighting=c.lighting, min_irradiance=c.min_irradiance,
                              sheets=c.sheets)
        stats = ShardStats(spec.id, inputs=len(batch), accepted=len(res.accepted),
                           rejected=len(res.rejected), extra={"views": len(res.rows)})
        stats.count(res.rejected)
        return ShardOutput({VIEWS: DatasetPart(res.arrays, res.rows, res.rejected)}, stats,
                           {"sheet_rows": res.sheet_rows})

    def commit(self, spec: ShardSpec, output: ShardOutput) -> None:
        part = output.parts[VIEWS]
        self.writer().write_shard(spec.id, part.arrays, part.rows, key=spec.key,
                                  rejected=[r.row() for r in part.rejected], overwrite=True,
                                  made_by=shards.made_by(self.model_hash))
        if self.cfg.sheets and output.extras["sheet_rows"]:
            shards.write_sheet(shards.join(self.out, "sheets", f"shard-{spec.id:05d}.png"),
                               output.extras["sheet_rows"], cell=128,
                               labels=rr.sheet_labels(self.cfg.views_per_sample))

    def summarize(self, specs, stats, *, skipped) -> dict:
        from facecorpus.datasets.store import open_dataset
        from facecorpus.flows import summary

        man, rej, committed = summary.committed_tables(
            open_dataset(shards.join(self.out, VIEWS)), specs)
        accepted = len(set(man.column("source_sample_id").to_pylist())) if len(man) else 0
        inputs = sum(len(s.items) for s in specs if s.id in committed)
        by_stage, reasons = summary.rejections(rej)
        _, medians = summary.histograms(man, ("yaw", "yaw_offset", "source_yaw", "hole_px"))
        return summary.write(self.out, {
            "out": self.out, "source": self.root, "shards": len(specs),
            "shards_committed": len(committed), "shards_run": len(stats),
            "shards_skipped": skipped, "inputs": inputs, "accepted": accepted,
            "rejected": rej.num_rows, "counts_add_up": inputs == accepted + rej.num_rows,
            "views": man.num_rows, "views_this_run": sum(s.extra.get("views", 0) for s in stats),
            "rejected_by_stage": by_stage, "rejected_by_reason": reasons, "medians": medians,
            "sheets": sorted(shards.join(self.out, "sheets", f"shard-{s:05d}.png")
                             for s in committed),
            **summary.run_stats(self.out, stats, self.phase_seconds)})


class _State:
    def __init__(self, root: str, model_spec: str | None, ds=None):
        self.ds = ds if ds is not None else rr.open_source(root)[1]
        self.model = rr.load_model(self.ds, model_spec)


# --------------------------------------------------------------------------- entry points
def run_local(cfg: RotateRenderConfig, out=None, *, max_shards: int | None = None) -> dict:
    """Pending shards without Prefect: in this process, or on ``dask_address``."""
    return shards.run_job(RotateRenderJob(cfg, out), cfg, prefect=False, max_shards=max_shards)


def rotate_render_flow_fn(cfg_json: str, out: str, max_shards: int | None = None) -> dict:
    """Body of the Prefect flow: one task per pending shard; settings from ``cfg_json``."""
    cfg = RotateRenderConfig.model_validate_json(cfg_json)
    return shards.run_job(RotateRenderJob(cfg, out), cfg, prefect=True, max_shards=max_shards)


def run_rotate_render(cfg: RotateRenderConfig, out=None, *, max_shards: int | None = None):
    from facecorpus.flows import runtime

    return runtime.run_flow(rotate_render_flow_fn, "rotate-render", cfg, str(out or cfg.out),
                            max_shards)


def make_deployment(cfg: RotateRenderConfig, out, cron: str, max_shards: int | None = None):
    from facecorpus.flows import runtime

    return runtime.deployment(
        runtime.make_flow(rotate_render_flow_fn, "rotate-render"),
        f"{__name__}:rotate_render_flow", "rotate-render", cron,
        {"cfg_json": cfg.model_dump_json(), "out": str(out), "max_shards": max_shards})


def __getattr__(name: str):
    if name == "rotate_render_flow":
        from facecorpus.flows import runtime

        return runtime.make_flow(rotate_render_flow_fn, "rotate-render")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
