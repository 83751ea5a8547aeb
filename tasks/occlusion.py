"""Occlusion segmentation without a learned face parser: image-space cues and a UV-space
statistical outlier segmentation against the corpus texture model.

Nothing here may be trained or downloaded (no face-parsing network is available offline), so
occluders are found by what is available:

Image space (:func:`image_occlusion`, per photo, on the aligned crop):

- **hands**: mediapipe's legacy ``Hands`` solution (palm detector + 21 hand landmarks, both
  ``.tflite`` models bundled in mediapipe 0.10.21's wheel under ``modules/palm_detection`` and
  ``modules/hand_landmark``): the convex hull of each hand's landmarks, grown by a fraction
  of the hand's size (the landmarks sit on the bones, the skin edge is further out);
- **background**: mediapipe's ``SelfieSegmentation`` (``modules/selfie_segmentation``,
  bundled): pixels of the projected face region that it calls background (a face cut off by
  the frame, the fitted mesh overhanging the real silhouette);
- **padding**: constant-colour areas connected to the image border (the black padding of a
  photo whose face is half outside the frame, letterboxing), grown by the resampling blur;
- **saturated**: clipped highlights and crushed blacks (no colour was recorded there).

The union, restricted to the face region, is ``occlusion_mask``; it is moved into UV through
the ``uv_sampling_map`` by :func:`image_mask_to_uv` (``uv_occlusion_mask``).

UV space (:func:`uv_outliers`): per texel, the two-class likelihood of the EM-style
occlusion-aware fitting of Egger et al. (IJCV 2018) and FOCUS (Li et al. 2023): the face
class is a Gaussian around the image's fit of the corpus texture model
(:class:`facecorpus.tasks.prior.TexturePrior`: per-channel gain and offset of the robust mean
plus PCA coefficients, fitted on the current inliers only), optionally divided by the fitted
SH irradiance (``uv_shading``), the occluder class a uniform density over the RGB cube. The
posterior's log-odds are smoothed spatially (a cheap MRF prior) and the fit, noise level,
class prior and posterior are iterated. Left-right consistency through the UV mirror map
adds texels whose colour disagrees with their mirror where the prior explains them worse.

**The prior that judges an image never contains it** (:func:`cross_fitted_outliers`): the
images are split into ``folds``; each fold is judged by a prior built from the other folds,
and a second round rebuilds those priors from the texels the first round kept (so the prior
is made of texels *other* images see unoccluded). Cross-fitting costs ``folds`` prior builds
per round instead of N for leave-one-out, and needs no prior from outside the batch; a
prior built from other shards (the run's stored corpus prior when this shard was not in it)
is just as unbiased and can be passed to :func:`uv_outliers` directly.

Shapes: H x W image pixels, N images, T x T UV texels, R PCA modes.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from facecorpus.configs.occlusion import OcclusionConfig
from facecorpus.tasks.landmarks import LazyGraphs, import_mediapipe

DEFAULT = OcclusionConfig()
BAND2_RIDGE = 1.0
OCCLUDER_KINDS = ("glasses", "hand", "hair", "padding")
#: files of the mediapipe wheel the hand and selfie cues need (relative to the package)
MEDIAPIPE_FILES = (
    "python/solutions/hands.py", "python/solutions/selfie_segmentation.py",
    "modules/hand_landmark/hand_landmark_tracking_cpu.binarypb",
    "modules/hand_landmark/hand_landmark_full.tflite",
    "modules/palm_detection/palm_detection_full.tflite",
    "modules/selfie_segmentation/selfie_segmentation_cpu.binarypb",
    "modules/selfie_segmentation/selfie_segmentation.tflite")


def mediapipe_occlusion_dir() -> Path | None:
    """The mediapipe package folder when it has the legacy Hands and SelfieSegmentation
    solutions with their bundled models (mediapipe >=0.10,<0.10.22), else None. Checked on
    files, without importing mediapipe."""
    from facecorpus.tasks.landmarks import mediapipe_dir_with

    return mediapipe_dir_with(*MEDIAPIPE_FILES)


# --------------------------------------------------------------------------- image space
@dataclass
class ImageOcclusion:
    """Occlusion cues of one (H, W) image, each (H, W) bool.

    ``hands``: hand regions (whole image); ``background``: face-region pixels the person
    segmentation calls background; ``padding``: constant border areas (whole image);
    ``saturated``: clipped pixels (whole image); ``occlusion_mask``: their union within the
    face region. ``skipped``: cue -> why it did not run (disabled, mediapipe absent).
    """

    occlusion_mask: np.ndarray
    hands: np.ndarray
    background: np.ndarray
    padding: np.ndarray
    saturated: np.ndarray
    face_region: np.ndarray
    skipped: dict = field(default_factory=dict)

    @property
    def occluded_fraction(self) -> float:
        """Share of the face region that is occluded (0 when the region is empty)."""
        n = int(self.face_region.sum())
        return float(self.occlusion_mask.sum() / n) if n else 0.0


class OcclusionSegmenter(LazyGraphs):
    """mediapipe Hands + SelfieSegmentation graphs, built on first use in the process that
    runs them, never pickled (dropped on pickling), one call at a time (lock).

    Args:
        hand_min_confidence: palm detection / hand presence threshold.
        max_hands: hands looked for per image.
    """

    def __init__(self, hand_min_confidence: float = 0.5, max_hands: int = 4):
        super().__init__()
        self.hand_min_confidence, self.max_hands = hand_min_confidence, max_hands

    def _build(self) -> tuple:
        import_mediapipe()  # without matplotlib (tasks.landmarks)
        from mediapipe.python.solutions import hands, selfie_segmentation

        h = hands.Hands(static_image_mode=True, max_num_hands=self.max_hands,
                        model_complexity=1, min_detection_confidence=self.hand_min_confidence)
        # model 0 is the square (256 x 256) one: crops are square
        s = selfie_segmentation.SelfieSegmentation(model_selection=0)
        return h, s

    def hand_landmarks(self, image: np.ndarray) -> list[np.ndarray]:
        """(H, W, 3) uint8 -> one (21, 2) float32 pixel array (x, y) per hand found."""
        img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        H, W = img.shape[:2]
        with self._lock:
            hands, _ = self.graphs()
            res = hands.process(img)
        return [np.array([(p.x * W, p.y * H) for p in h.landmark], np.float32)
                for h in res.multi_hand_landmarks or ()]

    def person_probability(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) float32 probability that a pixel shows the person."""
        img = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        with self._lock:
            _, seg = self.graphs()
            res = seg.process(img)
        return np.asarray(res.segmentation_mask, np.float32).copy()


