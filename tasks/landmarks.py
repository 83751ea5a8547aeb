"""Landmarks: 68 Multi-PIE points per photo, then a square crop aligned on them.

Sources, in order of preference (the one used is recorded as ``landmark_source``):

1. ``manifest`` — 68 points given with the input (``InputRecord.landmarks``): no detection.
2. ``mediapipe_tasks`` — the mediapipe Tasks ``FaceLandmarker`` (478 points), used only when
   a ``face_landmarker.task`` bundle is supplied (``landmarks.mediapipe_model``,
   ``FACECORPUS_MEDIAPIPE_MODEL``, ... see :func:`find_mediapipe_model`): no mediapipe wheel
   ships one.
3. ``mediapipe`` — mediapipe's legacy FaceMesh solution (478 points with
   ``refine_landmarks``) behind its full-range face detector (:class:`FaceMeshLandmarker`).
   Used automatically when ``mediapipe.solutions.face_mesh`` and its bundled ``.tflite``
   models are installed (:func:`mediapipe_solutions_dir`): mediapipe >=0.10,<0.10.22 (the
   ``landmarks`` extra pins 0.10.21; later wheels dropped the solutions and their models).
   Runs offline.
4. ``box_template`` — fallback that needs no learned landmark model: scikit-image's bundled
   LBP frontal-face cascade finds the face box and the model's own frontal 68-point
   template is placed in it. Coarse (frontal by construction: yaw/pitch come only from the
   photometric refinement), so it is flagged in the manifest and can be disabled
   (``fallback: none``) to reject instead.

``LandmarkDetector.detect`` keeps the largest face; ``LandmarkDetector.detect_all`` returns
every face of at least ``min_face_px`` (largest first), for photos of several people. Both
mediapipe backends map 478 points to 68 with :data:`MP478_TO_68`. "No face" and degenerate
landmarks (not 68 finite points, or a landmark box narrower than a few pixels) raise
:class:`facecorpus.core.errors.SampleRejected` (stage ``landmarks``): a rejection reason,
never an exception out of a batch.

The 478 → 68 table (:data:`MP478_TO_68`), checked by drawing it on real photos (frontal and
smiling) and against the 300-W mean shape: jaw 0-16 are face-oval vertices
(``FACEMESH_FACE_OVAL``) from the subject's right cheek at eye level (234) through the chin
(152) to the left cheek (454), chosen so that their arc-length spacing matches Multi-PIE's
(within 2.5 % of the contour); brows are the upper brow contours; nose bridge 168-197-5-4,
base 60-20-2-250-290 (nostril wings' lower edges, not the alar creases 98/327 which sit
~1.7x wider than Multi-PIE's 31/35); eyes the six-point eyelid contours (corners 33/133,
362/263); mouth the outer (61 ... 291, 49/53 = 39/269 between corner and bow peak) and inner
(78 ... 308) lip contours. Every left/right pair in the table is a mirror pair of the
mediapipe canonical mesh (the tests check it by detecting on a mirrored photo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facecorpus.core.errors import SampleRejected

log = logging.getLogger(__name__)

# fmt: off
MP478_TO_68 = np.array([
    # jaw 0-16 (face oval, subject's right -> chin -> subject's left)
    234, 93, 132, 58, 172, 150, 149, 148, 152, 377, 378, 379, 397, 288, 361, 323, 454,
    # brows 17-21 (subject's right, outer -> inner), 22-26 (left, inner -> outer)
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30, base 31-35
    168, 197, 5, 4, 60, 20, 2, 250, 290,
    # right eye 36-41 (outer corner, upper x2, inner corner, lower x2), left eye 42-47
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    # outer lips 48-59, inner lips 60-67
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
], dtype=np.int32)
# mediapipe FACEMESH_FACE_OVAL as one ordered loop (forehead centre, clockwise in the image)
MP_FACE_OVAL = np.array([
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
], dtype=np.int32)
# fmt: on
# Multi-PIE mirror of every 68-point index (used to check tables and to flip annotations)
MULTIPIE_MIRROR = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65],
    dtype=np.int32)


@dataclass
class FaceLandmarks:
    """Landmarks of one face in *original image* pixels.

    ``points``: (68, 2) float32 (x, y), Multi-PIE order. ``box``: (4,) x0, y0, x1, y1.
    ``dense``: (478, 2) mediapipe points or None. ``source``: manifest|mediapipe_tasks|
    mediapipe|box_template.
    """

    points: np.ndarray
    box: np.ndarray
    source: str
    dense: np.ndarray | None = None


@dataclass
class AlignedFace:
    """A square crop. ``image`` (S, S, 3) uint8; ``landmarks`` (68, 2) crop pixels;
    ``affine`` (2, 3) maps original-image (x, y, 1) to crop (x, y); ``mask`` (S, S) bool or
    None (a given mask warped with the image); ``dense`` (478, 2) mediapipe's points in crop
    pixels (the same affine) or None (given 68-point landmarks). The face oval is derived
    from ``landmarks`` and the ``unwrap`` config where it is used (:func:`oval_for`).
    """

    image: np.ndarray
    landmarks: np.ndarray
    affine: np.ndarray
    source: str
    mask: np.ndarray | None = None
    dense: np.ndarray | None = None


# ------------------------------------------------------------------ mediapipe
def find_mediapipe_model(explicit: str | os.PathLike | None = None) -> Path | None:
    """The FaceLandmarker ``.task`` bundle: ``explicit``, ``$FACECORPUS_MEDIAPIPE_MODEL``,
    ``$FACECORPUS_ASSETS/models/mediapipe/face_landmarker.task``,
    ``$FACECORPUS_CACHE/mediapipe/face_landmarker.task``, or one inside the mediapipe
    package; None when there is none."""
    cands: list[Path] = []
    if explicit:
        cands.append(Path(explicit))
    for env, sub in (("FACECORPUS_MEDIAPIPE_MODEL", ""),
                     ("FACECORPUS_ASSETS", "models/mediapipe/face_landmarker.task"),
                     ("FACECORPUS_CACHE", "mediapipe/face_landmarker.task")):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / sub if sub else Path(os.environ[env]))
    for c in cands:
        if c.is_file():
            return c
    try:
        import importlib.util

        spec = importlib.util.find_spec("mediapipe")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        found = sorted(Path(spec.origin).parent.rglob("face_landmarker*.task"))
        if found:
            return found[0]
    return None


def mediapipe_solutions_dir() -> Path | None:
    """The installed mediapipe package folder when it has the legacy FaceMesh / FaceDetection
    solutions *and* their bundled models (mediapipe >=0.10,<0.10.22), else None.

    Checked on files, without importing mediapipe (cheap, and safe in any process)."""
    return mediapipe_dir_with(
        "python/solutions/face_mesh.py", "python/solutions/face_detection.py",
        "modules/face_landmark/face_landmark_front_cpu.binarypb",
        "modules/face_landmark/face_landmark_with_attention.tflite",
        "modules/face_detection/face_detection_short_range.tflite",
        "modules/face_detection/face_detection_full_range_sparse.tflite")


def mediapipe_dir_with(*files: str) -> Path | None:
    """The installed mediapipe package folder when every one of ``files`` (relative to it)
    exists, else None; checked on files, without importing mediapipe."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("mediapipe")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    root = Path(spec.origin).parent
    return root if all((root / n).is_file() for n in files) else None


