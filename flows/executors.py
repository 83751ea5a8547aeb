"""One runner for local / threads / Dask / Prefect: :class:`Executor` s with retries, and
the progress line (rate, ETA) every flow prints."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("facecorpus.shards")


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


# One compute thread per worker process, set before the process imports numba/torch/OpenCV.
# LocalCluster workers are single-threaded processes, one per core; left alone, each would
# start a numba prange pool, a torch intra-op pool and an OpenCV pool of one thread per core,
# and on the 2-core VM those threads spin against the other worker's (high system time).
# Dask already sets the OMP/MKL/OpenBLAS ones (distributed.nanny.pre-spawn-environ), not these.
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "OPENBLAS_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1"}


def local_worker_env() -> dict[str, str]:
    """The environment of LocalCluster worker processes (:data:`WORKER_ENV`), and Dask's
    default ``MALLOC_TRIM_THRESHOLD_=65536`` dropped from its nanny pre-spawn environment.

    Why: setting that glibc knob also switches off malloc's dynamic mmap threshold, so every
    allocation over 128 KiB (our per-image UV maps and tensors) becomes an mmap + page
    faults + munmap; measured on the finish phase: 5 extra system CPU-s per 8 photos
    (docs/benchmarks.md, #12). A value the user exported in the shell still wins.
    """
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    return dict(WORKER_ENV)


# OpenBLAS (numpy and scipy each bundle one; OpenCV's is single-threaded) starts a pool of
# one thread per core in every process. Between two BLAS calls its idle threads spin in
# sched_yield (OpenBLAS's own THREAD_TIMEOUT, no OMP_WAIT_POLICY), and the pseudo-GT stages
# make thousands of small calls (occlusion EM's Gram solves, the model's shape gemv, the
# skin cue's inverses): in a --no-prefect run that spinning was most of the system CPU
# (docs/benchmarks.md, #12). Dask's nanny already gives LocalCluster workers
# OPENBLAS_NUM_THREADS=1; this does the same at run time for runs computing in this process.
_OPENBLAS_API = (("openblas_set_num_threads", "openblas_get_num_threads"),
                 ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                 ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                 ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"))


def openblas_pools() -> list[tuple[Callable, Callable]]:
    """(set_num_threads, get_num_threads) of every OpenBLAS loaded in this process, after
    loading numpy's and scipy's; empty where none is found (another BLAS, not Linux)."""
    import ctypes

    import numpy  # noqa: F401  (their libraries must be loaded to be found)
    import scipy.linalg  # noqa: F401

    try:
        with open("/proc/self/maps") as fh:
            files = {ln.split()[-1] for ln in fh if len(ln.split()) >= 6}
    except OSError:
        return []
    paths = sorted(f for f in files if "openblas" in f.rsplit("/", 1)[-1].lower()
                   and ".so" in f.rsplit("/", 1)[-1])
    pools = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_API:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                set_fn, get_fn = getattr(lib, set_name), getattr(lib, get_name)
                set_fn.argtypes, set_fn.restype, get_fn.restype = [ctypes.c_int], None, ctypes.c_int
                pools.append((set_fn, get_fn))
                break
    return pools


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run the block with every loaded OpenBLAS limited to ``n`` threads (None: unchanged),
    then restore each library's previous count."""
    if not n:
        yield
        return
    pools = openblas_pools()
    old = [get() for _, get in pools]
    for set_fn, _ in pools:
        set_fn(n)
    try:
        yield
    finally:
        for (set_fn, _), k in zip(pools, old, strict=True):
            set_fn(k)


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
                                             processes=True, dashboard_address=None,
                                             env=local_worker_env())
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
    from facecorpus.flows.shards import ShardSpec  # shards imports this module

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
