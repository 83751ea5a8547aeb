"""Re-renderable albedo data (issue #13 item 3, seed method 004): de-lit UV textures.

The renderer's colour model (``renderers.render``, ``renderers.diff``) is
``colour = texture(uv) x irradiance``, with the irradiance computed per vertex from the
camera-space vertex normal and the 27 SH coefficients (``renderers.shading``, channel-major)
and interpolated over the triangle. :func:`uv_irradiance` moves exactly that per-vertex
irradiance into the model's UV layout, so ``uv_albedo = uv_pseudo_gt / uv_irradiance``
inverts the renderer texel by texel and ``uv_albedo x uv_irradiance`` re-renders
``uv_pseudo_gt``.

Clamping (why): dividing by a small irradiance amplifies every error of the pseudo-GT (and
a negative one, from an SH fit, flips the sign), so

- the divisor is clamped below at ``min_irradiance`` (per channel);
- the albedo is clipped to ``[0, max_albedo]``;
- ``uv_mask`` (M_uv) keeps only texels of the layout (and of the caller's mask, e.g.
  ``uv_visible_mask``) where the irradiance of every channel is >= ``min_irradiance`` and
  no channel was clipped: exactly the texels where relighting reproduces the pseudo-GT.

Which light (``AlbedoConfig.light``), and what pins its scale (why): albedo x light is
defined only up to a global scale per channel, so something in albedo space must fix it.

- ``stage2``: stage 2's SH (``FitResult.sh``). Stage 2 fits it against the per-image prior
  (``TexturePrior.fit_to_visible``), whose per-channel gain and offset were fitted to the
  *lit* photo, so the light's level and colour are not identified: they trade against that
  gain (the error that left the flow's ``uv_albedo`` at 15-22 dB, docs/benchmarks.md).
- ``auto`` (default): ``refit`` when the prior is in albedo space, ``stage2`` with a lit
  corpus prior (:func:`light_mode`; see the last sentence of the next item).
- ``refit`` (measured better with an albedo-space prior): :func:`fit_albedo_light`, the 27 coefficients in
  closed form (per-channel linear least squares, Huber-reweighted) with the prior's *mean*
  as the reflectance and no per-image gain, offset or PCA coefficients (each would be
  fitted to the lit photo and absorb the light), over the visible, unoccluded, unsaturated
  texels of ``uv_pseudo_gt``, with the final mesh's normals. The scale is then pinned by
  the prior: the model's albedo (``prior.kind: albedo`` / ``auto`` on a model with one), a
  user albedo texture (``user``) or the corpus albedo prior of de-lit maps
  (``albedo_dataset``). With ``prior.kind: corpus`` the prior is the robust mean of *lit*
  maps, so the light comes out relative to the corpus's average light (its albedo = the
  corpus's mean appearance): consistent across a corpus, not absolute.

The irradiance is linear in the coefficients and the renderer interpolates it per vertex,
so :func:`uv_sh_basis` (the 9 basis functions per vertex moved into UV) expands exactly the
:func:`uv_irradiance` that :func:`delight` divides by.

Shapes: N images, V vertices, T UV size, H x W images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from facecorpus.meshops.model import MorphableModel


@dataclass
class Albedo:
    """``uv_albedo`` (N, T, T, 3) float32 in [0, max_albedo] (0 outside the layout);
    ``uv_irradiance`` (N, T, T, 3) float32 the SH irradiance used (unclamped; 0 outside the
    layout); ``uv_mask`` (N, T, T) bool M_uv (module docstring); ``sh`` (N, 27) the
    coefficients that expand ``uv_irradiance`` with the fitted mesh."""

    uv_albedo: np.ndarray
    uv_irradiance: np.ndarray
    uv_mask: np.ndarray
    sh: np.ndarray


def vertex_irradiance(vertices: np.ndarray, triangles: np.ndarray, rotations: np.ndarray,
                      sh: np.ndarray) -> np.ndarray:
    """Per-vertex SH irradiance of the renderer (albedo 1).

    Args:
        vertices: (N, V, 3) fitted meshes (model space); triangles: (F, 3);
        rotations: (N, 3, 3) model -> camera; sh: (N, 27).

    Returns:
        (N, V, 3) float32.
    """
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.renderers.shading import shade_vertices

    v = np.asarray(vertices, np.float32)
    n = vertex_normals(v, triangles)  # (N, V, 3)
    rot = np.asarray(rotations, np.float64).reshape(len(v), 3, 3)
    return shade_vertices(n, rot, np.ones(3, np.float32),
                          np.asarray(sh, np.float32).reshape(len(v), 27))[0]


def uv_sh_basis(model: MorphableModel, vertices: np.ndarray, rotation: np.ndarray,
                uv_size: int) -> np.ndarray:
    """(T, T, 9) float32 the renderer's 9 SH basis functions of the camera-space vertex
    normals, interpolated into the UV layout like the irradiance (0 outside): per channel c,
    ``uv_irradiance[..., c] = uv_sh_basis @ sh[9c:9c+9]``.

    Args:
        vertices: (V, 3) one fitted mesh (model space); rotation: (3, 3) model -> camera.
    """
    from facecorpus.meshops.geometry import vertex_normals
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.shading import sh_basis
    from facecorpus.renderers.uv_space import to_uv_space

    n = vertex_normals(np.asarray(vertices, np.float32), model.triangles)  # (V, 3)
    n_cam = n.astype(np.float64) @ np.asarray(rotation, np.float64).reshape(3, 3).T
    raster = rasterize_uv(model.uv, model.uv_triangles, uv_size)
    return to_uv_space(sh_basis(n_cam), raster, model.triangles)


def light_mode(light: str, prior_kind: str, model_has_albedo: bool) -> str:
    """``stage2`` or ``refit`` for ``AlbedoConfig.light`` given the run's prior: ``auto`` refits
    only when the prior is unlit (``albedo``, ``user``, ``albedo_dataset``, or ``auto`` on a
    model with an albedo). Against a lit corpus mean the refit hands every face that mean's
    colour and moves its skin tone into the light (measured on ICT photos, docs)."""
    if light != "auto":
        return light
    lit = prior_kind == "corpus" or (prior_kind == "auto" and not model_has_albedo)
    return "stage2" if lit else "refit"


def fit_albedo_light(uv_target: np.ndarray, reflectance: np.ndarray, basis: np.ndarray,
                     mask: np.ndarray, cfg) -> np.ndarray:
    """The albedo-space light estimate (module docstring, ``light: refit``).

    Per channel c, ``uv_target[t, c] ~ reflectance[t, c] * basis[t] . s_c`` over the texels
    of ``mask`` whose target is unsaturated (the linear model does not hold where 8-bit
    colour clipped) and whose reflectance is > 1e-3; least squares, then ``cfg.refit_iters``
    Huber reweightings (threshold 1.345 x the MAD scale of the residuals) so texels the
    occlusion stage missed (hair, shadows the SH cannot make) weigh less.

    Args:
        uv_target: (T, T, 3) float in [0, 1] (``uv_pseudo_gt``; uint8 is scaled by 1/255).
        reflectance: (T, T, 3) the unlit prior albedo (``TexturePrior.mean``).
        basis: (T, T, 9) :func:`uv_sh_basis` of the mesh ``uv_target`` was unwrapped with.
        mask: (T, T) bool texels that saw the photo (visible, unoccluded).
        cfg: :class:`facecorpus.configs.pseudo_gt.AlbedoConfig` (``refit_min_texels``,
            ``refit_max_condition``, ``refit_iters``, ``min_irradiance``).

    Returns:
        (27,) float32 SH coefficients, channel-major.

    Raises:
        ValueError: a degenerate light solve (the reason says which): fewer than
            ``refit_min_texels`` usable texels, a normal matrix whose condition number (after
            column scaling) exceeds ``refit_max_condition`` (the normals do not span the
            basis: nothing separates the bands), a non-finite solution, or a light under which
            fewer than half the usable texels reach ``min_irradiance`` (no positive light
            explains the photo with this reflectance).
    """
    y = np.asarray(uv_target)
    y = y.astype(np.float64) / 255.0 if y.dtype == np.uint8 else y.astype(np.float64)
    R = np.asarray(reflectance, np.float64)
    B = np.asarray(basis, np.float64)
    use = (np.asarray(mask, bool) & (y < 254.5 / 255).all(-1) & (R > 1e-3).all(-1)
           & np.isfinite(y).all(-1) & np.isfinite(R).all(-1) & np.isfinite(B).all(-1))
    n = int(use.sum())
    if n < cfg.refit_min_texels:
        raise ValueError(f"degenerate light solve: {n} usable texels (visible, unsaturated, "
                         f"reflectance > 0), need albedo.refit_min_texels = "
                         f"{cfg.refit_min_texels}")
    Bu, yu, Ru = B[use], y[use], R[use]
    sh = np.zeros(27)
    for c in range(3):
        A = Ru[:, c:c + 1] * Bu  # (n, 9)
        col = np.sqrt((A ** 2).sum(0))
        if not (col > 0).all():
            raise ValueError(f"degenerate light solve: SH basis column {int(np.argmin(col))} "
                             "is zero on every usable texel")
        An = A / col
        w = np.ones(n)
        for it in range(cfg.refit_iters + 1):
            M = (An * w[:, None]).T @ An
            if it == 0:
                ev = np.linalg.eigvalsh(M)
                cond = ev[-1] / max(ev[0], 1e-300)
                if not np.isfinite(cond) or cond > cfg.refit_max_condition:
                    raise ValueError(f"degenerate light solve: normal matrix condition "
                                     f"{cond:.3g} > albedo.refit_max_condition = "
                                     f"{cfg.refit_max_condition:g} (channel {c})")
            x = np.linalg.solve(M, (An * w[:, None]).T @ yu[:, c])
            r = yu[:, c] - An @ x
            scale = max(1.4826 * np.median(np.abs(r - np.median(r))), 1e-4)
            w = np.minimum(1.0, 1.345 * scale / np.maximum(np.abs(r), 1e-12))
        sh[9 * c:9 * c + 9] = x / col
    if not np.isfinite(sh).all():
        raise ValueError("degenerate light solve: non-finite SH coefficients")
    irr = Bu @ sh.reshape(3, 9).T  # (n, 3)
    lit = float((irr >= cfg.min_irradiance).all(-1).mean())
    if lit < 0.5:
        raise ValueError(f"degenerate light solve: the fitted light reaches "
                         f"albedo.min_irradiance on only {lit:.0%} of the usable texels")
    return sh.astype(np.float32)


def uv_irradiance(model: MorphableModel, vertices: np.ndarray, rotations: np.ndarray,
                  sh: np.ndarray, uv_size: int) -> np.ndarray:
    """(N, T, T, 3) float32 the renderer's irradiance in the model's UV layout (0 outside)."""
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.renderers.uv_space import to_uv_space

    raster = rasterize_uv(model.uv, model.uv_triangles, uv_size)
    irr = vertex_irradiance(vertices, model.triangles, rotations, sh)
    return to_uv_space(irr, raster, model.triangles)


def delight(uv_pseudo_gt: np.ndarray, sh: np.ndarray, model: MorphableModel,
            vertices: np.ndarray, rotations: np.ndarray, *, mask: np.ndarray | None = None,
            min_irradiance: float = 0.05, max_albedo: float = 1.0) -> Albedo:
    """Divide the pseudo-GT texture by the fitted SH irradiance.

    Args:
        uv_pseudo_gt: (N, T, T, 3) float in [0, 1] (uint8 is scaled by 1/255).
        sh: (N, 27) fitted SH coefficients (``FitResult.sh``).
        model: the fitted model (UV layout, triangles).
        vertices: (N, V, 3) the fitted meshes the pseudo-GT was unwrapped with
            (``FitResult.vertices`` or the non-rigid ``NonrigidResult.vertices``);
        rotations: (N, 3, 3) their camera rotations (``camera_for(i).rotation``).
        mask: optional (N, T, T) bool texels to keep (e.g. ``uv_visible_mask``).
        min_irradiance, max_albedo: the clamping (module docstring).

    Returns:
        :class:`Albedo`.
    """
    pgt = np.asarray(uv_pseudo_gt)
    pgt = pgt.astype(np.float32) / 255.0 if pgt.dtype == np.uint8 else pgt.astype(np.float32)
    N, T = pgt.shape[:2]
    from facecorpus.meshops.uv import rasterize_uv

    layout = rasterize_uv(model.uv, model.uv_triangles, T).mask
    irr = uv_irradiance(model, vertices, rotations, sh, T)
    raw = pgt / np.maximum(irr, min_irradiance)
    alb = np.clip(raw, 0.0, max_albedo)
    m = (layout[None] & (irr >= min_irradiance).all(-1) & (raw <= max_albedo).all(-1)
         & np.isfinite(raw).all(-1))
    if mask is not None:
        m &= np.asarray(mask, bool)
    alb = np.where(layout[None, ..., None], alb, 0.0).astype(np.float32)
    return Albedo(alb, irr.astype(np.float32), m, np.asarray(sh, np.float32).reshape(N, 27))


def relight(uv_albedo: np.ndarray, uv_irradiance: np.ndarray) -> np.ndarray:
    """(N, T, T, 3) the renderer's colour of an albedo under an irradiance (not clipped)."""
    return (np.asarray(uv_albedo, np.float32) * np.asarray(uv_irradiance, np.float32))


