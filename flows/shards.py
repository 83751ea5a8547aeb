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
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facecorpus.core import hashing
from facecorpus.core.errors import RejectedRow

log = logging.getLogger("facecorpus.shards")

STATS_DIR = "_stats"


# --------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class StageKey:
    """What one stage's output for one shard depends on, in one readable record.

    ``parts`` maps a name (``config``, ``model``, ``inputs``, ``landmark_backend``,
    ``prior``, ``code`` ...) to a JSON-able value or a digest of it; the key is the digest
    of all of them. Changing any part changes the key; nothing else does.
    """

    stage: str
    parts: dict

    @property
    def key(self) -> str:
        return hashing.digest(self.stage, self.parts, n=40)

    def changed(self, old_parts: dict | None) -> list[str]:
        """Names of the parts that differ from an older record (all when unknown)."""
        if not old_parts:
            return ["new"]
        names = sorted(set(self.parts) | set(old_parts))
        return [n for n in names if hashing.stable_json(self.parts.get(n))
                != hashing.stable_json(old_parts.get(n))] or ["none"]


def stage_key(stage: str, code_version: int, **parts) -> StageKey:
    """A :class:`StageKey` that always covers the code: the package version, the stage's own
    code version and a digest of the source of every package that makes the bytes (so an
    edited stage never reuses shards made by the old code)."""
    return StageKey(stage, {"code": {"package": hashing.package_version(),
                                     "stage": int(code_version),
                                     "source": hashing.source_digest()}, **parts})


def part_digests(parts: dict) -> dict:
    """A short digest per key part (``inputs`` may be a dict of per-input digests)."""
    out = {}
    for k, v in parts.items():
        out[k] = ({u: hashing.digest(d, n=12) for u, d in v.items()} if isinstance(v, dict)
                  and k == "inputs" else hashing.digest(v, n=12))
    return out


def why_runs(spec: ShardSpec, committed_key: str | None, old_stats: dict | None) -> str:
    """Why a shard must run: "new", "" (it need not), or which key parts changed since the
    commit (inputs: how many were added, removed, changed), from the stats of that commit."""
    if committed_key is None:
        return "new"
    if committed_key == spec.key:
        return ""
    old = ((old_stats or {}).get("extra") or {}).get("key_parts")
    if not old:
        return "key changed"
    out = []
    for k in sorted(set(spec.explain) | set(old)):
        a, b = old.get(k), spec.explain.get(k)
        if a == b:
            continue
        if k == "inputs" and isinstance(a, dict) and isinstance(b, dict):
            add = len(set(b) - set(a))
            rem = len(set(a) - set(b))
            chg = sum(a[u] != b[u] for u in set(a) & set(b))
            out.append(f"inputs (+{add} -{rem} ~{chg})")
        else:
            out.append(k)
    return "changed: " + ", ".join(out) if out else "key changed"


def made_by(model_hash: str) -> dict:
    """Provenance of a commit (``verify`` reports datasets whose shards disagree on it)."""
    return {"package": hashing.package_version(), "model": model_hash[:16],
            "code": hashing.source_digest()}


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

    @property
    def out(self) -> str:
        raise NotImplementedError

    def threads_per_shard(self) -> int | None:
        return None


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


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def put_bytes(path: str, data: bytes) -> None:
    """Write a file of a run folder whole: temp + rename locally, one PUT on object stores."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "wb") as fh:
            fh.write(data)
    else:
        from facecorpus.core import atomic

        atomic.write_bytes(path, data)


def get_bytes(path: str) -> bytes | None:
    """A run-folder file's bytes, or None when it does not exist."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_sheet(path: str, rows: list, **kw) -> str:
    """A PNG contact sheet (:func:`facecorpus.sheets.contact_sheet`) at a local path or an
    fsspec URL (drawn locally, then put whole)."""
    import tempfile

    from facecorpus.sheets import contact_sheet

    if not is_url(path):
        return str(contact_sheet(rows, path, **kw))
    with tempfile.TemporaryDirectory() as d:
        tmp = contact_sheet(rows, os.path.join(d, "sheet.png"), **kw)
        put_bytes(path, Path(tmp).read_bytes())
    return path


def exists(path: str) -> bool:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- executors
class Executor:
    """Runs ``fn(*args)`` for every args tuple; yields results as they complete.

    ``retries``: a failed call is run again up to this many times (transient failures: I/O,
    a lost worker); a call that still fails raises, failing the run with its message —
    per-sample failures never get here, they are rejected rows inside the shard.
    """

    name = "executor"

    def __init__(self, retries: int = 0):
        self.retries = retries

    def map(self, fn: Callable, calls: list[tuple], label: str = "") -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _retrying(fn: Callable, retries: int, args: tuple):
    for attempt in range(retries + 1):
        try:
            return fn(*args)
        except Exception as e:  # infrastructure (I/O, storage): try again, then give up
            if attempt == retries:
                raise
            log.warning("%s failed (%s: %s); retry %d/%d", getattr(fn, "__name__", fn),
                        type(e).__name__, e, attempt + 1, retries)
            time.sleep(min(2.0 ** attempt, 10.0))
    raise AssertionError("unreachable")