def _box_area(p: np.ndarray) -> float:
    return float(np.prod(p.max(0) - p.min(0)))


def _largest(faces: list[np.ndarray]) -> np.ndarray:
    return max(faces, key=_box_area)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (4,) x0, y0, x1, y1 boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def distinct_faces(faces: list[FaceLandmarks], min_face_px: float = 0.0,
                   max_iou: float = 0.4) -> list[FaceLandmarks]:
    """Largest first, faces whose landmark box's longer side is below ``min_face_px`` dropped,
    and a face overlapping an already kept (larger) one by IoU > ``max_iou`` dropped (two
    detector boxes of one face can both yield a mesh of it)."""
    out: list[FaceLandmarks] = []
    for f in sorted(faces, key=lambda f: -_box_area(f.points)):
        if float(np.max(f.box[2:] - f.box[:2])) < min_face_px:
            continue
        if all(_box_iou(f.box, k.box) <= max_iou for k in out):
            out.append(f)
    return out


MIN_LANDMARK_EXTENT_PX = 4.0


def check_landmarks(points, source_uri: str = "",
                    min_extent_px: float = MIN_LANDMARK_EXTENT_PX) -> np.ndarray:
    """``points`` as (68, 2) float32, or SampleRejected(stage "landmarks") naming why not:
    wrong count, non-finite values, or a landmark box narrower than ``min_extent_px`` on
    either axis (all points equal, or collinear: no crop scale, no fit)."""
    try:
        g = np.asarray(points, np.float32)
    except (TypeError, ValueError) as e:
        raise SampleRejected(source_uri, "landmarks", f"landmarks are not numbers ({e})") \
            from None
    if g.size != 136:
        raise SampleRejected(source_uri, "landmarks",
                             f"landmarks have {g.size} values (shape {g.shape}), need 68 x 2")
    g = g.reshape(68, 2)
    if not np.isfinite(g).all():
        raise SampleRejected(source_uri, "landmarks",
                             f"landmarks are not finite ({int((~np.isfinite(g)).sum())} "
                             "NaN/inf values)")
    ext = g.max(0) - g.min(0)
    if not (ext >= min_extent_px).all():
        raise SampleRejected(source_uri, "landmarks",
                             f"degenerate landmarks: their box is {ext[0]:.3g} x {ext[1]:.3g} "
                             f"px (< {min_extent_px:g} px on an axis)")
    return g


