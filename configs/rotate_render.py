"""Typed config of the rotate-and-render flow (`facecorpus run rotate-render`): near-frontal
pseudo-GT samples re-rendered at large yaw offsets with their own fitted shape, pose, camera
and ``uv_pseudo_gt``, composited over their photo. Defaults in ``configs/rotate_render.yaml``.

``source`` and ``out`` are locations, not content: they never enter a shard's key (the source
enters through its committed content, see :mod:`facecorpus.flows.rotate_render`).
"""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import RunnerFields
from pydantic import Field, model_validator

#: config fields that say where things are, not what the bytes are (kept out of keys)
LOCATION_FIELDS = frozenset({"source", "out"})


class RotateRenderConfig(RunnerFields):
    kind: Literal["rotate_render"] = "rotate_render"
    source: str | None = Field(None, description="pseudo-GT dataset root (OUT/dataset of "
                               "`facecorpus run pseudo-gt`, or that OUT itself)")
    out: str | None = Field(None, description="output folder or fsspec URL (the CLI's --out)")
    model: str | None = Field(None, description="model spec; None: the one the source was "
                              "made with (its schema's config); must match its model_hash")
    max_abs_yaw: float = Field(30.0, gt=0, le=90, description="only samples with |yaw| below "
                               "this are rotated; the others are rejected rows (stage "
                               "'eligibility')")
    yaw_offset_range: tuple[float, float] = Field(
        (15.0, 60.0), description="|yaw offset| ~ U[lo, hi] degrees, sign random per view")
    views_per_sample: int = Field(2, ge=1, le=16)
    seed: int = 0
    samples_per_shard: int | None = Field(
        None, ge=1, description="source samples per output shard (by the source's global "
                                "index); None: the source's own shard size (one output "
                                "shard per source shard)")
    hole_fill: Literal["inpaint", "keep"] = Field(
        "inpaint", description="pixels of the original face the rotated face no longer "
                               "covers (hole_mask): inpaint them from the surrounding photo "
                               "(OpenCV Telea), or keep the photo's pixels (a ghost face)")
    hole_dilate_px: int = Field(3, ge=0, le=32, description="grow the original face's "
                                "rendered mask by this much before cutting holes (the fitted "
                                "mesh's outline misses the photo's face edge by a few px)")
    inpaint_radius: float = Field(5.0, gt=0, description="Telea radius, full-resolution px")
    inpaint_downscale: int = Field(2, ge=1, le=8, description="inpaint at 1/this resolution "
                                   "(the fill is a smooth guess; 1: full resolution)")
    lighting: Literal["baked", "relit"] = Field(
        "baked", description="baked: unlit uv_pseudo_gt lookup like the pseudo-GT re-render "
                             "(its shading turns with the face); relit: de-lit by the fitted "
                             "sh at the source pose and lit by it at the new pose")
    min_irradiance: float = Field(0.25, gt=0, description="relit: irradiance floor when "
                                  "de-lighting (texels facing away from the light)")
    min_mask_px: int = Field(64, ge=1, description="a view whose rotated face covers fewer "
                             "pixels is a failed view (the sample is rejected)")
    sheets: bool = Field(True, description="PNG contact sheet per shard")
    compression_level: int = Field(3, ge=1, le=22)

    @model_validator(mode="after")
    def _check(self) -> RotateRenderConfig:
        lo, hi = self.yaw_offset_range
        if not 0 <= lo <= hi <= 90:
            raise ValueError(f"yaw_offset_range must satisfy 0 <= lo <= hi <= 90, got "
                             f"{list(self.yaw_offset_range)}")
        return self