class LocalExecutor(Executor):
    """In this process, one call after another (tests, benchmarks, debugging)."""

    name = "local"

    def map(self, fn, calls, label=""):
        for args in calls:
            yield _retrying(fn, self.retries, args)


class ThreadExecutor(Executor):
    """A thread pool in this process (the stages release the GIL in numba/torch)."""

    name = "threads"

    def __init__(self, workers: int, retries: int = 0):
        super().__init__(retries)
        self.workers = workers

    def map(self, fn, calls, label=""):
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futs = [pool.submit(_retrying, fn, self.retries, args) for args in calls]
            for f in as_completed(futs):
                yield f.result()


class DaskExecutor(Executor):
    """A Dask cluster: an existing scheduler (``address``) or a LocalCluster of
    single-threaded worker processes. Dask reschedules the tasks of a worker that dies."""

    name = "dask"

    def __init__(self, workers: int, address: str | None = None, retries: int = 0):
        super().__init__(retries)
        self.workers, self.address = workers, address
        self._client = self._cluster = None

    def client(self):
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.address:
                self._client = Client(self.address, timeout="60s")
            else:
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                             processes=True, dashboard_address=None)
                self._client = Client(self._cluster)
        return self._client

    def map(self, fn, calls, label=""):
        from distributed import as_completed

        c = self.client()
        futs = [c.submit(fn, *args, pure=False, retries=self.retries,
                         key=f"{label or 'shard'}-{i}-{os.urandom(4).hex()}")
                for i, args in enumerate(calls)]
        for f in as_completed(futs):
            yield f.result()

    def close(self):
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None


class PrefectExecutor(Executor):
    """Each call a Prefect task run, submitted to a Prefect task runner (threads or Dask)
    entered here, so the run's settings come from the job's config and not from how the flow
    object was built (a served deployment keeps ``--dask-address``, workers, retries)."""

    name = "prefect"

    def __init__(self, task_runner, retries: int = 0):
        super().__init__(retries)
        self.task_runner = task_runner
        self._entered = False

    def map(self, fn, calls, label=""):
        from prefect import task
        from prefect.cache_policies import NO_CACHE
        from prefect.futures import as_completed

        if not self._entered:
            self.task_runner.__enter__()
            self._entered = True
        t = task(fn, name=label or fn.__name__, cache_policy=NO_CACHE, retries=self.retries,
                 retry_delay_seconds=1)
        names = list(_param_names(fn))
        futs = []
        for args in calls:
            tt = t.with_options(task_run_name=f"{label}-{_short(args)}") if label else t
            futs.append(self.task_runner.submit(tt, dict(zip(names, args, strict=True))))
        for f in as_completed(futs):
            yield f.result()

    def close(self):
        if self._entered:
            self.task_runner.__exit__(None, None, None)
            self._entered = False


def _param_names(fn):
    import inspect

    return inspect.signature(fn).parameters


def _short(args: tuple) -> str:
    for a in args:
        if isinstance(a, ShardSpec):
            return str(a.id)
        if isinstance(a, int):
            return str(a)
    return ""


def make_executor(kind: str, workers: int, dask_address: str | None = None, *,
                  retries: int = 0, prefect: bool = False) -> Executor:
    """``kind``: ``local`` | ``threads`` | ``dask``; ``prefect``: each shard a Prefect task
    on the matching Prefect task runner."""
    if dask_address:
        kind = "dask"
    if prefect:
        from facecorpus.flows import runtime

        return PrefectExecutor(runtime.make_task_runner(
            "threads" if kind == "local" else kind, workers, dask_address), retries)
    if kind == "dask":
        return DaskExecutor(workers, dask_address, retries)
    if kind == "threads" and workers > 1:
        return ThreadExecutor(workers, retries)
    return LocalExecutor(retries)


# --------------------------------------------------------------------------- running
class Progress:
    """A log line per finished shard with counts, rate and ETA; a tqdm bar on a TTY."""

    def __init__(self, phase: str, total: int, unit: str = "inputs"):
        self.phase, self.total, self.done, self.unit = phase, total, 0, unit
        self.items = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=phase, unit="shard")

    def update(self, r: dict) -> None:
        self.done += 1
        self.items += int(r.get("inputs", 0))
        dt = max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) * dt / max(self.done, 1)
        if self.bar is not None:
            self.bar.update(1)
        log.info("%s: shard %s done (%d/%d; accepted %s, rejected %s%s); %.2f %s/s; ETA %.0f s",
                 self.phase, r.get("shard"), self.done, self.total, r.get("accepted"),
                 r.get("rejected"), f"; {r['why']}" if r.get("why") else "",
                 self.items / dt, self.unit, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def map_with_progress(ex: Executor, fn: Callable, calls: list[tuple], phase: str) -> list[dict]:
    prog = Progress(phase, len(calls))
    results = []
    try:
        for r in ex.map(fn, calls, phase):
            prog.update(r)
            results.append(r)
    finally:
        prog.close()
    return results


def execute(job: ShardJob, ex: Executor, *, max_shards: int | None = None) -> dict:
    """Plan, skip what is committed with the same key, prepare, run the rest, summarize.
    Wall and driver CPU seconds of each phase go to ``job.phase_seconds`` (the summary)."""
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
