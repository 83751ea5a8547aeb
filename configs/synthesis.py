"""Typed config of the synthesis flow (`facecorpus run synthesis`): DR shape augmentation
followed by multi-pose rendering. Defaults in ``configs/synthesis_demo.yaml``; the published
scales in ``configs/srtc_690k.yaml`` and ``configs/dr_avatar.yaml``.
"""

from __future__ import annotations

import math
from typing import Literal

from facecorpus.configs.base import RunnerFields
from facecorpus.configs.base import StrictConfig as _Strict
from pydantic import Field, model_validator


class SubjectsConfig(_Strict):
    """Where the source subjects (the meshes the new faces are interpolated from) come from.

    - ``random``: ``n_random`` model samples, identity coefficients ~ N(0, (coeff_std *
      id_std)^2), spread over ``n_groups`` synthetic groups ``g0, g1, ...`` (each group has
      its own mean offset so groups differ in shape), procedural skin textures.
    - ``pseudo_gt``: a pseudo-GT dataset (``dataset``): fitted coefficients and the
      ``uv_pseudo_gt`` maps as textures; groups from the manifest column ``group_column``.
    - ``meshes``: OBJ/PLY files with the model's topology (``meshes``: a folder or a glob);
      groups from ``groups_csv`` (columns ``file,group``) or all in group ``all``; a texture
      PNG with the mesh's stem beside it is used when present.
    """

    source: Literal["random", "pseudo_gt", "meshes"] = "random"
    n_random: int = Field(40, ge=1)
    coeff_std: float = Field(1.0, gt=0, description="prior std multiplier of random samples")
    n_groups: int = Field(2, ge=1, description="synthetic groups of random samples")
    dataset: str | None = Field(None, description="pseudo-GT dataset root (source pseudo_gt)")
    group_column: str | None = Field("group", description="manifest column giving the group")
    embedding_column: str | None = Field(
        None, description="manifest column (list of floats) used to pick the closest "
                          "texture; None: closest by shape")
    meshes: str | None = Field(None, description="folder or glob of OBJ/PLY (source meshes)")
    groups_csv: str | None = None
    texture_size: int = Field(256, ge=8, description="size of procedural source textures")

    @model_validator(mode="after")
    def _need_paths(self) -> SubjectsConfig:
        if self.source == "pseudo_gt" and not self.dataset:
            raise ValueError("subjects.source 'pseudo_gt' needs subjects.dataset")
        if self.source == "meshes" and not self.meshes:
            raise ValueError("subjects.source 'meshes' needs subjects.meshes")
        return self


class AugmentConfig(_Strict):
    """DR-feature sampling as published: m subjects of one group, weights from a point
    (r, theta_1..theta_{m-1}) with r ~ U[r_min, r_max], theta ~ U[0, theta_max]."""

    n_faces: int = Field(100, ge=1, description="new faces to generate")
    m: int = Field(5, ge=1, description="subjects interpolated per new face")
    r_min: float = Field(0.6, gt=0)
    r_max: float = Field(1.3, gt=0)
    theta_max: float = Field(math.pi / 2, gt=0, le=math.pi / 2)
    group_ratios: dict[str, float] | None = Field(
        None, description="generated share per group (normalised); None: equal shares")
    max_flip_ratio: float = Field(0.01, ge=0, le=1,
                                  description="reject when more triangles flip than this")
    self_intersection: bool = Field(False, description="also reject self-intersecting meshes")
    max_attempts: int = Field(4, ge=1, description="draws per face before it is dropped")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min {self.r_min} > r_max {self.r_max}")
        if self.group_ratios is not None:
            if not self.group_ratios or any(v < 0 for v in self.group_ratios.values()):
                raise ValueError("group_ratios must be non-negative and non-empty")
            if sum(self.group_ratios.values()) <= 0:
                raise ValueError("group_ratios sum to 0")
        return self


