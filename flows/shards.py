"""The shard-job core every flow runs on: keys, specs, outputs, stats, one runner.

A flow is a :class:`ShardJob`: ``plan()`` cuts the work into :class:`ShardSpec` records, each
with the content key of everything its bytes depend on (a :class:`StageKey`); ``run(spec)``
computes one shard as a :class:`ShardOutput` (arrays, manifest rows, :class:`RejectedRow` s,
stats) and ``commit`` writes it whole. :func:`execute` runs the pending shards of a job on an
:class:`Executor` (in this process, a thread pool, a Dask cluster, or Prefect tasks on either),
with retries and progress, writes each shard's stats beside the run and returns what the job's
summary rebuilds from disk.

The job object is what travels to workers: it pickles as its config and output location
only; the heavy per-process state (model, detectors, sources) is built lazily in each process
by :func:`worker_state` and kept in a small bounded cache, like img2dataset's ``Downloader``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from facecorpus.core.errors import ConfigError, RejectedRow
from facecorpus.flows.executors import (  # noqa: F401  (re-exported: flows import them here)
    DaskExecutor,
    Executor,
    LocalExecutor,
    PrefectExecutor,
    Progress,
    ThreadExecutor,
    blas_threads,
    make_executor,
    map_with_progress,
)
from facecorpus.flows.keys import (  # noqa: F401
    StageKey,
    made_by,
    part_digests,
    stage_key,
    why_runs,
)
from facecorpus.flows.storage import (  # noqa: F401
    exists,
    get_bytes,
    is_url,
    join,
    put_bytes,
    write_sheet,
)

log = logging.getLogger("facecorpus.shards")

STATS_DIR = "_stats"


# --------------------------------------------------------------------------- records
@dataclass
class ShardSpec:
    """One unit of work: shard ``id``, its content ``key`` (and the key's parts, recorded so a
    rerun can say what changed), and the job-specific ``items`` it covers (JSON-able)."""

    id: int
    key: str
    items: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    why: str = ""  # why it runs: "new", or the names of the key parts that changed
    explain: dict = field(default_factory=dict)  # part -> digest, recorded with the stats


@dataclass
class ShardStats:
    """Per-shard statistics, written to ``OUT/_stats/shard-NNNNNN.json`` after the commit so
    the summary is rebuilt from disk (timings never enter the dataset's bytes)."""

    shard: int
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    rejected_by_stage: dict = field(default_factory=dict)
    rejected_by_reason: dict = field(default_factory=dict)
    skipped: bool = False
    why: str = ""
    extra: dict = field(default_factory=dict)

    def count(self, rejected: Iterable[RejectedRow]) -> None:
        for r in rejected:
            self.rejected_by_stage[r.stage] = self.rejected_by_stage.get(r.stage, 0) + 1
            self.rejected_by_reason[r.reason] = self.rejected_by_reason.get(r.reason, 0) + 1


@dataclass
class DatasetPart:
    """What one shard adds to one dataset: ``arrays`` (field -> (n, ...)), ``rows`` (n
    manifest rows) and the rejected rows committed with it."""

    arrays: dict
    rows: list
    rejected: list = field(default_factory=list)


@dataclass
class ShardOutput:
    """One computed shard: a :class:`DatasetPart` per dataset (committed in this order, the
    last one last, so its manifest marks the shard done), its stats, and optional extras
    (e.g. contact-sheet rows) the job's ``commit`` uses."""

    parts: dict
    stats: ShardStats
    extras: dict = field(default_factory=dict)


def reject_counts(rows: Iterable[RejectedRow]) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        out[r.reason] = out.get(r.reason, 0) + 1
    return out


# --------------------------------------------------------------------------- worker state
_STATE: OrderedDict[str, Any] = OrderedDict()
_STATE_LOCK = threading.Lock()
_STATE_MAX = 2  # a worker runs one job at a time; two covers a driver running two flows


def worker_state(fingerprint: str, build: Callable[[], Any]) -> Any:
    """The per-process state of a job, built once per process and fingerprint.

    Bounded (least recently used goes first, its ``close()`` called), so long-lived workers
    that see many configs do not keep every model in memory.
    """
    with _STATE_LOCK:
        st = _STATE.get(fingerprint)
        if st is not None:
            _STATE.move_to_end(fingerprint)
            return st
        st = build()
        _STATE[fingerprint] = st
        while len(_STATE) > _STATE_MAX:
            _, old = _STATE.popitem(last=False)
            close = getattr(old, "close", None)
            if close is not None:
                close()
        return st


def clear_worker_state() -> None:
    with _STATE_LOCK:
        while _STATE:
            _, old = _STATE.popitem()
            close = getattr(old, "close", None)
            if close is not None:
                close()


# --------------------------------------------------------------------------- the job
class ShardJob:
    """Base of a flow's job. Subclasses implement :meth:`plan`, :meth:`run`, :meth:`commit`
    and :meth:`summarize`; :meth:`prepare` is an optional driver-side step before shards run
    (the pseudo-GT flow analyses shards and builds its texture prior there)."""

    name = "job"
    out: str  # the run folder or URL (set by the subclass)
    phase_seconds: dict = {}  # noqa: RUF012 - set per run by execute()

    def plan(self) -> list[ShardSpec]:
        raise NotImplementedError

    def is_done(self, spec: ShardSpec) -> bool:
        raise NotImplementedError

    def prepare(self, todo: list[ShardSpec], specs: list[ShardSpec], ex: Executor) -> None:
        return None

    def run(self, spec: ShardSpec) -> ShardOutput:
        raise NotImplementedError

    def commit(self, spec: ShardSpec, output: ShardOutput) -> None:
        raise NotImplementedError

    def summarize(self, specs: list[ShardSpec], stats: list[ShardStats], *,
                  skipped: int) -> dict:
        raise NotImplementedError

    def threads_per_shard(self) -> int | None:
        return None

    # OpenBLAS threads while the job computes in this process (None: the libraries' default);
    # see flows.executors.blas_threads. LocalCluster workers get 1 from Dask's nanny environment.
    blas_threads: int | None = None


def run_shard(job: ShardJob, spec: ShardSpec) -> dict:
    """Compute, commit and record one shard (the function every executor runs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = job.run(spec)
    job.commit(spec, out)
    st = out.stats
    st.shard, st.why = spec.id, spec.why
    st.extra["key_parts"] = spec.explain
    st.seconds = round(time.perf_counter() - t0, 4)
    st.cpu_seconds = round(time.process_time() - c0, 4)
    write_stats(job.out, st)
    return asdict(st)


def write_stats(out: str, st: ShardStats) -> None:
    from facecorpus.core import atomic

    data = json.dumps(asdict(st), indent=1, sort_keys=True)
    path = join(out, STATS_DIR, f"shard-{st.shard:06d}.json")
    if is_url(out):
        import fsspec

        with fsspec.open(path, "w") as fh:  # an object-store PUT is atomic
            fh.write(data)
    else:
        atomic.write_text(path, data)


def read_stats(out: str) -> dict[int, dict]:
    """Every shard's last recorded stats under ``OUT/_stats``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(join(out, STATS_DIR))
    if not fs.exists(root):
        return {}
    res = {}
    for p in fs.ls(root, detail=False):
        name = p.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".json"):
            with fs.open(p, "r") as fh:
                d = json.load(fh)
            res[int(d["shard"])] = d
    return res


