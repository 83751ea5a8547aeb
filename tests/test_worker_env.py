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