_SEGMENTER: OcclusionSegmenter | None = None
_SEGMENTER_LOCK = threading.Lock()


def segmenter(cfg: OcclusionConfig = DEFAULT) -> OcclusionSegmenter | None:
    """This process's segmenter (one per process, shared by its threads), or None without
    mediapipe's bundled Hands/SelfieSegmentation models."""
    global _SEGMENTER
    if mediapipe_occlusion_dir() is None:
        return None
    with _SEGMENTER_LOCK:
        if _SEGMENTER is None:
            _SEGMENTER = OcclusionSegmenter(cfg.hand_min_confidence)
        return _SEGMENTER


def hand_mask(hands: list[np.ndarray], shape: tuple[int, int], dilate: float = 0.12
              ) -> np.ndarray:
    """(H, W) bool: convex hull of each hand's (21, 2) pixel landmarks, grown by ``dilate``
    times the hand's size (longer side of its landmark box)."""
    import cv2

    out = np.zeros(shape, np.uint8)
    for pts in hands:
        one = np.zeros(shape, np.uint8)
        hull = cv2.convexHull(np.round(pts - 0.5).astype(np.int32))
        cv2.fillConvexPoly(one, hull, 1)
        r = round(dilate * float(np.max(pts.max(0) - pts.min(0))))
        if r > 0:
            one = cv2.dilate(one, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                            (2 * r + 1, 2 * r + 1)))
        out |= one
    return out.astype(bool)