class PosesConfig(_Strict):
    yaw_min: float = -90.0
    yaw_max: float = 90.0
    yaw_step: float = Field(10.0, gt=0)
    pitch_jitter: float = Field(5.0, ge=0, description="pitch ~ U[-j, j] degrees")
    roll_jitter: float = Field(5.0, ge=0, description="roll ~ U[-j, j] degrees")
    camera: Literal["perspective", "orthographic"] = "perspective"
    distance_mm: float = Field(600.0, gt=0, description="camera to head distance (perspective)")
    margin: float = Field(0.05, ge=0, le=1, description="crop margin around the bounding square")

    @model_validator(mode="after")
    def _check(self) -> PosesConfig:
        if self.yaw_max < self.yaw_min:
            raise ValueError(f"yaw_max {self.yaw_max} < yaw_min {self.yaw_min}")
        return self

    def yaws(self) -> list[float]:
        n = math.floor((self.yaw_max - self.yaw_min) / self.yaw_step + 1e-6) + 1
        return [self.yaw_min + i * self.yaw_step for i in range(n)]


class LightingConfig(_Strict):
    """Random second-order SH lighting: DC term ~ U[ambient_min, ambient_max] (in units of
    the constant-radiance coefficient), band 1-2 terms ~ N(0, directional_std), per-channel
    colour tint ~ N(1, tint_std)."""

    ambient_min: float = Field(0.65, ge=0)
    ambient_max: float = Field(0.95, ge=0)
    directional_std: float = Field(0.15, ge=0)
    tint_std: float = Field(0.05, ge=0)


class BackgroundConfig(_Strict):
    kind: Literal["procedural", "folder"] = "procedural"
    folder: str | None = None

    @model_validator(mode="after")
    def _check(self) -> BackgroundConfig:
        if self.kind == "folder" and not self.folder:
            raise ValueError("background.kind 'folder' needs background.folder")
        return self


class OutputConfig(_Strict):
    image_size: int = Field(128, ge=16)
    uv_size: int = Field(256, ge=8, description="UV texture / position maps (84 as published)")
    faces_per_shard: int = Field(16, ge=1, description="a shard = this many face indices")
    depth: bool = True
    uv_maps: bool = True
    val_fraction: float = Field(0.05, ge=0, le=1, description="faces whose split is 'val'")
    compression: Literal["zstd", "blosc-lz4"] = "zstd"
    # zstd 1 vs 3 on rendered pairs: 0.3 CPU-ms less per pair for 5 % more bytes (measured)
    compression_level: int = Field(1, ge=0, le=22)


class SynthesisConfig(RunnerFields):
    """The whole synthesis run. ``model``: ``procedural``, ``ict`` (built or cached under
    FACECORPUS_CACHE) or a path to a MorphableModel ``.npz``."""

    kind: Literal["synthesis"] = "synthesis"
    model: str = "procedural"
    seed: int = 0
    workers: int = Field(1, ge=1)
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads: one process; dask: a LocalCluster of processes, or "
                               "the scheduler at dask_address")
    retries: int = Field(0, ge=0)
    subjects: SubjectsConfig = SubjectsConfig()
    augment: AugmentConfig = AugmentConfig()
    poses: PosesConfig = PosesConfig()
    lighting: LightingConfig = LightingConfig()
    background: BackgroundConfig = BackgroundConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check(self) -> SynthesisConfig:
        if self.subjects.source == "random" and self.augment.group_ratios is not None:
            names = {f"g{i}" for i in range(self.subjects.n_groups)}
            unknown = sorted(set(self.augment.group_ratios) - names)
            if unknown:
                raise ValueError(f"group_ratios names {unknown} are not synthetic groups "
                                 f"{sorted(names)} (subjects.n_groups={self.subjects.n_groups})")
        return self

    def n_shards(self) -> int:
        return -(-self.augment.n_faces // self.output.faces_per_shard)
