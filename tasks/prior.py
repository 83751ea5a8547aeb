"""The UV texture prior: what the pseudo-GT map falls back to where the photo saw nothing.

Models with an albedo (BFM) use it (moved into UV). Models without one (ICT-FaceKit) get a
prior built from the corpus itself:

- :func:`robust_mean_texture` — per-texel **median** of the visible texels of all images
  (each image first normalised to the corpus' median skin colour, so exposure differences
  do not blur it); texels no image saw are filled from their mirror texel, then by harmonic
  (Laplace) interpolation from the observed ones (``meshops.poisson.poisson_blend`` with a
  flat source).
- :func:`pca_with_missing` — for larger corpora, a low-rank PCA of the visible texels with
  missing data (EM-PCA: alternate a rank-R SVD and re-imputation of unseen texels),
  computed at a reduced resolution and upsampled.
- :meth:`TexturePrior.fit_to_visible` — each image's prior: per-channel gain and offset of
  the mean (+ ridge-regularised PCA coefficients) fitted to that image's visible texels.
- A user-supplied UV texture (PNG) may replace it (:func:`load_texture`).

Shapes: N images, S x S UV maps, R PCA modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.model import MorphableModel
from numba import njit

SKIN = np.array([0.72, 0.55, 0.46], np.float32)  # neutral fill when nothing was ever seen


@dataclass
class TexturePrior:
    """``mean`` (S, S, 3) float32; ``basis`` (R, S, S, 3) orthonormal modes (or None) with
    ``std`` (R,); ``source``: "albedo" | "corpus" | "corpus+pca" | "user"."""

    mean: np.ndarray
    basis: np.ndarray | None = None
    std: np.ndarray | None = None
    source: str = "corpus"

    @property
    def size(self) -> int:
        return int(self.mean.shape[0])

    def fit_to_visible(self, uv_visible: np.ndarray, uv_visible_mask: np.ndarray,
                       ridge: float = 1.0, min_texels: int = 50) -> np.ndarray:
        """Per-image prior (N, S, S, 3) fitted to each image's visible texels.

        Model per channel c: ``g_c * mean_c + o_c + sum_r k_r basis_r,c``; gains, offsets and
        PCA coefficients by ridge least squares (coefficients penalised by ``ridge / std^2``,
        gain towards 1, offset towards 0). Images with fewer than ``min_texels`` visible
        texels get the plain mean.
        """
        N = uv_visible.shape[0]
        out = np.repeat(self.mean[None], N, 0).astype(np.float32)
        R = 0 if self.basis is None else self.basis.shape[0]
        for i in range(N):
            m = uv_visible_mask[i]
            n = int(m.sum())
            if n < min_texels:
                continue
            y = uv_visible[i][m].astype(np.float64)  # (n, 3)
            mu = self.mean[m].astype(np.float64)  # (n, 3)
            # unknowns: gain (3), offset (3), coefficients (R)
            cols = []
            for c in range(3):
                g = np.zeros((n, 3))
                g[:, c] = mu[:, c]
                cols.append(g)
            for c in range(3):
                o = np.zeros((n, 3))
                o[:, c] = 1.0
                cols.append(o)
            for r in range(R):
                cols.append(self.basis[r][m].astype(np.float64))
            A = np.stack([c.reshape(-1) for c in cols], 1)  # (3n, 6 + R)
            b = y.reshape(-1)
            reg = np.r_[np.full(3, 1e-3 * n), np.full(3, 1e-3 * n),
                        ridge / np.maximum(self.std, 1e-6) ** 2 if R else np.zeros(0)]
            prior_x = np.r_[np.ones(3), np.zeros(3), np.zeros(R)]
            x = np.linalg.solve(A.T @ A + np.diag(reg), A.T @ b + reg * prior_x)
            tex = self.mean * x[:3] + x[3:6]
            if R:
                tex = tex + np.tensordot(x[6:], self.basis, axes=(0, 0))
            out[i] = np.clip(tex, 0.0, 1.0)
        return out


def albedo_prior(model: MorphableModel, size: int) -> TexturePrior:
    """The model's own albedo mean (and basis) moved into UV space."""
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.uv_space import to_uv_space

    raster = rasterize_uv(model.uv, model.uv_triangles, size)
    mean = to_uv_space(model.albedo_mean, raster, model.triangles)
    basis = std = None
    if model.albedo_basis is not None and len(model.albedo_basis):
        basis = to_uv_space(model.albedo_basis * model.albedo_std[:, None, None], raster,
                            model.triangles)
        norms = np.linalg.norm(basis.reshape(len(basis), -1), axis=1)
        basis = basis / np.maximum(norms, 1e-12)[:, None, None, None]
        std = norms.astype(np.float32)
    return TexturePrior(mean.astype(np.float32), basis, std, "albedo")