def padding_mask(image: np.ndarray, tol: int = 2, min_px: int = 64, dilate_px: int = 2
                 ) -> np.ndarray:
    """(H, W) bool: constant-colour areas connected to the image border.

    A pixel is *flat* when every channel's range over its 3 x 3 window is <= ``tol``; flat
    connected components touching the border with at least ``min_px`` pixels are padding,
    grown by ``dilate_px`` (bilinear resampling blends the padding into the first photo
    pixels). Photographed surfaces are not flat to 2 levels over 3 x 3 pixels (sensor noise,
    JPEG), so a smooth wall is only caught where it is posterised or clipped.
    """
    from scipy import ndimage

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    img = img.reshape(img.shape[:2] + (-1,)).astype(np.int16)
    rng = (ndimage.maximum_filter(img, size=(3, 3, 1), mode="nearest")
           - ndimage.minimum_filter(img, size=(3, 3, 1), mode="nearest")).max(-1)
    flat = rng <= tol
    lab, n = ndimage.label(flat)
    if n == 0:
        return np.zeros(flat.shape, bool)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = np.zeros(n + 1, bool)
    keep[border] = True
    keep &= sizes >= min_px
    keep[0] = False
    out = keep[lab]
    if not out.any():
        return out
    # the padding's last pixel row is not flat (its window reaches the photo): add the
    # neighbours that have a kept component's colour
    colours = np.array([np.median(img[lab == k], 0) for k in np.flatnonzero(keep)])
    ring = ndimage.binary_dilation(out) & ~out
    near = (np.abs(img[ring][:, None, :] - colours[None]) <= tol).all(-1).any(-1)
    out[ring] = near
    if dilate_px > 0:
        out = ndimage.binary_dilation(out, iterations=dilate_px)
    return out


