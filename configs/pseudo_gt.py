"""Typed config of the pseudo-GT flow (`facecorpus run pseudo-gt`): photos -> landmarks ->
3DMM fit -> UV unwrap -> texture prior -> two-pass Poisson blend. Defaults in
``configs/pseudo_gt.yaml``.
"""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import RunnerFields, StrictConfig, check_device
from facecorpus.configs.fit import FitConfig
from facecorpus.configs.nonrigid import NonrigidConfig
from facecorpus.configs.occlusion import OcclusionConfig
from pydantic import Field, field_validator, model_validator


class IngestConfig(StrictConfig):
    max_megapixels: float = Field(40.0, gt=0, description="larger images are rejected from "
                                  "their header, before decoding")
    grayscale: Literal["reject", "convert"] = "reject"
    alpha: Literal["reject", "flatten"] = "reject"


class LandmarksConfig(StrictConfig):
    mediapipe_model: str | None = Field(
        None, description="face_landmarker.task; None: $FACECORPUS_MEDIAPIPE_MODEL, "
                          "$FACECORPUS_ASSETS/models/mediapipe/, or the mediapipe package")
    fallback: Literal["box_template", "none"] = Field(
        "box_template", description="without a mediapipe model: LBP face box + the model's "
                                    "landmark template (coarse), or reject")
    crop_size: Literal[224, 256] = 256
    min_face_px: float = Field(40.0, gt=0, description="faces whose landmark box's longer "
                               "side is smaller (pixels of the photo) are dropped")
    max_faces: int = Field(8, ge=1, description="at most this many faces per photo (largest "
                                                "first), each its own sample")


