"""Config of the non-rigid refinement after the 3DMM fit (issue #13 item 1, seed method 003).

Defaults are the published weights; the pseudo-GT config hangs it as ``nonrigid``
(``PseudoGTConfig.nonrigid``, next to ``fit``, not inside it).
"""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import StrictConfig
from pydantic import Field


class NonrigidConfig(StrictConfig):
    enabled: bool = Field(False, description="unwrap with the refined mesh and camera; the "
                                             "corrective field is stored as vertex_offsets")
    iterations: int = Field(5, ge=1, le=100, description="Gauss-Newton iterations")
    w_c: float = Field(25.0, ge=0, description="weight of the Laplacian/corrective term E_c")
    w_r: float = Field(10.0, ge=0, description="weight of the regulariser E_r")
    lambda_d: float = Field(4.0, ge=0, description="ridge on the corrective field in E_c")
    lambda_f: float = Field(5.0, ge=0, description="weight of log^2(fs) in E_r")
    lambda_q: float = Field(5.0, ge=0, description="weight of |q|^2 (rotation update) in E_r")
    laplacian: Literal["cotangent", "uniform"] = Field(
        "cotangent", description="Laplace-Beltrami (mass-normalised cotangent) or graph")
    field_unit: float = Field(0.05, gt=0, description="E_c measures the corrective field in "
                              "units of this fraction of the mean shape's eye distance")
    slide_min_yaw: float = Field(20.0, ge=0, le=90, description="contour landmarks slide on "
                                 "the side turned away beyond this yaw (90: never)")
    max_nme: float = Field(0.2, gt=0, description="refined landmark error / inter-ocular "
                                                  "above which the refinement failed")
