"""Real landmarks from mediapipe's legacy FaceMesh solution (bundled models, offline).

Needs mediapipe >=0.10,<0.10.22 (the ``landmarks`` extra pins 0.10.21); later wheels have
no solutions and no model files, and these tests skip.
"""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from facecorpus.core.errors import SampleRejected
from facecorpus.tasks.landmarks import (
    MULTIPIE_MIRROR,
    FaceMeshLandmarker,
    LandmarkDetector,
    align_face,
    find_mediapipe_model,
    mediapipe_solutions_dir,
)

pytestmark = pytest.mark.skipif(
    mediapipe_solutions_dir() is None or find_mediapipe_model() is not None,
    reason="needs mediapipe >=0.10,<0.10.22 (legacy FaceMesh solution with its bundled "
           "models: the `landmarks` extra) and no Tasks .task bundle configured")

# the astronaut's face (skimage.data.astronaut, 512 x 512): x0, y0, x1, y1 pixels, measured
# from the photo (brow top to chin, cheek to cheek)
ASTRONAUT_FACE = (170.0, 60.0, 282.0, 190.0)


@pytest.fixture(scope="module")
def detector():
    with LandmarkDetector(None) as det:
        yield det


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut

    return astronaut()


def eye_centres(points):
    return points[36:42].mean(0), points[42:48].mean(0)


def test_backend_is_facemesh(detector):
    assert detector.backend == "mediapipe"
    assert isinstance(detector._mp, FaceMeshLandmarker)


def test_astronaut_68_points_in_the_face(detector, astronaut):
    lm = detector.detect(astronaut, "astronaut.png")
    assert lm.source == "mediapipe"
    assert lm.points.shape == (68, 2) and lm.dense.shape == (478, 2)
    x0, y0, x1, y1 = ASTRONAUT_FACE
    inner = lm.points[27:68]  # nose, eyes, mouth
    assert ((inner[:, 0] > x0) & (inner[:, 0] < x1)
            & (inner[:, 1] > y0) & (inner[:, 1] < y1)).all(), inner
    right, left = eye_centres(lm.points)
    # subject's right eye on the image left; eyes level (frontal, upright photo)
    assert right[0] < left[0] and abs(right[1] - left[1]) < 6
    iod = float(np.hypot(*(left - right)))
    assert 0.3 < iod / (x1 - x0) < 0.5, iod
    # vertical order: brows < eyes < nose tip < mouth < chin
    ys = [lm.points[17:27, 1].mean(), right[1], lm.points[30, 1], lm.points[48:68, 1].mean(),
          lm.points[8, 1]]
    assert ys == sorted(ys), ys
    # the jaw runs cheek -> chin -> cheek on the face contour, outside the inner features
    assert lm.points[:8, 0].max() < lm.points[8, 0] < lm.points[9:17, 0].min()
    assert lm.points[0, 0] < inner[:, 0].min() and lm.points[16, 0] > inner[:, 0].max()
    a = align_face(astronaut, lm, 256)
    assert (a.landmarks > 0).all() and (a.landmarks < 256).all()


def test_table_is_mirror_consistent(detector, astronaut):
    # detecting on the mirrored photo and mirroring back (x -> W - x, Multi-PIE index ->
    # its mirror) must give the same points: any left/right pair of MP478_TO_68 that is not a
    # mirror pair of the mediapipe mesh shows up here (neighbouring vertices are >= 0.1 IOD
    # apart; mediapipe's own flip asymmetry is ~0.04 IOD)
    a = detector.detect(astronaut).points
    b = detector.detect(np.ascontiguousarray(astronaut[:, ::-1])).points[MULTIPIE_MIRROR]
    b[:, 0] = astronaut.shape[1] - b[:, 0]
    iod = float(np.hypot(*np.subtract(*eye_centres(a))))
    err = np.linalg.norm(a - b, axis=1) / iod
    assert err.max() < 0.08, (err.argmax(), err.max())