def _dense_to_landmarks(dense: np.ndarray, source: str) -> FaceLandmarks:
    dense = dense.astype(np.float32)
    box = np.concatenate([dense.min(0), dense.max(0)])
    return FaceLandmarks(points=dense[MP478_TO_68], box=box, source=source, dense=dense)


#: mediapipe modules its package ``__init__`` imports that we never call: the drawing
#: helpers, which import ``matplotlib.pyplot`` for a 3-D plot (~0.4 s wall, ~0.6 CPU-s under
#: load, once per process: the CLI's driver and every Dask worker, #12)
_DEFERRED_MEDIAPIPE = ("mediapipe.python.solutions.drawing_utils",
                       "mediapipe.python.solutions.drawing_styles")


def import_mediapipe():
    """``import mediapipe`` with its drawing helpers deferred: each is registered as a
    stand-in module (:func:`_deferred_module`) that executes the real one (matplotlib and
    all) on its first attribute access, so ``mediapipe.solutions.drawing_utils.X`` still
    works for whoever uses it; the graphs and their outputs are mediapipe's own, untouched.
    (:class:`importlib.util.LazyLoader` does not do: on Python 3.11 the ``import`` statement
    of mediapipe's ``__init__`` reads the module's ``__spec__``, which loads it.) Returns the
    package."""
    import importlib.machinery
    import importlib.util
    import sys

    if "mediapipe" not in sys.modules:
        spec = importlib.util.find_spec("mediapipe")  # finds, does not import
        folder = [str(Path(spec.submodule_search_locations[0]) / "python" / "solutions")]
        for name in _DEFERRED_MEDIAPIPE:
            sub = importlib.machinery.PathFinder.find_spec(name, folder)
            if sub is not None and name not in sys.modules:
                sys.modules[name] = _deferred_module(sub)
        import mediapipe.python.solutions as solutions

        for name in _DEFERRED_MEDIAPIPE:  # a module found in sys.modules is not bound
            if name in sys.modules and not hasattr(solutions, name.rsplit(".", 1)[1]):
                setattr(solutions, name.rsplit(".", 1)[1], sys.modules[name])
    import mediapipe

    return mediapipe


def _deferred_module(spec):
    """A module object for ``spec`` whose first missing-attribute lookup (PEP 562
    ``__getattr__``) executes the real module, puts it in ``sys.modules`` and on its parent
    package in the stand-in's place, and answers from it."""
    import importlib.util
    import sys
    import types

    stand_in = types.ModuleType(spec.name)
    stand_in.__spec__, stand_in.__file__ = spec, spec.origin

    def load(attr):
        real = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = real
        try:
            spec.loader.exec_module(real)
        except BaseException:
            sys.modules[spec.name] = stand_in
            raise
        parent, _, leaf = spec.name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], leaf, real)
        stand_in.__dict__.update({k: v for k, v in real.__dict__.items()
                                  if k not in ("__getattr__", "__spec__")})
        return getattr(real, attr)

    stand_in.__getattr__ = load
    return stand_in


