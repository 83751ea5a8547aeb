"""Typed config of a training run (`facecorpus train`); defaults in ``configs/train_<task>.yaml``."""

from __future__ import annotations

from typing import Any, Literal

from facecorpus.configs.base import StrictConfig
from pydantic import Field, model_validator

Task = Literal["pncc", "inpaint", "position"]


class _Strict(StrictConfig):
    pass


class FilterSpec(_Strict):
    """One manifest predicate; a split is selected by the AND of its predicates.

    ``op`` "abs<=" compares ``abs(column)`` (e.g. ``{column: yaw, op: "abs<=", value: 60}``).
    """

    column: str
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in", "abs<="] = "=="
    value: Any

    @model_validator(mode="after")
    def _check_value(self) -> FilterSpec:
        if self.op in ("in", "not in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value, got {self.value!r}")
        return self


class ModelConfig(_Strict):
    width: int = Field(16, ge=1, le=512, description="channels of the first U-Net level")
    depth: int = Field(3, ge=1, le=7, description="number of 2x down-sampling levels")
    max_width: int = Field(256, ge=1)


class LossConfig(_Strict):
    """Weights of the loss terms. ``symmetry`` and ``tv`` are used by the inpaint task only;
    ``adversarial`` and ``perceptual`` switch on the pluggable hooks (off by default)."""

    l1: float = Field(1.0, ge=0)
    symmetry: float = Field(0.0, ge=0)
    tv: float = Field(0.0, ge=0)
    adversarial: float = Field(0.0, ge=0)
    perceptual: float = Field(0.0, ge=0)
    discriminator_lr: float = Field(2e-4, gt=0)


class JoinConfig(_Strict):
    """A second dataset supplying fields the main one lacks, row-matched by manifest keys.

    E.g. the synthesis flow writes ``views`` (image, pncc, mask; one row per pose) and
    ``faces`` (uv_position, uv_texture; one row per face): train ``position`` with
    ``--data OUT/views`` and ``join: {data: OUT/faces}`` (views.subject_id == faces.sample_id).
    """

    data: str = Field(description="root of the joined dataset")
    left_on: str = Field("subject_id", description="column of the main dataset's manifest")
    right_on: str = Field("sample_id", description="unique column of the joined manifest")


class TrainConfig(_Strict):
    task: Task
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (fp16 if unsupported) on CUDA, fp32 on CPU")
    channels_last: bool = Field(True, description="NHWC memory format; applied on CUDA only")
    seed: int = 0
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="per process")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    cosine: bool = Field(True, description="cosine decay of lr to 0.05*lr after warmup")
    grad_clip: float = Field(0.0, ge=0, description="0: off")
    cpu_threads: int = Field(0, ge=0, description="torch intra-op threads; 0: torch's default")
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(4, ge=1)
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    uv_mirror: str | None = Field(
        None, description="inpaint: .npy (S,S) flat or (S,S,2) (row,col) index of each texel's "
                          "mirror (-1: none), or an .npz holding it as `mirror_map` (the "
                          "pseudo-GT flow's OUT/dataset/uv_regions.npz); None: horizontal flip")
    join: JoinConfig | None = None
    train_filter: list[FilterSpec] = Field(
        default_factory=lambda: [FilterSpec(column="split", value="train")])
    val_filter: list[FilterSpec] = Field(
        default_factory=lambda: [FilterSpec(column="split", value="val")])
    val_every: int = Field(100, ge=0, description="steps between validations; 0: only at the end")
    val_max_batches: int = Field(0, ge=0, description="0: the whole validation split")
    checkpoint_every: int = Field(500, ge=0, description="0: only at the end")
    sample_every: int = Field(500, ge=0, description="PNG sample sheets; 0: only at the end")
    n_samples: int = Field(4, ge=1)
    log_every: int = Field(10, ge=1)