def saturated_mask(image: np.ndarray, high: int = 250, low: int = 4) -> np.ndarray:
    """(H, W) bool: every channel >= ``high`` (clipped highlight) or <= ``low`` (crushed)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (img >= high).all(-1) | (img <= low).all(-1)


def image_occlusion(image: np.ndarray, face_region: np.ndarray,
                    cfg: OcclusionConfig = DEFAULT, *,
                    segmenter_: OcclusionSegmenter | None = None) -> ImageOcclusion:
    """Image-space occlusion cues of one photo and their union.

    Args:
        image: (H, W, 3) uint8 (the aligned crop in the pseudo-GT flow).
        face_region: (H, W) bool, the projected face region of the fit (e.g. the sampling
            mask ``masks.face_mask``): the union is restricted to it, and the person
            segmentation only counts inside it.
        cfg: which cues run and their thresholds.
        segmenter_: mediapipe graphs to use (default: this process's :func:`segmenter`).

    Returns:
        :class:`ImageOcclusion`. Cues that need mediapipe are skipped (recorded in
        ``skipped``) when its bundled Hands/SelfieSegmentation models are not installed.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
        raise ValueError(f"image_occlusion: need (H, W, 3) uint8, got {img.shape} {img.dtype}")
    img = img[..., :3]
    region = np.asarray(face_region, bool)
    if region.shape != img.shape[:2]:
        raise ValueError(f"face_region {region.shape} != image {img.shape[:2]}")
    shape = img.shape[:2]
    none = np.zeros(shape, bool)
    skipped: dict[str, str] = {}
    hands = background = padding = saturated = none
    if not cfg.enabled:
        skipped = dict.fromkeys(("hands", "background", "padding", "saturated"), "disabled")
        return ImageOcclusion(none.copy(), none, none, none, none, region, skipped)
    seg = segmenter_
    if seg is None and (cfg.hands or cfg.person):
        seg = segmenter(cfg)
    for cue, on in (("hands", cfg.hands), ("background", cfg.person)):
        if not on:
            skipped[cue] = "disabled"
        elif seg is None:
            skipped[cue] = ("mediapipe with bundled Hands/SelfieSegmentation models "
                            "(>=0.10,<0.10.22) not installed")
    if "hands" not in skipped:
        hands = hand_mask(seg.hand_landmarks(img), shape, cfg.hand_dilate)
    if "background" not in skipped:
        background = (seg.person_probability(img) < cfg.person_threshold) & region
    if cfg.padding:
        padding = padding_mask(img, cfg.padding_tol, cfg.padding_min_px, cfg.padding_dilate_px)
    else:
        skipped["padding"] = "disabled"
    if cfg.saturation:
        saturated = saturated_mask(img, cfg.saturated_high, cfg.saturated_low)
    else:
        skipped["saturated"] = "disabled"
    union = (hands | background | padding | saturated) & region
    return ImageOcclusion(union, hands, background, padding, saturated, region, skipped)


def image_mask_to_uv(mask: np.ndarray, uv_sampling_map: np.ndarray) -> np.ndarray:
    """Move an image-space mask into UV: ``uv_occlusion_mask``.

    A texel is set when any of the (up to four) pixels its bilinear sample reads is set (its
    ``uv_visible`` colour mixes them). Texels outside the image or the layout (sampling map
    -2) are never set.

    Args:
        mask: (H, W) or (N, H, W) bool.
        uv_sampling_map: (T, T, 2) or (N, T, T, 2) ``grid_sample`` coordinates
            (align_corners=False; see ``renderers/uv_space.py``).

    Returns:
        (T, T) or (N, T, T) bool.
    """
    from facecorpus.renderers.interpolate import sample_bilinear

    m = np.asarray(mask, bool)
    smap = np.asarray(uv_sampling_map, np.float32)
    single = m.ndim == 2
    if single:
        m, smap = m[None], smap[None]
    if smap.ndim != 4 or len(smap) != len(m):
        raise ValueError(f"image_mask_to_uv: {m.shape} masks and {smap.shape} sampling maps")
    H, W = m.shape[1:]
    inside = ((smap[..., 0] > -1) & (smap[..., 0] < 1) & (smap[..., 1] > -1)
              & (smap[..., 1] < 1))
    xy = np.stack([(smap[..., 0] + 1) * 0.5 * W, (smap[..., 1] + 1) * 0.5 * H], -1)
    v = sample_bilinear(m.astype(np.float32)[..., None], xy, inside)[..., 0]
    out = inside & (v > 1e-6)
    return out[0] if single else out


# --------------------------------------------------------------------------- UV space
def _design(mu: np.ndarray, basis: np.ndarray | None, normals: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-image texture model for n texels as a linear system, per channel.

    Unknowns: the mean's light per channel (a gain when ``normals`` is None, else 9 SH
    coefficients of each texel's camera-space normal: the light fitted jointly, as Egger et
    al. fit illumination on inliers), a per-channel offset, then R PCA modes shared by the
    channels. A channel's rows only touch its own light and offset, so the system is kept as
    per-channel blocks (6x fewer products than the dense (3n, P) matrix).

    Returns:
        X (3, n, Q) each channel's Q = G + 1 + R columns (contiguous per channel); idx (3, Q) their unknowns' indices
        among P = 3 G + 3 + R; x0 (P,) the neutral solution (unit light, no offset).
    """
    n = len(mu)
    if normals is None:
        shade, k0 = np.ones((n, 1)), 1.0
    else:
        from facecorpus.renderers.shading import sh_basis

        shade = sh_basis(normals).astype(np.float64)  # (n, 9)
        k0 = 1.0 / shade[0, 0]  # Y_0 is a constant: unit irradiance
    G = shade.shape[1]
    R = 0 if basis is None else len(basis)
    X = np.empty((3, n, G + 1 + R))
    X[:, :, :G] = mu.T[:, :, None] * shade[None]
    X[:, :, G] = 1.0
    if R:
        X[:, :, G + 1:] = np.moveaxis(np.asarray(basis, np.float64), (0, 2), (2, 0))
    idx = np.array([np.r_[c * G + np.arange(G), 3 * G + c, 3 * G + 3 + np.arange(R)]
                    for c in range(3)], np.int64)
    x0 = np.zeros(3 * G + 3 + R)
    x0[0:3 * G:G] = k0
    return X, idx, x0


def _smooth_logodds(logodds: np.ndarray, mask: np.ndarray, radius: int,
                    den: np.ndarray | None = None) -> np.ndarray:
    """Normalised box smoothing of (T, T) log-odds over the texels of ``mask``; ``den`` (T, T)
    the box-filtered mask (:func:`_smooth_den`), passed by callers that smooth many
    log-odds maps over one mask."""
    if radius <= 0:
        return logodds
    from scipy.ndimage import uniform_filter

    k = 2 * radius + 1
    num = uniform_filter(np.where(mask, logodds, 0.0), k, mode="constant")
    if den is None:
        den = _smooth_den(mask, radius)
    return np.where(mask, num / den, 0.0)


def _smooth_den(mask: np.ndarray, radius: int) -> np.ndarray:
    """(T, T) the normaliser of :func:`_smooth_logodds`: the box-filtered mask, floored."""
    from scipy.ndimage import uniform_filter

    den = uniform_filter(mask.astype(np.float64), 2 * radius + 1, mode="constant")
    return np.maximum(den, 1e-9)


@dataclass
class OutlierFit:
    """Per-image EM result: ``posterior`` (T, T) float32 face-class probability (1 off the
    visible texels), ``residual`` (T, T, 3) float32 colour minus the fitted model (0 off
    them), ``sigma`` (3,) face-class noise std."""

    posterior: np.ndarray
    residual: np.ndarray
    sigma: np.ndarray


def em_outliers_one(y: np.ndarray, mask: np.ndarray, prior, cfg: OcclusionConfig = DEFAULT,
                    ridge: float = 1.0, normals: np.ndarray | None = None) -> OutlierFit:
    """Two-class EM segmentation of one image's visible texels against ``prior``.

    Args:
        y: (T, T, 3) float colours (or albedo = colour / SH irradiance).
        mask: (T, T) bool texels to judge (visible, not already occluded).
        prior: TexturePrior (``mean`` (T, T, 3), optional ``basis`` (R, T, T, 3), ``std``).
        normals: (T, T, 3) unit camera-space normals of the fit, or None: with them the
            model's light is 9 SH coefficients per channel instead of a gain.

    Each iteration: ridge least squares of light/offset/PCA weighted by the face posterior;
    per-channel noise std (robust MAD in the first iteration, posterior-weighted after,
    floored at ``sigma_floor``); face log-likelihood vs the uniform occluder density; log-odds
    clipped to +-10 and smoothed over ``smooth_px``; class prior = mean posterior.
    """
    T = mask.shape[0]
    post = np.ones((T, T), np.float32)
    res = np.zeros((T, T, 3), np.float32)
    n = int(mask.sum())
    if n < 50:
        return OutlierFit(post, res, np.full(3, np.nan, np.float32))
    yy = y[mask].astype(np.float64)  # (n, 3)
    mu = prior.mean[mask].astype(np.float64)
    R = 0 if prior.basis is None else len(prior.basis)
    X, idx, x0 = _design(mu, None if R == 0 else prior.basis[:, mask],
                         None if normals is None else normals[mask])  # (3, n, Q)
    P = len(x0)
    std = np.ones(0) if R == 0 else np.maximum(np.asarray(prior.std, np.float64), 1e-6)
    reg = np.r_[np.full(P - R, 1e-3 * n), ridge / std ** 2 if R else np.zeros(0)]
    if normals is not None:
        # band-2 light can brighten one cheek and darken the other: on its own it would
        # explain a hand or a shadowing occluder as light. Held close to 0 (scaled like the
        # data term, n texels), band 0-1 (ambient + one direction) stay free.
        for c in range(3):
            reg[c * 9 + 4:c * 9 + 9] = BAND2_RIDGE * n
    w = np.ones(n)
    pi_face = 1.0 - cfg.occluder_prior
    log_occ = np.log(cfg.occluder_density)
    sigma = np.full(3, cfg.sigma_floor)
    den = _smooth_den(mask, cfg.smooth_px) if cfg.smooth_px > 0 else None  # same every iteration
    for it in range(cfg.em_iters):
        # regularisation scales with the inlier count, not the texel count
        scale = max(float(w.sum()), 1.0) / n
        AtA = np.diag(reg * scale)
        Atb = reg * scale * x0
        for c in range(3):
            Xw = X[c] * w[:, None]
            AtA[np.ix_(idx[c], idx[c])] += Xw.T @ X[c]
            Atb[idx[c]] += Xw.T @ yy[:, c]
        x = np.linalg.solve(AtA, Atb)
        r = yy - np.stack([X[c] @ x[idx[c]] for c in range(3)], 1)  # (n, 3)
        if it == 0:
            med = np.median(r, 0)
            sigma = 1.4826 * np.median(np.abs(r - med), 0)
        else:
            sigma = np.sqrt((w[:, None] * r ** 2).sum(0) / max(w.sum(), 1e-9))
        sigma = np.maximum(sigma, cfg.sigma_floor)
        log_face = (-0.5 * (r / sigma) ** 2 - np.log(sigma * np.sqrt(2 * np.pi))).sum(1)
        lo = np.log(pi_face) - np.log1p(-pi_face) + log_face - log_occ
        grid = np.zeros((T, T))
        grid[mask] = np.clip(lo, -10.0, 10.0)
        lo = _smooth_logodds(grid, mask, cfg.smooth_px, den)[mask]
        w = 1.0 / (1.0 + np.exp(-lo))
        pi_face = float(np.clip(w.mean(), 0.5, 0.99))
    post[mask] = w
    res[mask] = r
    return OutlierFit(post, res, sigma.astype(np.float32))


def mirror_inconsistent(y: np.ndarray, mask: np.ndarray, residual: np.ndarray,
                        mirror_map: np.ndarray, threshold: float = 0.15,
                        sigma: np.ndarray | None = None) -> np.ndarray:
    """(T, T) bool: texels whose colour disagrees with their mirror texel's and which the
    texture model explains worse than the mirror.

    Only pairs where both texels are in ``mask`` count. The colour of the mirror texel is
    first scaled by the image's per-channel median side-to-side ratio (light from one side
    brightens one half of the face); a pair differing by more than ``threshold`` (mean abs)
    flags the texel whose model residual is larger by at least half the threshold and, when
    ``sigma`` (3,) is given, above 2 sigma: natural asymmetry (a mole, a parting, asymmetric
    light) that the model explains on both sides is not an occluder.

    Args:
        y: (T, T, 3) colours; mask: (T, T) bool; residual: (T, T, 3) colour minus the model;
        mirror_map: (T, T, 2) int (row, col) of each texel's mirror, -1 where none.
    """
    T = mask.shape[0]
    mr, mc = mirror_map[..., 0], mirror_map[..., 1]
    has = (mr >= 0) & (mc >= 0)
    mr, mc = np.where(has, mr, 0), np.where(has, mc, 0)
    pair = has & mask & mask[mr, mc] & ~((mr == np.arange(T)[:, None]) & (mc == np.arange(T)))
    out = np.zeros((T, T), bool)
    if pair.sum() < 50:
        return out
    a = y[pair].astype(np.float64)
    m = y[mr[pair], mc[pair]].astype(np.float64)
    ratio = np.median(a / np.maximum(m, 1e-3), 0)
    d = np.abs(a - ratio * m).mean(1)
    ea = np.abs(residual[pair]).mean(1)
    em = np.abs(residual[mr[pair], mc[pair]]).mean(1)
    flag = (d > threshold) & (ea - em > 0.5 * threshold)
    if sigma is not None and np.isfinite(sigma).all():
        flag &= ea > 2.0 * float(np.mean(sigma))
    out[pair] = flag
    return out


def uv_outliers(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, prior,
                mirror_map: np.ndarray | None, cfg: OcclusionConfig = DEFAULT, *,
                uv_shading: np.ndarray | None = None, uv_normals: np.ndarray | None = None,
                uv_occlusion_mask: np.ndarray | None = None) -> np.ndarray:
    """Occluded texels of N images by the EM segmentation against ``prior`` plus
    left-right consistency.

    The caller guarantees ``prior`` was built without these images (a prior from other
    shards); :func:`cross_fitted_outliers` builds such priors from the batch itself.

    Args:
        uv_visible: (N, T, T, 3) float in [0, 1]; uv_visible_mask: (N, T, T) bool.
        prior: TexturePrior in the same space as the judged colours (albedo when
            ``uv_shading`` is given).
        mirror_map: (T, T, 2) int (``meshops.uv.uv_mirror_map``) or None (no mirror cue).
        uv_shading: (N, T, T, 3) SH irradiance of the fit per texel (:func:`uv_irradiance`)
            or None: colours are divided by it (the model is albedo x light).
        uv_normals: (N, T, T, 3) camera-space unit normals per texel (:func:`uv_normals`)
            or None: the light is fitted jointly (9 SH coefficients per channel, on
            inliers); the way to go when no SH light was fitted (stage 2 off). With
            ``uv_shading`` too, the light fitted is what is left after dividing by it.
        uv_occlusion_mask: (N, T, T) bool texels already known occluded (image cues):
            neither judged nor used for the fit.

    Returns:
        (N, T, T) bool, True = occluded (always within ``uv_visible_mask``).
    """
    vis = np.asarray(uv_visible_mask, bool)
    out = np.zeros(vis.shape, bool)
    if not (cfg.enabled and cfg.outliers):
        return out
    for i in range(len(vis)):
        m = vis[i] if uv_occlusion_mask is None else vis[i] & ~uv_occlusion_mask[i]
        y = _albedo(uv_visible[i], None if uv_shading is None else uv_shading[i])
        f = em_outliers_one(y, m, prior, cfg,
                            normals=None if uv_normals is None else uv_normals[i])
        occ = m & (f.posterior < 0.5)
        if cfg.mirror and mirror_map is not None:
            occ |= mirror_inconsistent(y, m, f.residual, mirror_map, cfg.mirror_threshold,
                                       f.sigma)
        out[i] = occ
    return out


def _albedo(uv: np.ndarray, shading: np.ndarray | None) -> np.ndarray:
    y = np.asarray(uv, np.float32)
    if shading is None:
        return y
    return y / np.maximum(np.asarray(shading, np.float32), 0.05)


@dataclass
class CrossFitResult:
    """``uv_outliers`` (N, T, T) bool; ``fold`` (N,) int the fold of each image; ``note``
    why no outliers were computed (too few images), else ''."""

    uv_outliers: np.ndarray
    fold: np.ndarray
    note: str = ""


def cross_fitted_outliers(uv_visible: np.ndarray, uv_visible_mask: np.ndarray,
                          mirror_map: np.ndarray | None, cfg: OcclusionConfig = DEFAULT, *,
                          uv_shading: np.ndarray | None = None,
                          uv_normals: np.ndarray | None = None,
                          uv_occlusion_mask: np.ndarray | None = None) -> CrossFitResult:
    """:func:`uv_outliers` with each image judged by a prior that does not contain it.

    Image i is in fold ``i % folds``; each fold's prior (``prior.robust_mean_texture`` +
    ``prior.pca_with_missing`` when the other folds hold >= ``pca_min_images`` images) is
    built from the other folds' usable texels: visible, not in ``uv_occlusion_mask``, and
    from the second round on not judged outliers by the previous round (``rounds`` rounds
    at most; it stops when a round changes nothing).

    Args: as :func:`uv_outliers`. Returns :class:`CrossFitResult`.
    """
    from facecorpus.tasks.prior import pca_with_missing, robust_mean_texture

    vis = np.asarray(uv_visible_mask, bool)
    N = len(vis)
    folds = min(cfg.folds, N)
    fold = np.arange(N) % max(folds, 1)
    out = np.zeros(vis.shape, bool)
    if not (cfg.enabled and cfg.outliers):
        return CrossFitResult(out, fold, "disabled")
    if N < cfg.min_images:
        return CrossFitResult(out, fold, f"{N} images < occlusion.min_images "
                                         f"({cfg.min_images}): no prior without the image")
    usable = vis.copy() if uv_occlusion_mask is None else vis & ~uv_occlusion_mask
    y = np.stack([_albedo(uv_visible[i], None if uv_shading is None else uv_shading[i])
                  for i in range(N)])
    last_train: dict[int, np.ndarray] = {}
    for _ in range(cfg.rounds):
        new = np.zeros_like(out)
        for k in range(folds):
            judged, others = fold == k, fold != k
            train = usable[others] & ~out[others]
            if k in last_train and np.array_equal(train, last_train[k]):
                # same training texels, same prior, same judged inputs: last round's verdict
                new[judged] = out[judged]
                continue
            last_train[k] = train
            prior = robust_mean_texture(y[others], train, mirror_map)
            if cfg.pca_rank > 0 and others.sum() >= cfg.pca_min_images:
                prior.basis, prior.std = pca_with_missing(y[others], train, prior.mean,
                                                          cfg.pca_rank)
                if len(prior.basis) == 0:
                    prior.basis = prior.std = None
            new[judged] = uv_outliers(
                y[judged], vis[judged], prior, mirror_map, cfg,
                uv_normals=None if uv_normals is None else uv_normals[judged],
                uv_occlusion_mask=None if uv_occlusion_mask is None
                else uv_occlusion_mask[judged])
        done = np.array_equal(new, out)
        out = new
        if done:
            break
    return CrossFitResult(out, fold)


def uv_normals(model, vertices: np.ndarray, rotation: np.ndarray, uv_size: int
               ) -> np.ndarray:
    """(T, T, 3) float32 unit camera-space normals per texel of a fitted face (0 off the
    layout). ``vertices`` (V, 3) fitted shape (model space); ``rotation`` (3, 3) camera
    rotation (``FitResult.camera_for(i).rotation``)."""
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.uv_space import to_uv_space

    raster = rasterize_uv(model.uv, model.uv_triangles, uv_size)
    n = vertex_normals(np.asarray(vertices, np.float32), model.triangles)
    n_uv = to_uv_space(n @ np.asarray(rotation, np.float32).T, raster, model.triangles)
    n_uv /= np.maximum(np.linalg.norm(n_uv, axis=-1, keepdims=True), 1e-12)
    return np.where(raster.mask[..., None], n_uv, 0.0).astype(np.float32)


def uv_irradiance(model, vertices: np.ndarray, rotation: np.ndarray, sh: np.ndarray,
                  uv_size: int) -> np.ndarray:
    """(T, T, 3) float32 SH irradiance per texel of a fitted face (0 off the layout);
    ``sh`` (27,) fitted coefficients (``FitResult.sh[i]``); other arguments as
    :func:`uv_normals`."""
    return irradiance_on(uv_normals(model, vertices, rotation, uv_size), sh)


def irradiance_on(n_uv: np.ndarray, sh: np.ndarray) -> np.ndarray:
    """(T, T, 3) float32 SH irradiance of :func:`uv_normals`' ``n_uv`` (0 where it is 0)."""
    from facecorpus.renderers.shading import sh_irradiance

    irr = sh_irradiance(n_uv, sh)
    return np.where((n_uv != 0).any(-1)[..., None], irr, 0.0).astype(np.float32)


