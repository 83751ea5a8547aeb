"""Both flows on real processes: an existing Dask cluster (``dask scheduler`` + ``dask worker``
subprocesses on 127.0.0.1), a real Prefect server (``prefect server start``), and a served
cron deployment triggered through the API.

Every run goes through the CLI in a subprocess and is compared byte for byte with a local
``--no-prefect`` run of the same command; one run loses a worker to SIGKILL mid-shard and
still completes, verifies and writes the same bytes (Dask reschedules its task).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PG_SMALL = {"model": "procedural", "output.samples_per_shard": 3, "unwrap.uv_size": 64,
            "fit.photometric_iters": 3, "fit.rounds": 2, "fit.iters_per_round": 30,
            "prior.pca_rank": 0, "workers": 2, "retries": 0, "landmarks.crop_size": 224}

SY_SMALL = """\
kind: synthesis
model: procedural
seed: 11
workers: 2
subjects: {source: random, n_random: 10, n_groups: 2, texture_size: 32}
augment: {n_faces: 12, group_ratios: {g0: 0.5, g1: 0.5}}
poses: {yaw_step: 10.0}
output: {image_size: 64, uv_size: 32, faces_per_shard: 2}
"""


# --------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Subprocesses, each in its own process group, killed (group and all) at ``close``."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log_file, p.name = log, name
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen, sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)

    def tail(self, name: str, n: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_bytes()[-n:].decode(errors="replace")

    def close(self) -> None:
        for p in reversed(self.procs):
            self.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            self.kill(p)  # the group: a nanny's worker, the server's children
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            p.log_file.close()


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None,
             procs: Procs | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.returncode}) while waiting "
                                 f"for {what}:\n{procs.tail(proc.name) if procs else ''}")
        with contextlib.suppress(Exception):
            v = check()
            if v:
                return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Prefect server and a Dask scheduler with two single-threaded workers, as real
    processes on 127.0.0.1. Yields a dict with the env every CLI run gets and the addresses."""
    import httpx

    base = tmp_path_factory.mktemp("cluster")
    procs = Procs(base)
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(base / "prefect-home"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_LOGGING_TO_API_ENABLED": "false",
                "PYTHONUNBUFFERED": "1"})
    env.pop("PREFECT_API_URL", None)
    try:
        pport, dport = free_port(), free_port()
        api = f"http://127.0.0.1:{pport}/api"
        server = procs.start("prefect-server", [
            sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(pport), "--no-ui", "--analytics-off"], env)
        env["PREFECT_API_URL"] = api
        address = f"tcp://127.0.0.1:{dport}"
        sched = procs.start("dask-scheduler", [
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", str(dport), "--no-dashboard"], env)
        workers = [procs.start(f"dask-worker-{i}", worker_cmd(address, f"w{i}"), env)
                   for i in range(2)]
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180,
                 "the Prefect server", server, procs)
        from distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
        assert sched.poll() is None
        yield {"env": env, "api": api, "address": address, "procs": procs,
               "workers": workers, "base": base}
    finally:
        procs.close()


def worker_cmd(address: str, name: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
            "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--memory-limit", "0"]


# --------------------------------------------------------------------------- runs
def cli(env: dict, *args, timeout: float = 600, check: bool = True):
    p = subprocess.run([sys.executable, "-m", "facecorpus.cli", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={v}"]
    return out


def tree_digest(out: Path, roots: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under the dataset roots (run-specific files live outside them)."""
    res = {}
    for r in roots:
        for p in sorted((out / r).rglob("*")):
            if p.is_file():
                res[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert res, f"no dataset under {out}"
    return res


def verify(env: dict, root: Path) -> None:
    p = cli(env, "data", "verify", root, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def local_env(cluster) -> dict:
    env = dict(cluster["env"])
    env.pop("PREFECT_API_URL")
    return env


# --------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def pg_inputs(tmp_path_factory):
    """Four procedural faces (two shards of 3 and 1) with landmarks in a Parquet listing."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.tasks.fit import synthetic_batch
    from PIL import Image

    folder = tmp_path_factory.mktemp("pg-in")
    sb = synthetic_batch(procedural_model(n=41), 4, 200, seed=7, yaw_max=40, fill=0.6)
    imgs = (np.clip(sb.image, 0, 1) * 255 + 0.5).astype(np.uint8)
    rows = []
    for i, (im, lm) in enumerate(zip(imgs, sb.landmarks, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        (folder / f"face{i}.png").write_bytes(buf.getvalue())
        rows.append({"source_uri": f"face{i}.png", "landmarks": lm.reshape(-1).tolist()})
    listing = folder / "inputs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listing)
    return listing


@pytest.fixture(scope="module")
def pg_reference(cluster, pg_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pg-ref")
    cli(local_env(cluster), "run", "pseudo-gt", "--input", pg_inputs, "--out", out,
        "--no-prefect", *sets({**PG_SMALL, "task_runner": "threads"}))
    return tree_digest(out, ("dataset",))


@pytest.fixture(scope="module")
def sy_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sy-cfg") / "small.yaml"
    p.write_text(SY_SMALL)
    return p


@pytest.fixture(scope="module")
def sy_reference(cluster, sy_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("sy-ref")
    cli(local_env(cluster), "run", "synthesis", "--config", sy_config, "--out", out,
        "--no-prefect", "--set", "workers=1")
    return tree_digest(out, ("views", "faces"))


def scheduler_transitions(cluster) -> int:
    from distributed import Client

    with Client(cluster["address"], timeout="60s") as c:
        return c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def flow_runs(cluster, flow_name: str) -> list:
    """Flow runs of ``flow_name`` recorded by the cluster's Prefect server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))

    with temporary_settings({PREFECT_API_URL: cluster["api"]}):
        return asyncio.run(read())


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------- tests
def test_pseudo_gt_on_the_cluster_without_and_with_prefect(cluster, pg_inputs, pg_reference,
                                                           tmp_path):
    known = {r.id for r in flow_runs(cluster, "pseudo-gt")}
    for mode in ("no-prefect", "prefect"):
        out = tmp_path / mode
        extra = ["--no-prefect"] if mode == "no-prefect" else []
        before = scheduler_transitions(cluster)
        cli(cluster["env"], "run", "pseudo-gt", "--input", pg_inputs, "--out", out,
            "--dask-address", cluster["address"], *extra, *sets(PG_SMALL))
        assert scheduler_transitions(cluster) > before, f"{mode}: the cluster ran nothing"
        s = summary(out)
        assert s["shards_committed"] == 2 and s["accepted"] == 4, s
        verify(cluster["env"], out / "dataset")
        assert tree_digest(out, ("dataset",)) == pg_reference, f"{mode}: other bytes"
    runs = [r for r in flow_runs(cluster, "pseudo-gt") if r.id not in known]
    assert [r.state_name for r in runs] == ["Completed"], runs  # the Prefect run, on the server


def test_synthesis_on_prefect_and_dask_survives_a_killed_worker(cluster, sy_config,
                                                                sy_reference, tmp_path):
    """A third worker joins, takes shards, and is SIGKILLed (nanny and all) while it runs
    one: the run completes on the others and writes the reference bytes."""
    from distributed import Client

    procs, address = cluster["procs"], cluster["address"]
    victim = procs.start("dask-worker-victim", worker_cmd(address, "victim"), cluster["env"])
    out = tmp_path / "killed"
    with Client(address, timeout="60s") as c:
        c.wait_for_workers(3, timeout=120)
        vaddr = wait_for(lambda: next(a for a, w in c.scheduler_info()["workers"].items()
                                      if w["name"] == "victim"), 30, "the victim's address")
        run = procs.start("synthesis-run", [
            sys.executable, "-m", "facecorpus.cli", "run", "synthesis", "--config",
            str(sy_config), "--out", str(out), "--dask-address", address, "--set", "retries=0"],
            cluster["env"])
        def victim_mid_shard_after_a_commit():
            # the keys the victim is executing right now, once a shard is committed
            if not any((out / "views" / "manifest").glob("*.parquet")):
                return None
            running = c.run(lambda dask_worker: sorted(ts.key for ts in
                                                       dask_worker.state.executing),
                            workers=[vaddr])[vaddr]
            return running or None

        lost = wait_for(victim_mid_shard_after_a_commit, 300,
                        "a commit and the victim running a shard", run, procs, every=0.02)
        procs.kill(victim)
        victim.wait(10)
        run.wait(600)
        assert run.returncode == 0, procs.tail("synthesis-run", 8000)
        assert vaddr not in c.scheduler_info()["workers"]
        story = c.run_on_scheduler(lambda dask_scheduler, keys=lost:
                                   [t[1:3] for t in dask_scheduler.story(*keys)])
    # the victim's shard was interrupted (processing -> released) and then done elsewhere
    assert ("processing", "memory") in story and any(
        a == "processing" and b not in ("memory", "erred") for a, b in story), story
    assert "Completed" in [r.state_name for r in flow_runs(cluster, "synthesis")]
    s = summary(out)
    assert s["shards_committed"] == 6 and s["shards_run"] == 6, s
    for r in ("views", "faces"):
        verify(cluster["env"], out / r)
    assert tree_digest(out, ("views", "faces")) == sy_reference


def test_synthesis_on_the_cluster_without_prefect(cluster, sy_config, sy_reference, tmp_path):
    out = tmp_path / "dask"
    before = scheduler_transitions(cluster)
    cli(cluster["env"], "run", "synthesis", "--config", sy_config, "--out", out,
        "--dask-address", cluster["address"], "--no-prefect")
    assert scheduler_transitions(cluster) > before, "the cluster ran nothing"
    for r in ("views", "faces"):
        verify(cluster["env"], out / r)
    assert tree_digest(out, ("views", "faces")) == sy_reference


def test_served_cron_deployment_keeps_every_runner_setting(cluster, pg_inputs, tmp_path):
    """``--serve-cron`` against the real server; a run triggered through the API runs on the
    Dask cluster (its scheduler counts the tasks) and stops after ``--max-shards 1``."""
    import asyncio

    from distributed import Client
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    procs, env, out = cluster["procs"], cluster["env"], tmp_path / "served"
    serve = procs.start("serve", [
        sys.executable, "-m", "facecorpus.cli", "run", "pseudo-gt", "--input", str(pg_inputs),
        "--out", str(out), "--serve-cron", "0 3 * * *", "--dask-address", cluster["address"],
        "--workers", "1", "--max-shards", "1", *sets(PG_SMALL)], env)
    try:
        with temporary_settings({PREFECT_API_URL: cluster["api"]}):
            async def deployment():
                async with get_client() as client:
                    return await client.read_deployment_by_name("pseudo-gt/pseudo-gt")

            dep = wait_for(lambda: asyncio.run(deployment()), 120, "the deployment", serve,
                           procs)
            assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
            with Client(cluster["address"], timeout="60s") as c:
                before = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
                fr = run_deployment("pseudo-gt/pseudo-gt", timeout=300, poll_interval=1)
                ran = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        assert fr.state is not None and fr.state.is_completed(), (fr.state, procs.tail("serve"))
    finally:
        procs.kill(serve)
    assert ran > before, "the scheduled run did not use the Dask cluster"
    s = summary(out)
    assert s["shards_run"] == 1 and s["shards_committed"] == 1 and s["shards"] == 2, s
    verify(env, out / "dataset")