def execute(job: ShardJob, ex: Executor, *, max_shards: int | None = None) -> dict:
    """Plan, skip what is committed with the same key, prepare, run the rest, summarize.
    Wall and driver CPU seconds of each phase go to ``job.phase_seconds`` (the summary)."""
    with blas_threads(job.blas_threads):
        return _execute(job, ex, max_shards=max_shards)


def _execute(job: ShardJob, ex: Executor, *, max_shards: int | None) -> dict:
    t = [time.perf_counter()]
    specs = job.plan()
    t.append(time.perf_counter())
    todo = [s for s in specs if not job.is_done(s)]
    skipped = len(specs) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    log.info("%s: %d shards (%d committed with the same key, %d to run)", job.name, len(specs),
             skipped, len(todo))
    for s in todo:
        log.info("%s: shard %d runs (%s)", job.name, s.id, s.why or "new")
    job.prepare(todo, specs, ex)
    t.append(time.perf_counter())
    results = map_with_progress(ex, run_shard, [(job, s) for s in todo], job.name)
    t.append(time.perf_counter())
    job.phase_seconds = {k: round(b - a, 3) for k, a, b in zip(
        ("plan", "prepare", "shards"), t[:-1], t[1:], strict=True)}
    job.phase_seconds.update(getattr(job, "prepare_seconds", {}))
    stats = [ShardStats(**r) for r in results]
    return job.summarize(specs, stats, skipped=skipped)


def execute_with(job: ShardJob, *, kind: str, workers: int, dask_address: str | None,
                 retries: int, prefect: bool, max_shards: int | None = None) -> dict:
    """:func:`execute` on the executor these settings name (outside a Prefect flow)."""
    with make_executor(kind, workers, dask_address, retries=retries, prefect=prefect) as ex:
        return execute(job, ex, max_shards=max_shards)


def check_model(root: str, model_hash: str, model_name: str) -> None:
    """Refuse a dataset root made with another model, before any work starts."""
    from facecorpus.datasets.store import read_schema

    if not exists(join(root, "schema.json")):
        return
    stored = read_schema(root).attrs.get("model_hash")
    if stored and stored != model_hash:
        raise ConfigError(f"{root} was made with another model (model_hash {stored[:12]} != "
                          f"{model_hash[:12]} of '{model_name}'): use a new --out, or the "
                          "model it was made with")


def run_job(job: ShardJob, cfg, *, prefect: bool, max_shards: int | None = None) -> dict:
    """Run ``job`` with the runner fields of its config (``configs.base.RunnerFields``):
    without Prefect in this process (or on ``dask_address``), or as Prefect tasks on
    ``task_runner`` (inside a flow body)."""
    if prefect:
        kind, retries = cfg.task_runner, cfg.retries
    else:
        kind, retries = ("dask" if cfg.dask_address else "local"), 0
    return execute_with(job, kind=kind, workers=cfg.workers, dask_address=cfg.dask_address,
                        retries=retries, prefect=prefect, max_shards=max_shards)