class LazyGraphs:
    """mediapipe graphs are costly to build and cannot be pickled: they are built on first
    use in the process that detects (a Dask worker, not the client that pickled the
    detector), dropped when pickled, and released by :meth:`close`. ``detect`` is serialised
    by a lock (a graph is not thread-safe)."""

    def __init__(self):
        self._graphs: tuple | None = None
        self._lock = threading.Lock()

    def _build(self) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def graphs(self) -> tuple:
        if self._graphs is None:
            self._graphs = self._build()
        return self._graphs

    def close(self) -> None:
        g, self._graphs = self._graphs, None
        for obj in g or ():
            obj.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        # at interpreter shutdown mediapipe's modules may already be torn down
        with contextlib.suppress(AttributeError, ImportError, RuntimeError, TypeError,
                                 ValueError):
            self.close()


class MediapipeLandmarker(LazyGraphs):
    """mediapipe Tasks FaceLandmarker (a user-supplied ``.task`` bundle) in IMAGE mode;
    returns the largest face."""

    source = "mediapipe_tasks"

    def __init__(self, model_path: str | os.PathLike, max_faces: int = 4,
                 min_confidence: float = 0.5):
        super().__init__()
        self.model_path, self.max_faces, self.min_confidence = (
            str(model_path), max_faces, min_confidence)

    def _build(self) -> tuple:
        import_mediapipe()
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=self.model_path),
            running_mode=vision.RunningMode.IMAGE, num_faces=self.max_faces,
            min_face_detection_confidence=self.min_confidence)
        return (vision.FaceLandmarker.create_from_options(opts),)

    def _faces(self, image: np.ndarray) -> list[np.ndarray]:
        import mediapipe as mp

        h, w = image.shape[:2]
        with self._lock:
            (lm,) = self.graphs()
            res = lm.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                     data=np.ascontiguousarray(image)))
        return [np.array([(p.x * w, p.y * h) for p in lms], np.float32)
                for lms in res.face_landmarks]

    def detect(self, image: np.ndarray) -> FaceLandmarks | None:
        """(H, W, 3) uint8 -> the largest face's landmarks, or None."""
        faces = self._faces(image)
        return _dense_to_landmarks(_largest(faces), self.source) if faces else None

    def detect_all(self, image: np.ndarray) -> list[FaceLandmarks]:
        """(H, W, 3) uint8 -> every face found (at most ``max_faces``), unordered."""
        return [_dense_to_landmarks(f, self.source) for f in self._faces(image)]


