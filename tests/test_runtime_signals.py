"""A run's own Prefect server does not outlive the run when a scheduler sends SIGTERM.

``flows.runtime.prefect_api_for_workers`` starts one temporary Prefect server per run (for
the Dask worker processes). SIGTERM's default action kills the driver at once and left that
server subprocess running, holding its port, after every cancelled or pre-empted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlparse

SCRIPT = textwrap.dedent("""
    import os, time
    from prefect import flow
    from facecorpus.flows.runtime import prefect_api_for_workers

    @flow
    def sleeper():
        print("READY", flush=True)
        time.sleep(120)

    with prefect_api_for_workers(True):
        print("URL", os.environ["PREFECT_API_URL"], flush=True)
        sleeper()
""")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_runs_prefect_server(tmp_path):
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    port, lines = None, []
    try:
        deadline = time.time() + 180
        for line in p.stdout:
            lines.append(line)
            if line.startswith("URL "):
                port = urlparse(line.split()[1]).port
            if line.startswith("READY") or time.time() > deadline:
                break
        assert port and _listening(port), "".join(lines)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 15
        while _listening(port) and time.time() < deadline:
            time.sleep(0.5)
        assert not _listening(port), "the run's Prefect server outlived SIGTERM"
    finally:
        if p.poll() is None:
            p.kill()
