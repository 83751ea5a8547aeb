"""Blend: the pseudo-GT UV map of each image (a thin stage around
:func:`facecorpus.meshops.poisson.two_pass_blend`).

Pass 1 joins ``uv_visible`` and the image's fitted texture prior: by default
(``blend.visible: exact``) the visible texels keep the photo's values and the prior is
shifted by a Poisson solve (its own gradients) to meet them; ``gradient`` instead re-solves
the visible texels from the photo's gradients with the prior as boundary. Pass 2 blends the mirrored visible texture (the model's UV mirror map through the surface)
into the still-missing symmetric region. ``uv_source`` says per texel where the value came
from: 0 prior, 1 visible, 2 mirrored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlendResult:
    """``uv_pseudo_gt`` (N, S, S, 3) float32 in [0, 1]; ``uv_source`` (N, S, S) uint8."""

    uv_pseudo_gt: np.ndarray
    uv_source: np.ndarray


def solver_for(blend_cfg):
    """The Poisson solver a ``blend`` config asks for: None (the numba CPU solver) or the
    torch solver bound to its device (``auto``: CUDA when available)."""
    if blend_cfg is None or blend_cfg.solver == "numba":
        return None
    import functools

    from facecorpus.meshops.poisson_torch import poisson_blend_torch

    device = blend_cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return functools.partial(poisson_blend_torch, device=device)


def blend_batch(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, prior: np.ndarray,
                mirror_map: np.ndarray, *, mixed: bool = False,
                layout_mask: np.ndarray | None = None, adapt: bool = True,
                fade_width: float | None = 1 / 16, solver=None,
                visible: str = "exact", edge_trim: int = 0) -> BlendResult:
    """Two-pass Poisson blend of N maps.

    Args:
        uv_visible: (N, S, S, 3); uv_visible_mask: (N, S, S) bool.
        prior: (N, S, S, 3) per-image prior (``TexturePrior.fit_to_visible``) or (S, S, 3).
        mirror_map: (S, S, 2) int32 (``meshops.uv.uv_mirror_map``).
        layout_mask: (S, S) bool texels of the UV layout. The prior is extended outside it
            (nearest layout texel), so a UV-island border acts like any other boundary of the
            visible region (the map meets the prior there) instead of pulling towards 0;
            texels outside the layout are 0 in the result.
        adapt: first carry the prior's *gradients* into the non-visible texels with the
            visible texels as boundary (:func:`adapt_prior`), so the prior already meets the
            photo where pass 1 joins them: the visible texels then keep the photo's values
            (pass 1's membrane correction is the prior/photo mismatch at the boundary, now
            near 0) instead of being pulled towards a prior that differs locally.
        fade_width: with ``adapt``, the adaptation fades out over this fraction of S away
            from the photo-derived texels (:func:`fade_to_prior`); None keeps it everywhere.
        solver: the Poisson solver of every solve (:func:`solver_for`; None: numba).
        visible: ``"gradient"``: pass 1 re-solves the visible texels from the photo's
            gradients with the adapted prior as boundary (their values float by a smooth
            offset); ``"exact"``: the adaptation *is* pass 1 (``two_pass_blend(visible=
            "exact")`` over the layout's non-visible texels), the visible texels keep the
            photo's values and one solve per map fewer is made. ``adapt`` is implied.
        edge_trim: the outermost this many texels of each visible region (texels with a
            non-visible 4-neighbour, peeled repeatedly) are not used as visible or as mirror
            source: they are filled like the hidden ones (``tasks.masks.trim_edge``).
    """
    from facecorpus.meshops.poisson import extend_outside, two_pass_blend
    from facecorpus.tasks.masks import trim_edge

    prior = np.asarray(prior, np.float32)
    n = len(uv_visible)
    if prior.ndim == 3:
        prior = np.repeat(prior[None], n, 0)
    base = prior
    uv_visible_mask = trim_edge(np.asarray(uv_visible_mask, bool), edge_trim)
    if visible == "gradient":
        if adapt:
            prior = adapt_prior(uv_visible, uv_visible_mask, prior, layout_mask, solver=solver)
        if layout_mask is not None:
            prior = extend_outside(prior, layout_mask)
    else:
        adapt = True  # exact: two_pass_blend's pass 1 is the adaptation
    out, src = two_pass_blend(np.asarray(uv_visible, np.float32), uv_visible_mask, prior,
                              mirror_map, mixed=mixed, solver=solver, visible=visible,
                              domain=layout_mask)
    if adapt and fade_width:
        out = fade_to_prior(out, base, src == 0, fade_width * out.shape[1])
    out = np.clip(out, 0.0, 1.0)
    if layout_mask is not None:
        out = np.where(layout_mask[None, ..., None], out, 0.0).astype(np.float32)
    return BlendResult(out.astype(np.float32), src)


def adapt_prior(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, prior: np.ndarray,
                layout_mask: np.ndarray | None = None, solver=None) -> np.ndarray:
    """The prior's texture, shifted smoothly to meet the visible texels over the layout
    (:func:`facecorpus.meshops.poisson.meet_visible`). Returns (N, S, S, 3); equals
    ``uv_visible`` on visible texels and the prior's detail elsewhere."""
    from facecorpus.meshops.poisson import meet_visible

    return meet_visible(uv_visible, uv_visible_mask, prior, layout_mask, tol=1e-5,
                        solver=solver)


def fade_to_prior(blended: np.ndarray, prior: np.ndarray, from_prior: np.ndarray,
                  width: float) -> np.ndarray:
    """On texels that came from the (adapted) prior, fade the adaptation out with the
    distance d (texels) from the photo-derived texels: ``w = exp(-((d - 1) / width)^2)``
    (1 next to them: no seam; ~0 a few widths away), so a dark border texel (hair, shadow)
    tints its surroundings, not every unseen texel.

    Args:
        blended, prior: (N, S, S, 3); from_prior: (N, S, S) bool (``uv_source == 0``).
    """
    from scipy.ndimage import distance_transform_edt

    out = blended.copy()
    for i in range(len(out)):
        fp = from_prior[i]
        if not fp.any() or fp.all():
            continue
        d = distance_transform_edt(fp)
        w = np.exp(-((np.maximum(d - 1.0, 0.0) / width) ** 2))[..., None]
        out[i] = np.where(fp[..., None], prior[i] + w * (blended[i] - prior[i]), blended[i])
    return out