def occluded_fraction(uv_occlusion_mask: np.ndarray, uv_visible_mask: np.ndarray,
                      layout: np.ndarray | None = None) -> np.ndarray:
    """(N,) share of the texels the photo saw (visible before occlusion removal, within
    ``layout``) that are occluded: the manifest's ``occluded_fraction``."""
    vis = np.asarray(uv_visible_mask, bool)
    occ = np.asarray(uv_occlusion_mask, bool) & vis
    if layout is not None:
        vis, occ = vis & layout, occ & layout
    n = vis.reshape(len(vis), -1).sum(1)
    with contextlib.suppress(FloatingPointError), np.errstate(invalid="ignore",
                                                              divide="ignore"):
        f = occ.reshape(len(occ), -1).sum(1) / n
    return np.where(n > 0, f, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- synthetic truth
def paste_occluder(kind: str, image: np.ndarray, landmarks: np.ndarray, rng) -> np.ndarray:
    """Paste a synthetic occluder into a face image, in place (the tests' and benchmark's
    ground truth: faces rendered with a known texture, occluders where the truth is known).

    Args:
        kind: one of :data:`OCCLUDER_KINDS`: ``glasses`` (a dark rectangle over both eyes),
            ``hand`` (a brighter skin-coloured ellipse over the right cheek), ``hair`` (dark
            wavy 3-px strands down the forehead), ``padding`` (black left of the nose tip:
            a face half outside the frame).
        image: (H, W, 3) float in [0, 1], modified in place; landmarks: (68, 2) pixels.
        rng: numpy Generator (the hand's texture).

    Returns:
        (H, W) bool the pasted pixels.
    """
    img, lm = image, landmarks
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    m = np.zeros((H, W), bool)
    if kind == "glasses":  # dark sunglasses: one rectangle over both eyes
        (x0, y0), (x1, y1) = lm[36:48].min(0) - [8, 6], lm[36:48].max(0) + [8, 6]
        m[int(y0):int(y1), int(x0):int(x1)] = True
        img[m] = [0.05, 0.05, 0.07]
    elif kind == "hand":  # a skin-coloured, brighter blob over the right cheek
        c = lm[[3, 4, 5]].mean(0)
        m = ((xx - c[0]) / 18) ** 2 + ((yy - c[1]) / 26) ** 2 < 1
        img[m] = np.array([0.85, 0.62, 0.5]) * (0.9 + 0.1 * rng.random((m.sum(), 1)))
    elif kind == "hair":  # dark wavy strands down the forehead
        top, x0, x1 = lm[17:27, 1].min(), lm[17, 0], lm[26, 0]
        for s in range(8):
            xs = x0 + (x1 - x0) * (s + 0.5) / 8
            for y in range(int(top - 25), int(top + 5)):
                xc = int(xs + 4 * np.sin(y / 5 + s))
                m[y, max(xc - 1, 0):xc + 2] = True
        img[m] = [0.12, 0.08, 0.05]
    elif kind == "padding":  # a photo whose face is half outside the frame: black padding
        m[:, : int(lm[30, 0])] = True
        img[m] = 0.0
    else:
        raise ValueError(f"paste_occluder: unknown kind {kind!r}")
    return m
