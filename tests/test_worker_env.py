"""Dask LocalCluster workers run one compute thread each and glibc's default malloc
(flows.executors.local_worker_env): the settings reach a real worker process."""

from __future__ import annotations


def _seen():
    import os

    import cv2
    import numba

    return numba.get_num_threads(), cv2.getNumThreads(), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_cluster_workers_are_single_threaded(monkeypatch):
    from facecorpus.flows.executors import DaskExecutor

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    ex = DaskExecutor(workers=1)
    try:
        (seen,) = list(ex.map(_seen, [()]))
    finally:
        ex.close()
    # without local_worker_env: numba and OpenCV one thread per core, and Dask's 65536
    assert seen == (1, 1, None)


def test_blas_threads_limits_every_openblas_and_restores():
    import numpy as np
    import pytest

    from facecorpus.flows.executors import blas_threads, openblas_pools

    pools = openblas_pools()
    if not pools:
        pytest.skip("no OpenBLAS loaded (numpy/scipy built against another BLAS)")
    before = [get() for _, get in pools]
    a = np.random.default_rng(0).standard_normal((300, 300))
    with blas_threads(1):
        assert [get() for _, get in pools] == [1] * len(pools)
        inside = a @ a
    assert [get() for _, get in pools] == before
    np.testing.assert_allclose(inside, a @ a, rtol=1e-10, atol=1e-10)
    with blas_threads(None):  # None leaves the libraries alone
        assert [get() for _, get in pools] == before


def test_execute_runs_a_job_under_its_blas_threads(tmp_path):
    """A job computing in this process (--no-prefect, threads) runs with its BLAS thread
    count; the pseudo-GT job asks for one (its spinning pool was the system CPU, #12)."""
    import pytest

    from facecorpus.flows import shards
    from facecorpus.flows.executors import LocalExecutor, blas_threads, openblas_pools
    from facecorpus.flows.pseudo_gt import PseudoGTJob

    pools = openblas_pools()
    if not pools:
        pytest.skip("no OpenBLAS loaded (numpy/scipy built against another BLAS)")
    before = [get() for _, get in pools]

    class Job(shards.ShardJob):
        name, out, blas_threads = "probe", str(tmp_path), 1
        seen: list = []

        def plan(self):
            return []

        def is_done(self, spec):
            return False

        def prepare(self, todo, specs, ex):
            self.seen = [get() for _, get in pools]

        def summarize(self, specs, stats, *, skipped):
            return {"seen": self.seen}

    with blas_threads(2):  # pools of 2 (as on this 2-core VM) even on a 1-core machine
        two = [get() for _, get in pools]  # a single-threaded OpenBLAS build stays at 1
        if 2 not in two:
            pytest.skip("no OpenBLAS here runs more than one thread")
        assert shards.execute(Job(), LocalExecutor())["seen"] == [1] * len(pools)
        assert [get() for _, get in pools] == two
    assert [get() for _, get in pools] == before
    assert PseudoGTJob.blas_threads == 1