class FaceMeshLandmarker(LazyGraphs):
    """mediapipe's legacy FaceMesh solution (bundled models, 478 points) for the largest face.

    FaceMesh's own detector is the short-range one (faces filling much of the frame), so the
    faces are first found by the full-range ``FaceDetection`` on the whole image; the largest
    box is cut out as a square ``crop_scale`` times its side (resampled to at most
    ``work_size`` pixels: the mesh network sees 192 px anyway) and meshed there. If that box
    holds no mesh the next largest is tried; with no box at all, FaceMesh runs on the whole
    image (scaled to ``work_size``) as a last try.

    Args:
        min_confidence: detection score threshold of both graphs.
        crop_scale: crop side / detector box side.
        work_size: largest side given to FaceMesh.
    """

    source = "mediapipe"

    def __init__(self, min_confidence: float = 0.5, crop_scale: float = 2.0,
                 work_size: int = 512):
        super().__init__()
        self.min_confidence, self.crop_scale, self.work_size = (
            min_confidence, crop_scale, work_size)

    def _build(self) -> tuple:
        import_mediapipe()
        from mediapipe.python.solutions import face_detection, face_mesh

        det = face_detection.FaceDetection(model_selection=1,
                                           min_detection_confidence=self.min_confidence)
        mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=2,
                                  refine_landmarks=True,
                                  min_detection_confidence=self.min_confidence)
        return det, mesh

    def face_boxes(self, image: np.ndarray) -> np.ndarray:
        """Full-range detector boxes (N, 4) x0, y0, x1, y1 pixels, largest first."""
        h, w = image.shape[:2]
        with self._lock:
            det, _ = self.graphs()
            res = det.process(np.ascontiguousarray(image))
        boxes = []
        for d in res.detections or ():
            b = d.location_data.relative_bounding_box
            boxes.append([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w,
                          (b.ymin + b.height) * h])
        boxes = np.array(boxes, np.float32).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[np.argsort(-area, kind="stable")]

    def _mesh(self, image: np.ndarray, x0: float, y0: float, side: float) -> np.ndarray | None:
        """FaceMesh on the square [x0, x0+side) x [y0, y0+side) of ``image`` (zero outside);
        the face nearest the square's centre, (478, 2) in image pixels, or None."""
        import cv2

        h, w = image.shape[:2]
        # integer-pixel cut (padded with black where it leaves the image), then resample
        ix0, iy0, n = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(side))
        cut = np.zeros((n, n, 3), np.uint8)
        sx0, sy0 = max(ix0, 0), max(iy0, 0)
        sx1, sy1 = min(ix0 + n, w), min(iy0 + n, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return None
        cut[sy0 - iy0:sy1 - iy0, sx0 - ix0:sx1 - ix0] = image[sy0:sy1, sx0:sx1]
        out = min(n, self.work_size)
        k = out / n
        crop = cut if out == n else cv2.resize(cut, (out, out), interpolation=cv2.INTER_AREA)
        with self._lock:
            _, mesh = self.graphs()
            res = mesh.process(crop)
        faces = [np.array([(p.x * out, p.y * out) for p in f.landmark], np.float64)
                 for f in res.multi_face_landmarks or ()]
        if not faces:
            return None
        c = out / 2
        best = min(faces, key=lambda p: float(np.hypot(*(p.mean(0) - c))))
        # normalised coordinates are relative to the crop; crop pixel u <-> image u / k + x0
        return best / k + [ix0, iy0]

    def detect_all(self, image: np.ndarray, max_faces: int = 8) -> list[FaceLandmarks]:
        """(H, W, 3) uint8 -> a mesh for each of the (at most ``max_faces`` largest) detector
        boxes that holds one; unordered, possibly the same face twice (see
        :func:`distinct_faces`). With no box at all, FaceMesh on the whole image."""
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        boxes = self.face_boxes(image)
        out = []
        for x0, y0, x1, y1 in boxes[:max_faces]:
            side = self.crop_scale * float(max(x1 - x0, y1 - y0))
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            dense = self._mesh(image, cx - side / 2, cy - side / 2, side)
            if dense is not None:
                out.append(_dense_to_landmarks(dense, self.source))
        if len(boxes) == 0:
            h, w = image.shape[:2]
            side = float(max(h, w))
            dense = self._mesh(image, (w - side) / 2, (h - side) / 2, side)
            if dense is not None:
                out.append(_dense_to_landmarks(dense, self.source))
        return out

    def detect(self, image: np.ndarray) -> FaceLandmarks | None:
        """(H, W, 3) uint8 -> the largest face's landmarks, or None."""
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        boxes = self.face_boxes(image)
        for x0, y0, x1, y1 in boxes:
            side = self.crop_scale * float(max(x1 - x0, y1 - y0))
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            dense = self._mesh(image, cx - side / 2, cy - side / 2, side)
            if dense is not None:
                return _dense_to_landmarks(dense, self.source)
        if len(boxes):
            return None
        h, w = image.shape[:2]
        side = float(max(h, w))
        dense = self._mesh(image, (w - side) / 2, (h - side) / 2, side)
        return None if dense is None else _dense_to_landmarks(dense, self.source)


# ------------------------------------------------------------ box + template
_CASCADE = None


def detect_face_box(image: np.ndarray, work_size: int = 400) -> np.ndarray | None:
    """Largest frontal face box (4,) x0, y0, x1, y1 in pixels, or None.

    scikit-image's LBP cascade on a copy scaled to ``work_size`` on its long side;
    overlapping hits are merged and the box with the most support wins (ties: larger).
    """
    boxes = detect_face_boxes(image, work_size, max_faces=1)
    return boxes[0] if len(boxes) else None


def detect_face_boxes(image: np.ndarray, work_size: int = 400, max_faces: int = 8,
                      min_support: int = 1) -> np.ndarray:
    """Frontal face boxes (F, 4) x0, y0, x1, y1 pixels, most supported first.

    Like :func:`detect_face_box`, repeated: the best-supported group of overlapping cascade
    hits is merged into one box, its hits removed, and the next group taken, up to
    ``max_faces`` groups of at least ``min_support`` hits."""
    global _CASCADE
    import skimage.data
    import skimage.feature
    from skimage.color import rgb2gray
    from skimage.transform import rescale

    if _CASCADE is None:
        _CASCADE = skimage.feature.Cascade(skimage.data.lbp_frontal_face_cascade_filename())
    s = min(1.0, work_size / max(image.shape[:2]))
    g = rgb2gray(image)
    if s < 1:
        g = rescale(g, s, anti_aliasing=True)
    lo = max(20, int(0.08 * min(g.shape)))
    dets = _CASCADE.detect_multi_scale(g, scale_factor=1.1, step_ratio=1, min_size=(lo, lo),
                                       max_size=(min(g.shape), min(g.shape)))
    if not dets:
        return np.zeros((0, 4), np.float32)
    boxes = np.array([[d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]]
                      for d in dets], np.float32) / s
    # support = number of boxes overlapping (IoU > 0.3); the face collects many hits
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / (area[:, None] + area[None, :] - inter)
    left = np.ones(len(boxes), bool)
    out = []
    while left.any() and len(out) < max_faces:
        near = (iou > 0.3) & left[None, :] & left[:, None]
        support = near.sum(1)
        best = int(np.lexsort((area, support))[-1])
        if support[best] < min_support:
            break
        out.append(boxes[near[best]].mean(0))
        left &= ~near[best]
    return np.array(out, np.float32).reshape(-1, 4)