def face_mask_image(seg_mask: np.ndarray, proj_mask: np.ndarray,
                    occlusion: np.ndarray | None = None) -> np.ndarray:
    """Image-space face mask M_face = M_seg x M_proj, minus occluders.

    Args:
        seg_mask: (..., H, W) bool face segmentation (``tasks.masks.segmentation_mask`` or a
            user/face-parser mask). proj_mask: (..., H, W) bool pixels covered by the fitted
            mesh's face region (``tasks.masks.projected_region_mask``).
        occlusion: optional (..., H, W) bool, True on occluders (hands, hair, glasses).

    Returns:
        (..., H, W) bool.
    """
    s, p = np.asarray(seg_mask, bool), np.asarray(proj_mask, bool)
    if s.shape != p.shape:
        raise ValueError(f"seg_mask {s.shape} and proj_mask {p.shape} differ")
    m = s & p
    if occlusion is not None:
        o = np.asarray(occlusion, bool)
        if o.shape != m.shape:
            raise ValueError(f"occlusion {o.shape} and masks {m.shape} differ")
        m &= ~o
    return m


def albedo_prior(uv_albedo: np.ndarray, uv_mask: np.ndarray, *, mirror_map=None,
                 pca_rank: int = 8, pca_min_images: int = 32):
    """A corpus-learned albedo prior (for models without an albedo): the prior stage's
    robust mean (+ EM-PCA modes from ``pca_min_images`` images on) built from de-lit textures
    instead of lit ones (``tasks.prior.robust_mean_texture`` / ``pca_with_missing``).

    Args:
        uv_albedo: (N, T, T, 3); uv_mask: (N, T, T) bool (``Albedo.uv_mask``).

    Returns:
        :class:`facecorpus.tasks.prior.TexturePrior` with source "corpus-albedo" (or
        "corpus-albedo+pca").
    """
    from facecorpus.tasks.prior import pca_with_missing, robust_mean_texture

    prior = robust_mean_texture(np.asarray(uv_albedo, np.float32), np.asarray(uv_mask, bool),
                                mirror_map)
    prior.source = "corpus-albedo"
    if pca_rank > 0 and len(uv_albedo) >= pca_min_images:
        prior.basis, prior.std = pca_with_missing(uv_albedo, uv_mask, prior.mean, pca_rank)
        prior.source = "corpus-albedo+pca"
    return prior


