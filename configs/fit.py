"""Typed config of 3DMM fitting (the ``fit`` section of the pseudo-GT config): stage 1
(landmarks, per-image Levenberg-Marquardt with sliding jaw contours) and stage 2 (the
photometric refinement, keys prefixed ``photometric_``). The stage functions in
``tasks/fit.py`` take this section whole.
"""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import StrictConfig, check_device
from pydantic import Field, model_validator


class FitConfig(StrictConfig):
    camera: Literal["orthographic", "perspective"] = "orthographic"
    fov_deg: float = Field(12.0, gt=0, lt=120, description="perspective: vertical field of view")
    focal: Literal["fixed", "estimate"] = Field(
        "fixed", description="perspective: the focal from fov_deg, or a per-image focal scale "
        "fs (focal = fs x the fov_deg focal) fitted with the prior lambda_f log^2(fs)")
    lambda_f: float = Field(0.1, ge=0, description="focal: estimate - weight of log^2(fs) "
                            "(as tasks/nonrigid's lambda_f)")
    focal_scale_bounds: tuple[float, float] = Field(
        (0.1, 4.0), description="focal: estimate - fs is kept inside [lo, hi]")
    landmarks: Literal["sparse68", "dense"] = Field(
        "sparse68", description="dense: fit mediapipe's 468 points through the model's dense "
        "correspondence (meshops/correspondence.py) plus the sliding 68-point jaw; images "
        "without dense points (manifest landmarks) use the 68 points")
    dense_weight: float = Field(1.0, gt=0, description="dense: the dense points together "
                                "weigh this x the 51 inner 68-point landmarks")
    dense_jaw_weight: float = Field(0.0, ge=0, description="dense: weight of the 17 sliding "
                                    "jaw landmarks (jaw_weight in sparse68); 0 measured best "
                                    "in benchmarks/bench_fit.py: the dense face oval already "
                                    "holds the near jaw, and a far-side silhouette point "
                                    "biases yaw")
    dense_min_facing: float = Field(0.2, ge=-1, le=1, description="dense: a point is dropped "
                                    "in a round when its normal . view direction (current "
                                    "pose) is below this (far side: mediapipe puts it on the "
                                    "silhouette, not on its surface point)")
    n_id: int | None = Field(None, ge=0, description="identity modes fitted (None: all)")
    n_exp: int | None = Field(None, ge=0, description="expression modes fitted (None: all)")
    sigma_px: float | None = Field(None, gt=0, description="landmark noise scale in pixels "
                                                           "(None: 1% of the image size)")
    huber_delta: float = Field(2.0, gt=0, description="Huber threshold, in units of sigma")
    jaw_weight: float = Field(0.5, ge=0)
    slide_min_yaw: float = Field(20.0, ge=0, le=90, description="jaw landmarks slide on the "
                                 "side turned away beyond this yaw (degrees)")
    rounds: int = Field(4, ge=1, description="correspondence updates (sliding jaw), after one "
                                             "pose-only round")
    iters_per_round: int = Field(100, ge=1, description="LM iterations per round and image")
    tol: float = Field(1e-6, gt=0, description="an image's round ends when a step lowers the "
                                               "energy by < tol x (1 + energy)")
    settle_rel: float = Field(1e-2, gt=0, description="or when two rounds' energies differ by "
                                                      "less than this (relative)")
    max_nme: float = Field(0.2, gt=0, description="landmark error / inter-ocular distance "
                                                  "above which a fit is rejected (diverged), "
                                                  "after stage 1 and after stage 2")
    photometric_iters: int = Field(5, ge=0, description="stage-2 LM iterations, or Adam "
                                   "steps with photometric_solver adam (40 there) (0: off). "
                                   "lm: 5 since the #12 sweep (benchmarks/sweep_lm.py): "
                                   "every image's energy within 0.4 % (real) / 0.8 % "
                                   "(synthetic) of 6 iterations', NME and ground-truth errors "
                                   "not worse, ~0.85x stage 2's CPU; 4 left more than 1 %")
    photometric_solver: Literal["adam", "lm"] = Field(
        "lm", description="lm: per-image Levenberg-Marquardt on the stage-2 energy "
        "(tasks/photometric.py): lower energy, photometric error and NME than Adam-40 on the "
        "3 real photos and the 48-photo corpus at ~0.8x its CPU with 6 iterations "
        "(docs/benchmarks.md, 'Stage 2 LM convergence'); CPU only. adam: Adam steps on the same energy, on "
        "fit.device")
    photometric_modes: int | None = Field(None, ge=0, description="lm: the first n identity "
                                          "and the first n expression modes are refined "
                                          "(None: all fitted; the rest keep stage 1's). "
                                          "Measured (#12 sweep): 80 saves ~6 % of stage 2 "
                                          "for +0.5 % energy on the real photos, 40 +5.6 %")
    photometric_hessian_stride: int = Field(2, ge=1, description="lm: the Gauss-Newton "
                                            "matrix from the pixels on every stride-th row "
                                            "and column (scaled; the gradient uses all). "
                                            "3 or 4: +2-4 % energy on the synthetic faces "
                                            "(#12 sweep); 1: 1.7-2.2x the CPU for -0.1 to "
                                            "-0.6 %")
    photometric_tol: float = Field(1e-4, gt=0, description="lm: an image stops when a step "
                                   "lowers its energy by < tol x (1 + energy)")
    photometric_max_extension: float = Field(2.0, ge=1.0, description="lm: after an accepted "
                                             "step, one more render at the step length the "
                                             "1-D parabola predicts, at most this x the step "
                                             "(1: off; the IRLS model's steps are short)")
    photometric_lr: float = Field(0.01, gt=0, description="adam: step size")
    photometric_w_landmarks: float = Field(0.05, ge=0, description="weight of the stage-1 "
                                           "landmark term (keeps the fit anchored)")
    photometric_w_prior: float = Field(1e-3, ge=0, description="weight of |alpha/std|^2 + "
                                       "|beta/std|^2 (per mode)")
    photometric_charbonnier_eps: float = Field(0.02, gt=0)
    photometric_fit_shape: bool = True
    photometric_render_size: int | None = Field(128, ge=16, description="photometric term at "
                                                "this resolution (None: the crop's size). 96 / "
                                                "80 / 64 end 1.3 / 4 / 7 % higher in 128's "
                                                "energy on the synthetic faces (#12 sweep), "
                                                "as do coarse-to-fine starts at 64")
    photometric_threads: int | None = Field(1, ge=1, description="torch threads in stage 2 "
                                            "(measured: 1 beats 2 on a 2-core box)")
    device: str = Field(
        "cpu", description="torch device of stage 2 with photometric_solver adam: cpu | cuda | "
        "cuda:N | auto (cuda when available). Stage 1 and the lm solver run on the CPU")
    rasterizer: Literal["auto", "numba", "torch"] = Field(
        "auto", description="stage-2 visibility pass: numba (renderers/raster.py, CPU only) "
        "or torch (renderers/raster_torch.py, on `device`, the same fragments up to depth "
        "ties); auto: numba on the CPU, torch on a CUDA device")

    @model_validator(mode="after")
    def _device(self) -> FitConfig:
        d = self.device
        check_device("fit.device", d, needs_cuda=False)
        if d.startswith("cuda"):
            if self.rasterizer == "numba":
                raise ValueError(f"fit.rasterizer numba runs on the CPU only: use torch or "
                                 f"auto with fit.device {d!r}")
            if self.photometric_solver == "lm":
                raise ValueError(f"fit.device {d!r}: photometric_solver lm runs on the CPU "
                                 f"only (per-image numba Jacobians); use adam or device cpu")
            check_device("fit.device", d, needs_cuda=True)
        if self.rasterizer == "torch" and self.photometric_solver == "lm":
            raise ValueError("fit.rasterizer torch is used by photometric_solver adam only")
        return self

    def resolved_device(self) -> str:
        """The torch device stage 2 runs on (``auto``: cuda when available, else cpu)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_rasterizer(self) -> str:
        """numba or torch (``auto``: numba on the CPU, torch on a CUDA device)."""
        if self.rasterizer != "auto":
            return self.rasterizer
        return "numba" if self.resolved_device() == "cpu" else "torch"