def landmark_template(model) -> np.ndarray:
    """The model's frontal 68 landmarks (68, 2), image axes (y down), bbox = unit square."""
    p = model.vertices[model.landmarks][:, :2].astype(np.float64) * np.array([1.0, -1.0])
    p = (p - p.min(0)) / (p.max(0) - p.min(0))
    return p.astype(np.float32)


# Where the landmarks' bounding box lies inside an LBP-cascade face box (fractions of the
# box): OpenCV-style frontal boxes span about brow-to-chin and cheek-to-cheek.
_TEMPLATE_IN_BOX = (0.08, 0.20, 0.92, 1.06)  # x0, y0, x1, y1


def template_in_box(template: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Place a unit-box template (68, 2) into a face box (4,); returns (68, 2) pixels."""
    bx0, by0, bx1, by1 = box
    fx0, fy0, fx1, fy1 = _TEMPLATE_IN_BOX
    w, h = bx1 - bx0, by1 - by0
    x = bx0 + (fx0 + template[:, 0] * (fx1 - fx0)) * w
    y = by0 + (fy0 + template[:, 1] * (fy1 - fy0)) * h
    return np.stack([x, y], -1).astype(np.float32)


# ------------------------------------------------------------------ detection
class LandmarkDetector:
    """Pick the landmark source per image (see the module docstring for the order).

    Args:
        template: (68, 2) unit-box template for the fallback (see :func:`landmark_template`).
        mediapipe_model: path of a Tasks ``.task`` bundle, or None to look one up (none
            found: the FaceMesh solution when installed).
        fallback: "box_template" or "none" (used only when no mediapipe backend exists).

    The mediapipe graphs are built lazily by the first ``detect`` in the process that runs
    it, so a detector can be pickled to Dask workers; :meth:`close` releases them.
    """

    def __init__(self, template: np.ndarray | None = None, mediapipe_model=None,
                 fallback: str = "box_template"):
        self.template = template
        self.fallback = fallback
        if mediapipe_model and not Path(mediapipe_model).is_file():
            from facecorpus.core.errors import ConfigError

            raise ConfigError(f"landmarks.mediapipe_model {mediapipe_model}: no such file")
        path = find_mediapipe_model(mediapipe_model)
        self._mp: MediapipeLandmarker | FaceMeshLandmarker | None = None
        if path is not None:
            self._mp = MediapipeLandmarker(path)
        elif mediapipe_solutions_dir() is not None:
            self._mp = FaceMeshLandmarker()
        elif fallback == "box_template":
            log.warning("no mediapipe landmark model (mediapipe >=0.10,<0.10.22 with its "
                        "bundled FaceMesh, or a face_landmarker.task): landmarks fall back to "
                        "a face box + template (coarse)")
        self.backend = self._mp.source if self._mp else fallback

    def close(self) -> None:
        """Release the mediapipe graphs (a later ``detect`` rebuilds them)."""
        if self._mp is not None:
            self._mp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def detect(self, image: np.ndarray, source_uri: str = "",
               given: np.ndarray | None = None) -> FaceLandmarks:
        """68 landmarks for one (H, W, 3) uint8 image (the largest face); raises
        SampleRejected("no face ...") or, for unusable ``given`` points, SampleRejected
        naming the defect (:func:`check_landmarks`)."""
        if given is not None:
            g = check_landmarks(given, source_uri)
            return FaceLandmarks(g, np.concatenate([g.min(0), g.max(0)]), "manifest")
        if self._mp is not None:
            found = self._mp.detect(image)
            if found is None:
                raise SampleRejected(source_uri, "landmarks",
                                     f"no face found ({self._mp.source})")
            return found
        self._check_fallback(source_uri)
        box = detect_face_box(image)
        if box is None:
            raise SampleRejected(source_uri, "landmarks", "no face found (LBP cascade)")
        return FaceLandmarks(template_in_box(self.template, box), box, "box_template")

    def _check_fallback(self, source_uri: str) -> None:
        if self.fallback != "box_template" or self.template is None:
            raise SampleRejected(source_uri, "landmarks",
                                 "no landmark model available (mediapipe missing) and "
                                 "fallback disabled")

    def detect_all(self, image: np.ndarray, source_uri: str = "",
                   given: np.ndarray | None = None, *, min_face_px: float = 40.0,
                   max_faces: int = 8) -> list[FaceLandmarks]:
        """Every usable face of one (H, W, 3) uint8 image, largest first (by landmark-box
        area): faces whose landmark box's longer side is under ``min_face_px`` pixels are
        dropped (too few pixels for a UV texture), duplicates of one face merged, at most
        ``max_faces`` kept. ``given`` landmarks are the one face, and so is the
        ``box_template`` fallback's best face (see the comment below). Raises SampleRejected
        when no usable face remains (the reason says whether faces were found but too
        small)."""
        if given is not None:
            return [self.detect(image, source_uri, given)]
        if self._mp is not None:
            if isinstance(self._mp, FaceMeshLandmarker):
                found = self._mp.detect_all(image, max_faces=max_faces)
            else:
                found = self._mp.detect_all(image)
        else:
            # The LBP cascade cannot vouch for a second face: measured on two portraits side
            # by side, the second face and a false hit (on the seam, by the flag) each had one
            # supporting detection. The fallback reports the best-supported face only.
            return [self.detect(image, source_uri)]
        faces = distinct_faces(found, min_face_px)[:max_faces]
        if not faces:
            small = f", {len(found)} smaller than {min_face_px:g} px" if found else ""
            raise SampleRejected(source_uri, "landmarks",
                                 f"no face found ({self._mp.source}{small})")
        return faces


# ------------------------------------------------------------------ alignment
def crop_affine(landmarks: np.ndarray, size: int, scale: float = 1.55,
                shift_up: float = 0.08) -> np.ndarray:
    """Similarity (2, 3) mapping image pixels to a ``size`` square crop around the
    landmarks: side = ``scale`` * the larger landmark-box side, centre raised by
    ``shift_up`` * box height to keep the forehead. No rotation (roll stays in the data).

    Degenerate landmarks raise SampleRejected (see :func:`check_landmarks`), not a
    ZeroDivisionError."""
    check_landmarks(landmarks)
    lo, hi = landmarks.min(0), landmarks.max(0)
    side = scale * float(max(hi - lo))
    cx, cy = (lo + hi) / 2
    cy -= shift_up * float(hi[1] - lo[1])
    k = size / side
    return np.array([[k, 0.0, size / 2 - k * cx], [0.0, k, size / 2 - k * cy]], np.float64)


def warp_image(image: np.ndarray, affine: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """Warp (H, W[, C]) with pixel-centre-correct affine (2, 3) into (size, size[, C])."""
    import cv2

    # cv2 maps pixel indices; our convention puts centres at +0.5: conjugate the transform
    a = affine.copy()
    a[:, 2] += a[:, 0] * 0.5 + a[:, 1] * 0.5 - 0.5
    interp = cv2.INTER_AREA if order == 1 and affine[0, 0] < 0.7 else (
        cv2.INTER_LINEAR if order == 1 else cv2.INTER_NEAREST)
    if interp == cv2.INTER_AREA:  # warpAffine has no area filter: prefilter by resizing
        scale = float(np.hypot(affine[0, 0], affine[0, 1]))
        h, w = image.shape[:2]
        nw, nh = max(1, round(w * scale * 1.0)), max(1, round(h * scale * 1.0))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = nw / w, nh / h
        a = affine @ np.array([[1 / sx, 0, 0], [0, 1 / sy, 0], [0, 0, 1]])
        a[:, 2] += a[:, 0] * 0.5 + a[:, 1] * 0.5 - 0.5
        return cv2.warpAffine(small, a, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT)
    return cv2.warpAffine(image, a, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT)


def face_oval(points: np.ndarray, *, forehead: float = 0.25, hull: bool = False,
              margin: float = 0.0) -> np.ndarray:
    """The landmark face region (K, 2) of 68 points (68, 2), in their pixels.

    ``hull=False``: jaw 0-16, then the brows lifted by ``forehead`` x the brow-to-chin height
    (the forehead the landmarks do not cover). At large yaw the far-side jaw points of
    3D-style landmarks project inside the face and this polygon folds into a sliver.
    ``hull=True``: the convex hull of all 68 points and the lifted brows, which cannot fold,
    grown outward from the landmarks' centroid by ``margin`` x the same height (the model's
    face region reaches past the jaw line and the brows; the margin is what lets it in).
    """
    pts = np.asarray(points, np.float64)
    h = float(pts[8, 1] - pts[17:27, 1].mean())
    brows = pts[26:16:-1].copy()
    brows[:, 1] -= forehead * h
    if not hull:
        return np.concatenate([pts[:17], brows]).astype(np.float32)
    from scipy.spatial import ConvexHull, QhullError

    allp = np.concatenate([pts, brows])
    try:
        ring = allp[ConvexHull(allp).vertices]
    except (QhullError, ValueError):  # degenerate (collinear) landmarks: no usable oval
        return np.zeros((0, 2), np.float32)
    d = ring - pts.mean(0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    return (ring + d * margin * abs(h)).astype(np.float32)


def oval_for(points: np.ndarray, unwrap_cfg) -> np.ndarray | None:
    """The oval (K, 2) the ``unwrap`` config asks for, or None (``oval: none``)."""
    mode = unwrap_cfg.oval
    if mode == "none":
        return None
    return face_oval(points, forehead=unwrap_cfg.oval_forehead, hull=mode == "hull",
                     margin=unwrap_cfg.oval_margin)


def align_face(image: np.ndarray, lm: FaceLandmarks, size: int,
               mask: np.ndarray | None = None, source_uri: str = "") -> AlignedFace:
    """Crop (H, W, 3) around ``lm`` into (size, size, 3); landmarks and mask follow.
    Degenerate ``lm.points`` raise SampleRejected(``source_uri``, "landmarks", reason)."""
    check_landmarks(lm.points, source_uri)
    A = crop_affine(lm.points, size)
    crop = warp_image(image, A, size)
    pts = lm.points @ A[:, :2].T + A[:, 2]
    m = None
    if mask is not None:
        m = warp_image(mask.astype(np.uint8) * 255, A, size, order=0) > 127
    dense = None if lm.dense is None else (lm.dense @ A[:, :2].T + A[:, 2]).astype(np.float32)
    return AlignedFace(image=crop, landmarks=pts.astype(np.float32), affine=A.astype(np.float32),
                       source=lm.source, mask=m, dense=dense)