class UnwrapConfig(StrictConfig):
    uv_size: int = Field(256, ge=16, le=2048)
    erode_px: int = Field(3, ge=0, description="face-mask erosion (pixels of the crop)")
    min_cos: float = Field(0.15, ge=0, lt=1, description="grazing texels are not visible")
    face_region: str | None = Field(
        "narrow", description="model region sampled into UV (and hulled for seg_mask): narrow "
        "is the skin inside the jaw line and below the hairline in both shipped models; ICT's "
        "face area adds the ears, the neck and the scalp edge, which photos show as hair, "
        "collar or background")
    oval: Literal["none", "hull", "polygon"] = Field(
        "hull", description="image-space landmark bound on the face mask, against fit error "
        "(the fitted region itself follows the geometry at any yaw): hull (convex hull of the "
        "68 landmarks and the lifted brows, grown by oval_margin; cannot fold); none; polygon "
        "(jaw + lifted brows, the rule before 2026-12-07: it folds into a crescent at large "
        "yaw)")
    oval_forehead: float = Field(0.25, ge=0, le=2, description="brows lifted by this "
                                 "fraction of the brow-to-chin height (hull, polygon)")
    oval_margin: float = Field(0.15, ge=0, le=1, description="hull grown outward by this "
                               "fraction of the brow-to-chin height")
    occlusion_threshold: float | None = Field(
        None, gt=0, description="legacy rule (replaced by the ``occlusion`` section): also "
                                "drop visible texels whose colour differs from the fitted "
                                "prior by more than this (mean L1); None: off")

    @field_validator("oval", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML 1.1 reads a bare `off`/`no` as False and `null` as None: both mean no oval
        return "none" if v is False or v is None or v == "off" else v


class PriorConfig(StrictConfig):
    kind: Literal["auto", "albedo", "corpus", "user", "albedo_dataset"] = Field(
        "auto", description="albedo_dataset: the corpus-learned albedo prior (robust mean + "
        "PCA) of the de-lit maps of a pseudo-GT dataset made with albedo.enabled")
    texture: str | None = Field(None, description="UV texture image (kind: user)")
    dataset: str | None = Field(None, description="pseudo-GT dataset root with uv_albedo "
                                "(kind: albedo_dataset)")
    pca_rank: int = Field(8, ge=0)
    min_support: int = Field(2, ge=1, description="a corpus prior's texel seen by fewer "
                             "images (capped at the corpus size) is filled from its mirror or "
                             "surroundings instead: one image's collar or hair under the chin "
                             "or at the hairline would otherwise be the prior there")
    edge_trim: int = Field(0, ge=0, le=8, description="the outermost this many texels of each "
                           "image's visible region are left out of the corpus prior: where few "
                           "images see a texel most samples are such edge texels, sampled at "
                           "grazing angles or the mask's edge with hair mixed in "
                           "(tasks.masks.trim_edge; docs/benchmarks.md)")
    pca_min_images: int = Field(32, ge=2)
    max_images: int = Field(256, ge=1, description="images used for the corpus prior")
    rebuild_growth: float | None = Field(
        None, gt=1, description="rebuild the stored corpus prior when the corpus has grown "
                                "past this many times the images it was built from (None: "
                                "only on --rebuild-prior or a changed recipe)")

    @model_validator(mode="after")
    def _check(self) -> PriorConfig:
        if self.kind == "user" and not self.texture:
            raise ValueError("prior.kind 'user' needs prior.texture")
        if self.kind == "albedo_dataset" and not self.dataset:
            raise ValueError("prior.kind 'albedo_dataset' needs prior.dataset")
        return self


class BlendConfig(StrictConfig):
    mixed: bool = Field(False, description="mixed gradients (Pérez et al.)")
    solver: Literal["numba", "torch"] = Field(
        "numba", description="numba: the CPU multigrid-PCG (meshops.poisson); torch: the "
        "batched tensor PCG (meshops.poisson_torch) on `device`, the same equations")
    device: str = Field("cpu", description="torch solver's device: cpu | cuda | cuda:N | "
                        "auto (cuda when available)")
    visible: Literal["gradient", "exact"] = Field(
        "exact", description="gradient: pass 1 keeps the photo's gradients on the visible "
        "texels and lets their values float to meet the prior (a smooth offset from the photo); "
        "exact: the visible texels keep the photo's values and the prior is shifted to meet "
        "them (tasks.blend.blend_batch; measured in docs/benchmarks.md)")
    edge_trim: int = Field(0, ge=0, le=8, description="the outermost this many texels of each "
                           "visible region are filled like hidden ones instead of kept (edge "
                           "texels are sampled at grazing angles / the image mask's edge; 0 "
                           "keeps every photo value, measured in docs/benchmarks.md)")

    @model_validator(mode="after")
    def _device(self) -> BlendConfig:
        check_device("blend.device", self.device, needs_cuda=self.solver == "torch")
        return self


class AlbedoConfig(StrictConfig):
    """De-lit texture per sample (``tasks.albedo``): ``uv_albedo`` = ``uv_pseudo_gt`` / the
    fitted SH irradiance, with ``uv_irradiance``, ``uv_mask`` (M_uv) and ``face_mask``
    (M_face), ``albedo_sh``. Needs stage 2 (its mesh; and its SH with ``light: stage2``)."""

    enabled: bool = Field(False, description="store uv_albedo, uv_irradiance, uv_mask, "
                          "face_mask (off: the dataset's fields and bytes are unchanged)")
    min_irradiance: float = Field(0.05, gt=0, description="the divisor is clamped below at "
                                  "this; texels darker than it leave uv_mask")
    max_albedo: float = Field(1.0, gt=0, le=1, description="albedo clipped to [0, this]; "
                              "clipped texels leave uv_mask")
    light: Literal["auto", "stage2", "refit"] = Field(
        "auto", description="the SH light de-lit by (stored as albedo_sh): auto - refit when "
        "the prior is in albedo space (model albedo, user texture, albedo_dataset), stage2 "
        "with a lit corpus prior (refit against a lit corpus mean gives every face that "
        "mean's colour and puts the skin tone into the light); stage2 - stage "
        "2's sh (its level trades against the per-image prior's gain fitted to the lit "
        "photo); refit - solved in closed form on uv_pseudo_gt's visible texels with the "
        "prior's mean as the unlit reflectance, which pins the scale (tasks/albedo.py; "
        "measured, docs/benchmarks.md)")
    refit_min_texels: int = Field(500, ge=9, description="refit: fewer usable texels reject "
                                  "the sample (degenerate light solve)")
    refit_max_condition: float = Field(1e6, gt=1, description="refit: a larger condition "
                                       "number of the column-scaled normal matrix rejects "
                                       "the sample (degenerate light solve)")
    refit_iters: int = Field(4, ge=0, description="refit: Huber reweightings after the "
                             "least-squares solve")


class OutputConfig(StrictConfig):
    samples_per_shard: int = Field(16, ge=1)
    val_fraction: float = Field(0.0, ge=0, le=1)
    sheets: bool = Field(True, description="PNG contact sheet per shard")


class PseudoGTConfig(RunnerFields):
    kind: Literal["pseudo_gt"] = "pseudo_gt"
    model: str = Field("ict", description="procedural | ict | ict:<region> | path to .npz")
    ingest: IngestConfig = IngestConfig()
    landmarks: LandmarksConfig = LandmarksConfig()
    fit: FitConfig = FitConfig()
    unwrap: UnwrapConfig = UnwrapConfig()
    prior: PriorConfig = PriorConfig()
    occlusion: OcclusionConfig = OcclusionConfig()
    blend: BlendConfig = BlendConfig()
    output: OutputConfig = OutputConfig()
    nonrigid: NonrigidConfig = Field(
        NonrigidConfig(), description="non-rigid refinement after stage 2 (stage 1 when "
        "stage 2 is off); enabled: unwrap and re-render with the refined mesh and camera, "
        "store vertex_offsets")
    albedo: AlbedoConfig = AlbedoConfig()
    joint_subjects: bool = Field(
        False, description="rows sharing a subject_id share identity coefficients in a joint "
        "stage-1 fit, and a subject's photos stay in one shard")

    @model_validator(mode="after")
    def _check_albedo(self) -> PseudoGTConfig:
        if self.albedo.enabled and self.fit.photometric_iters == 0:
            raise ValueError("albedo.enabled needs stage 2 (fit.photometric_iters > 0): the "
                             "SH light it divides by comes from it")
        return self