def load_texture(path: str, size: int) -> TexturePrior:
    """A user-supplied UV texture (PNG/JPEG, any size, resized to S x S) as the prior."""
    from facecorpus.core.errors import InputError
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable prior texture ({e})") from None
    return TexturePrior(np.asarray(im, np.float32) / 255.0, source="user")


def _harmonic_fill(tex: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill texels outside ``known`` by Laplace interpolation from the known ones."""
    from facecorpus.meshops.poisson import poisson_blend

    if known.all():
        return tex
    if not known.any():
        return np.broadcast_to(SKIN, tex.shape).astype(np.float32).copy()
    flat = np.zeros_like(tex)
    return poisson_blend(tex, flat, ~known, tol=1e-5).astype(np.float32)


@njit(cache=True, nogil=True)
def _masked_median_kernel(values, seen, gains, out):
    N, P, C = values.shape
    buf = np.empty(N, out.dtype)
    for p in range(P):
        for c in range(C):
            k = 0
            for i in range(N):  # insertion sort of the seen, non-NaN values: N is small
                if seen[i, p]:
                    x = values[i, p, c] * gains[i, c]  # both already in out's dtype
                    if x == x:
                        j = k
                        while j > 0 and buf[j - 1] > x:
                            buf[j] = buf[j - 1]
                            j -= 1
                        buf[j] = x
                        k += 1
            if k == 0:
                out[p, c] = np.nan
            else:
                h = k // 2
                lo = h if k % 2 == 1 else h - 1
                out[p, c] = (buf[lo] + buf[h]) / 2


def masked_median(values: np.ndarray, mask: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Per-texel median over images of ``values * gains`` where ``mask``; NaN where no image
    is masked in (or only NaNs are).

    Bit for bit ``np.nanmedian(np.where(mask[..., None], values * gains[:, None, None, :],
    nan), axis=0)``: the products in numpy's result dtype of ``values * gains`` (float32
    for float32 UV maps and gains), the same (low + high) / 2 of the sorted middle in that
    dtype (``tests/test_prior.py``); but one pass over the texels with an insertion sort of
    each texel's few values: nanmedian's masked-array path on the strided stack was most of
    the prior build and of every occlusion fold (``docs/benchmarks.md``, #12).

    Args:
        values: (N, S, S, C) float; mask: (N, S, S) bool; gains: (N, C) float.

    Returns:
        (S, S, C) in the result dtype of ``values * gains``.
    """
    N, S1, S2, C = values.shape
    dtype = (np.zeros(1, values.dtype) * np.zeros(1, gains.dtype)).dtype
    out = np.empty((S1 * S2, C), dtype)
    _masked_median_kernel(np.ascontiguousarray(values, dtype=dtype).reshape(N, -1, C),
                          np.ascontiguousarray(mask, dtype=bool).reshape(N, -1),
                          np.ascontiguousarray(gains, dtype=dtype), out)
    return out.reshape(S1, S2, C)


def robust_mean_texture(uv_visible: np.ndarray, uv_visible_mask: np.ndarray,
                        mirror_map: np.ndarray | None = None, layout_mask=None,
                        max_images: int = 256, min_support: int = 1) -> TexturePrior:
    """Per-texel median of visible texels (exposure-normalised), holes filled.

    Args:
        uv_visible: (N, S, S, 3) float; uv_visible_mask: (N, S, S) bool.
        mirror_map: (S, S, 2) texel mirror map (``meshops.uv.uv_mirror_map``) or None.
        layout_mask: (S, S) bool texels of the UV layout (others are only filled for
            smoothness).
        max_images: a deterministic subsample bounds memory and time on large corpora.
        min_support: a texel seen by fewer images (never more than the corpus has) counts as
            unseen and is filled from its mirror or its surroundings: where one image alone
            sees a texel (under the chin, the hairline), that image's collar or hair would
            be the prior there.
    """
    N = uv_visible.shape[0]
    S = uv_visible.shape[1]
    if N > max_images:
        idx = np.linspace(0, N - 1, max_images).round().astype(int)
        uv_visible, uv_visible_mask = uv_visible[idx], uv_visible_mask[idx]
        N = max_images
    if N == 0 or not uv_visible_mask.any():
        return TexturePrior(np.broadcast_to(SKIN, (S, S, 3)).astype(np.float32).copy())
    # exposure normalisation: scale each image's median colour to the corpus median
    meds = np.array([np.median(uv_visible[i][uv_visible_mask[i]], 0)
                     if uv_visible_mask[i].any() else np.full(3, np.nan) for i in range(N)])
    ref = np.nanmedian(meds, 0)
    gains = np.where(np.isfinite(meds), ref / np.maximum(meds, 1e-3), 1.0)
    mean = masked_median(uv_visible, uv_visible_mask, gains)  # (S, S, 3), NaN where never seen
    known = np.isfinite(mean).all(-1)
    if min(int(min_support), N) > 1:
        known &= uv_visible_mask.sum(0) >= min(int(min_support), N)
    mean = np.where(known[..., None], mean, 0.0).astype(np.float32)
    if mirror_map is not None:
        has = (mirror_map[..., 0] >= 0)
        mr, mc = np.where(has, mirror_map[..., 0], 0), np.where(has, mirror_map[..., 1], 0)
        take = ~known & has & known[mr, mc]
        mean[take] = mean[mr[take], mc[take]]
        known = known | take
    mean = _harmonic_fill(mean, known)
    return TexturePrior(np.clip(mean, 0, 1).astype(np.float32), source="corpus")


def pca_with_missing(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, mean: np.ndarray,
                     rank: int = 8, work_size: int = 64, iters: int = 15) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Low-rank PCA of visible texels with missing data (EM-PCA at ``work_size``).

    Args:
        uv_visible: (N, S, S, 3); uv_visible_mask: (N, S, S); mean: (S, S, 3) robust mean.

    Returns:
        basis (R, S, S, 3) float32 orthonormal (upsampled, re-orthonormalised), std (R,).
    """
    from skimage.transform import resize

    N, S = uv_visible.shape[:2]
    R = int(min(rank, max(N - 1, 0)))
    if R == 0:
        return np.zeros((0, S, S, 3), np.float32), np.zeros(0, np.float32)
    w = work_size

    def down(a, order=1):
        return resize(a, (w, w) + a.shape[2:], order=order, anti_aliasing=order > 0,
                      preserve_range=True)

    mu = down(mean).reshape(-1)
    X = np.stack([down(uv_visible[i]).reshape(-1) for i in range(N)])  # (N, D)
    M = np.stack([np.repeat(down(uv_visible_mask[i].astype(np.float32), 1)[..., None] > 0.99,
                            3, -1).reshape(-1) for i in range(N)])
    Y = np.where(M, X - mu, 0.0)
    for _ in range(iters):
        U, s, Vt = np.linalg.svd(Y, full_matrices=False)
        low = (U[:, :R] * s[:R]) @ Vt[:R]
        Y = np.where(M, X - mu, low)
    U, s, Vt = np.linalg.svd(Y, full_matrices=False)
    std = (s[:R] / np.sqrt(max(N - 1, 1))).astype(np.float32)
    modes = Vt[:R].reshape(R, w, w, 3)
    up = np.stack([resize(m, (S, S, 3), order=1) for m in modes]).reshape(R, -1)
    q, _ = np.linalg.qr(up.T)  # re-orthonormalise at full resolution
    basis = q.T.reshape(R, S, S, 3).astype(np.float32)
    # keep each mode's sign (QR may flip it)
    sign = np.sign((basis.reshape(R, -1) * up).sum(1))
    basis *= sign[:, None, None, None]
    return basis, std * np.sqrt(S * S / (w * w))


def build_prior(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, *, model=None,
                mirror_map=None, kind: str = "auto", texture_path: str | None = None,
                pca_rank: int = 8, pca_min_images: int = 32, min_support: int = 1
                ) -> TexturePrior:
    """The prior a run uses: ``kind`` = auto (albedo when the model has one, else corpus),
    albedo, corpus, or user (``texture_path``). PCA modes are added to a corpus prior when
    it has at least ``pca_min_images`` images and ``pca_rank > 0``."""
    S = uv_visible.shape[1] if uv_visible.ndim == 4 else None
    if kind == "user":
        return load_texture(texture_path, S)
    if kind == "albedo" or (kind == "auto" and model is not None and model.has_albedo):
        return albedo_prior(model, S)
    prior = robust_mean_texture(uv_visible, uv_visible_mask, mirror_map,
                                min_support=min_support)
    if pca_rank > 0 and len(uv_visible) >= pca_min_images:
        prior.basis, prior.std = pca_with_missing(uv_visible, uv_visible_mask, prior.mean,
                                                  pca_rank)
        prior.source = "corpus+pca"
    return prior