@pytest.mark.parametrize("kind", ["coffee", "flat"])
def test_no_face_is_rejected(detector, kind):
    if kind == "coffee":
        from skimage.data import coffee

        img = coffee()
    else:
        img = np.full((240, 320, 3), 128, np.uint8)
    with pytest.raises(SampleRejected, match="no face") as ei:
        detector.detect(img, f"{kind}.png")
    assert ei.value.stage == "landmarks" and ei.value.source_uri == f"{kind}.png"


@pytest.mark.parametrize("big_first", [True, False])
def test_largest_of_two_faces(detector, astronaut, big_first):
    from skimage.transform import rescale

    head = astronaut[:300, 100:350]  # (300, 250, 3) around the face
    small = (rescale(head, 0.6, channel_axis=-1, anti_aliasing=True) * 255).astype(np.uint8)
    canvas = np.full((300, 250 + 20 + small.shape[1], 3), 255, np.uint8)
    bx, sx = (0, 270) if big_first else (small.shape[1] + 20, 0)
    canvas[:, bx:bx + 250] = head
    canvas[60:60 + small.shape[0], sx:sx + small.shape[1]] = small
    boxes = detector._mp.face_boxes(canvas)
    assert len(boxes) == 2, boxes  # both faces are there to choose from
    lm = detector.detect(canvas)
    ref = detector.detect(astronaut).points + [bx - 100, 0]
    iod = float(np.hypot(*np.subtract(*eye_centres(ref))))
    assert np.linalg.norm(lm.points - ref, axis=1).max() < 0.1 * iod
    # detect_all: both faces, largest first, the small one where it was pasted
    faces = detector.detect_all(canvas)
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].points, lm.points, atol=1e-3)
    cx = faces[1].points[:, 0].mean()
    assert sx < cx < sx + small.shape[1], (cx, sx)


def _detect_in_child(blob: bytes) -> np.ndarray:
    from skimage.data import astronaut

    return pickle.loads(blob).detect(astronaut()).points


@pytest.mark.slow
def test_pickles_to_a_worker_process(detector, astronaut):
    # the graphs are built lazily where detect runs: a used detector pickles without them
    here = detector.detect(astronaut).points
    blob = pickle.dumps(detector)
    assert len(blob) < 100_000
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, like a Dask worker
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        there = pool.submit(_detect_in_child, blob).result(timeout=120)
    np.testing.assert_allclose(there, here, atol=1e-3)
    # close releases the graphs; a later detect rebuilds them
    detector.close()
    assert detector._mp._graphs is None
    np.testing.assert_allclose(detector.detect(astronaut).points, here, atol=1e-3)


def test_mediapipe_import_defers_matplotlib_and_keeps_the_helpers():
    """tasks.landmarks.import_mediapipe (#12): a fresh process that builds the face and
    hand graphs never imports matplotlib; the deferred drawing helpers still work (and only
    then import it), and are the modules sys.modules names."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from facecorpus.tasks.landmarks import import_mediapipe\n"
        "from facecorpus.tasks.occlusion import OcclusionSegmenter\n"
        "mp = import_mediapipe()\n"
        "from facecorpus.tasks.landmarks import FaceMeshLandmarker\n"
        "FaceMeshLandmarker().graphs(); OcclusionSegmenter().graphs()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "du = mp.solutions.drawing_utils\n"
        "spec = du.DrawingSpec(color=(1, 2, 3))\n"
        "assert spec.color == (1, 2, 3) and 'matplotlib.pyplot' in sys.modules\n"
        "assert mp.solutions.drawing_styles.get_default_hand_landmarks_style()\n"
        "name = 'mediapipe.python.solutions.drawing_utils'\n"
        "assert sys.modules[name] is mp.solutions.drawing_utils\n"
        "assert callable(mp.solutions.drawing_utils.draw_landmarks)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
