"""Shared fixtures. Prefect state goes to a temp dir; one Prefect test server per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Must be set before prefect is imported anywhere.
_PREFECT_HOME = tempfile.mkdtemp(prefix="facecorpus-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("FACECORPUS_CACHE", str(Path(tempfile.gettempdir()) / "facecorpus-test-cache"))

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The shared assets folder: $FACECORPUS_ASSETS, else ../shared beside the repo."""
    env = os.environ.get("FACECORPUS_ASSETS")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared() -> Path:
    d = shared_dir()
    if d is None:
        pytest.skip("shared assets absent: set FACECORPUS_ASSETS or provide ../shared")
    return d


@pytest.fixture(scope="session")
def ict_archive(shared) -> Path:
    p = shared / "models" / "ict-facekit" / "ICT-FaceKit-FaceXModel.tar.xz"
    if not p.is_file():
        pytest.skip(f"ICT-FaceKit archive absent at {p}")
    return p


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def turned_heads_unwrap():
    """Two procedural-model faces (yaw up to 50 degrees, ambient light, a known 64^2 texture)
    unwrapped at their true fit: (model, synthetic batch, unwrap, mirror map, layout)."""
    import numpy as np
    from facecorpus.meshops.procedural import procedural_model
    from facecorpus.meshops.uv import rasterize_uv, uv_mirror_map
    from facecorpus.tasks.fit import synthetic_batch
    from facecorpus.tasks.masks import erode
    from facecorpus.tasks.unwrap import unwrap_batch

    S = 64
    model = procedural_model(n=41)
    amb = np.zeros(27, np.float32)
    amb[0::9] = 2 / np.sqrt(np.pi)
    sb = synthetic_batch(model, 2, 128, seed=6, sh=amb, yaw_max=50, texture_size=S)
    u = unwrap_batch(sb.image, model, sb.truth, S, np.stack([erode(m, 1) for m in sb.mask]))
    return (model, sb, u, uv_mirror_map(model, S),
            rasterize_uv(model.uv, model.uv_triangles, S).mask)


@pytest.fixture(scope="module")
def model():
    """The procedural test model most unit tests share (41 x 41 grid); one per test module,
    as before, so a module cannot see another's changes. Modules needing another model
    define their own ``model``."""
    from facecorpus.meshops.procedural import procedural_model

    return procedural_model(n=41)
