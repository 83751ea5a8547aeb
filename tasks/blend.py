"""Blend: the pseudo-GT UV map of each image (a thin stage around
:func:`facecorpus.meshops.poisson.two_pass_blend`).

Pass 1 blends ``uv_visible`` into the image's fitted texture prior over ``uv_visible_mask``;
pass 2 blends the mirrored visible texture (the model's UV mirror map through the surface)
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


def blend_batch(uv_visible: np.ndarray, uv_visible_mask: np.ndarray, prior: np.ndarray,
                mirror_map: np.ndarray, *, mixed: bool = False,
                layout_mask: np.ndarray | None = None) -> BlendResult:
    """Two-pass Poisson blend of N maps.

    Args:
        uv_visible: (N, S, S, 3); uv_visible_mask: (N, S, S) bool.
        prior: (N, S, S, 3) per-image prior (``TexturePrior.fit_to_visible``) or (S, S, 3).
        mirror_map: (S, S, 2) int32 (``meshops.uv.uv_mirror_map``).
        layout_mask: (S, S) bool texels of the UV layout; texels outside it are set to 0
            (the Poisson membrane is only meaningful on the surface).
    """
    from facecorpus.meshops.poisson import two_pass_blend

    out, src = two_pass_blend(np.asarray(uv_visible, np.float32),
                              np.asarray(uv_visible_mask, bool),
                              np.asarray(prior, np.float32), mirror_map, mixed=mixed)
    out = np.clip(out, 0.0, 1.0)
    if layout_mask is not None:
        out = np.where(layout_mask[None, ..., None], out, 0.0).astype(np.float32)
    return BlendResult(out.astype(np.float32), src)