def dataset_content(root: str) -> str:
    """Digest of what :func:`albedo_prior_from_dataset` reads (the shards' commit records):
    part of the prior's recipe, so a changed source dataset rebuilds the prior."""
    from facecorpus.core import hashing
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(root)
    return hashing.digest([(i.shard, i.key, i.checksums) for i in ds.shards.values()], n=24)


def albedo_prior_from_dataset(root: str, *, uv_size: int, mirror_map=None,
                              max_images: int = 256, pca_rank: int = 8,
                              pca_min_images: int = 32):
    """:func:`albedo_prior` of a pseudo-GT dataset made with ``albedo.enabled``: its
    ``uv_albedo`` on ``uv_mask & uv_visible_mask`` (texels seen in the photo, not filled by the
    blend), an even subsample of at most ``max_images`` samples.

    Raises:
        InputError: the dataset has no ``uv_albedo``, another UV size, or no sample.
    """
    from facecorpus.core.errors import InputError
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(root)
    if "uv_albedo" not in ds.schema.fields:
        raise InputError(f"{root}: no uv_albedo field (made without albedo.enabled)")
    T = ds.schema.fields["uv_albedo"].shape[0]
    if T != uv_size:
        raise InputError(f"{root}: uv_albedo is {T}x{T}, this run's UV size is {uv_size}")
    idx = np.asarray(ds.manifest.column("index").to_pylist(), np.int64)
    if not len(idx):
        raise InputError(f"{root}: the dataset has no committed samples")
    idx = idx[np.unique(np.linspace(0, len(idx) - 1, min(len(idx), max_images)).round()
                        .astype(int))]
    alb = ds.read("uv_albedo", idx).astype(np.float32) / 255.0
    m = (ds.read("uv_mask", idx)[..., 0] > 0) & (ds.read("uv_visible_mask", idx)[..., 0] > 0)
    return albedo_prior(alb, m, mirror_map=mirror_map, pca_rank=pca_rank,
                        pca_min_images=pca_min_images)
