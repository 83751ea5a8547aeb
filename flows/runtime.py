"""Where flows run: the Prefect task runner and the Prefect API its worker processes reach.

Shared by every flow so that a cluster-wide fix (say, to how Dask workers find Prefect)
lands once.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


def make_task_runner(kind: str, workers: int, dask_address: str | None = None):
    """``"threads"``: a thread pool in this process; ``"dask"``: an existing scheduler at
    ``dask_address``, else a LocalCluster of ``workers`` single-threaded processes (the
    stages are numba/torch code that releases the GIL poorly, and one thread per process
    keeps BLAS/numba from oversubscribing the cores)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    from facecorpus.flows.executors import local_worker_env

    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "env": local_worker_env()})


@contextmanager
def prefect_api_for_workers(needed: bool = True):
    """Make sure every process of a run reports to one Prefect API.

    Without ``PREFECT_API_URL`` Prefect starts an ephemeral server per *process*: each Dask
    worker process would start its own (slow, and it times out on a busy machine). When
    ``needed`` (a local process-based cluster) and no API is configured, one server is
    started here for the run and its URL exported in the environment, which the cluster's
    worker processes inherit. It lives only for this run, so run logs go to the console,
    not to its database. A remote cluster (``--dask-address``) must be given a real
    ``PREFECT_API_URL``: its workers do not inherit this process's environment.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    if not needed or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=180)
    env = {"PREFECT_API_URL": server.api_url, "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    prev_term = _exit_on_sigterm()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url,
                                 PREFECT_LOGGING_TO_API_ENABLED: False}):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
        server.stop()


def _exit_on_sigterm():
    """SIGTERM (a scheduler cancelling or pre-empting the run) raises SystemExit so the
    ``finally`` that stops the run's server runs; with the default action the process dies
    at once and the server subprocess is left running. Prefect's flow engine reports the
    crash and then hands the signal on to the handler it found, this one. Returns the
    previous handler (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise)
    return prev


def deployment(flow, entrypoint: str, name: str, cron: str, parameters: dict):
    """A Prefect deployment of ``flow`` on a cron schedule whose runs import the flow by
    ``entrypoint`` (``module:attribute``) and get every setting from ``parameters``.

    Prefect tells a module-path entrypoint from a file path by the absence of ``:``: a
    ``module:attribute`` entrypoint makes a served run look for flow code in storage (path
    ``None``) and crash, so it is stored dotted, ``module.attribute``, which runs import."""
    from prefect.deployments.runner import EntrypointType

    dep = flow.to_deployment(name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
                             parameters=parameters)
    dep.entrypoint = entrypoint.replace(":", ".")
    return dep


def check_remote_api(dask_address: str | None) -> None:
    """Prefect tasks on an existing cluster report to ``PREFECT_API_URL``: without one each
    remote worker would start a server of its own that nobody sees, so say so before work."""
    if not dask_address:
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        from facecorpus.core.errors import ConfigError

        raise ConfigError(f"--dask-address {dask_address} with Prefect needs PREFECT_API_URL "
                          "(a Prefect server the driver and the workers reach); or run with "
                          "--no-prefect")


def make_flow(fn, name: str):
    """A Prefect flow around a flow body whose first parameter is the config as JSON."""
    from prefect import flow

    return flow(fn, name=name, validate_parameters=False, log_prints=False)


def run_flow(fn, name: str, cfg, *args):
    """Call the flow ``fn`` (body) through Prefect with ``cfg`` and ``args``; a local Prefect
    API is started for Dask worker processes when no server is configured."""
    check_remote_api(cfg.dask_address)
    with prefect_api_for_workers(cfg.task_runner == "dask" and not cfg.dask_address):
        return make_flow(fn, name)(cfg.model_dump_json(), *args)
