"""Which morphable model a run uses (``kind: model``)."""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import StrictConfig
from pydantic import Field, model_validator


class ModelConfig(StrictConfig):
    """A morphable model to build or load.

    - ``name``: ``ict-facekit`` (built from ``source``), ``procedural`` (the test fixture), or
      ``file`` (a user-supplied model file at ``source``: .npz, BFM .mat/.h5, FLAME/3DDFA .pkl).
    - ``source``: for ``ict-facekit`` a FaceXModel folder, archive or URL (None: the local
      mirror under ``$FACECORPUS_ASSETS`` or the public repository); for ``file`` the path.
    - ``region``: ICT-FaceKit region.
    """

    kind: Literal["model"] = "model"
    name: Literal["ict-facekit", "procedural", "file"] = "ict-facekit"
    source: str | None = Field(None, description="folder, archive, URL or model file")
    region: Literal["face", "narrow", "head"] = "face"

    @model_validator(mode="after")
    def _file_needs_source(self) -> ModelConfig:
        if self.name == "file" and not self.source:
            raise ValueError("name 'file' needs source: the path of the model file")
        return self
