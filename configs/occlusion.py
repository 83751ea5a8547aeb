"""Config of the occlusion segmentation (``tasks/occlusion.py``): image-space cues (hands,
non-person, constant padding, saturation) and the UV-space outlier segmentation against the
texture prior. Hung under the pseudo-GT config as ``occlusion``."""

from __future__ import annotations

from typing import Literal

from facecorpus.configs.base import StrictConfig
from pydantic import Field, model_validator


class OcclusionConfig(StrictConfig):
    enabled: bool = Field(True, description="off: no occlusion mask (every cue skipped)")
    # --- image space
    hands: bool = Field(True, description="mediapipe hand landmarks -> hand regions")
    hand_min_confidence: float = Field(0.5, gt=0, lt=1)
    hand_dilate: float = Field(0.12, ge=0, description="hand hull grown by this fraction of "
                               "the hand's size (landmarks sit on the bones, not the skin edge)")
    person: bool = Field(True, description="selfie segmentation: face-region pixels it calls "
                                           "background are occluded (face cut off, mesh "
                                           "overhanging the silhouette)")
    person_threshold: float = Field(0.5, gt=0, lt=1, description="person probability below "
                                                                  "which a pixel is background")
    padding: bool = Field(True, description="constant-colour areas touching the image border "
                                            "(black padding, letterboxing)")
    padding_tol: int = Field(2, ge=0, le=32, description="max colour range (0-255) within a "
                                                         "3 x 3 window of a padding pixel")
    padding_min_px: int = Field(64, ge=1, description="smaller flat border areas are kept")
    padding_dilate_px: int = Field(2, ge=0, description="grown by this (resampling blurs the "
                                                        "padding edge into the photo)")
    saturation: bool = Field(True, description="clipped highlights and crushed blacks")
    saturated_high: int = Field(250, ge=128, le=255, description="every channel >= this")
    saturated_low: int = Field(4, ge=0, le=64, description="every channel <= this")
    # --- UV space
    outliers: bool = Field(True, description="EM outlier segmentation against the prior")
    em_iters: int = Field(6, ge=1, le=50)
    occluder_prior: float = Field(0.1, gt=0, lt=1, description="initial share of occluded "
                                                               "texels")
    occluder_density: float = Field(1.0, gt=0, description="uniform occluder likelihood over "
                                                           "the unit RGB cube")
    sigma_floor: float = Field(0.02, gt=0, description="lowest face-class residual std "
                                                       "(colour units, 0-1)")
    smooth_px: int = Field(2, ge=0, description="radius of the spatial smoothing of the "
                                                "posterior's log-odds (MRF-like prior)")
    em_light: Literal["stage2", "residual"] = Field(
        "residual", description="the light of the EM's face model when stage 2 fitted one: "
        "stage2 - colour divided by stage 2's SH irradiance, a gain per channel; residual - "
        "also band 0-1 SH (band 2 held near 0) refitted on the inliers of the de-lit colour: "
        "stage 2 fits its light against a lit corpus prior, so the photo's directional "
        "shading stays in the colour and a prior of other lightings differs from it on one "
        "side of the face (measured in docs/benchmarks.md). Without stage 2 the light is "
        "always fitted jointly")
    mirror: bool = Field(True, description="left-right consistency through the mirror map")
    mirror_threshold: float = Field(0.15, gt=0, description="a texel and its mirror differing "
                                    "by more than this (mean abs, after the per-image "
                                    "side-to-side ratio) flag the side the prior fits worse")
    folds: int = Field(2, ge=2, description="cross-fitting: the images are split into this "
                                            "many folds; each fold is judged by a prior built "
                                            "from the others")
    rounds: int = Field(3, ge=1, le=10, description="cross-fitting rounds: each rebuilds the "
                        "priors from the texels the previous round kept (measured: an "
                        "occluder common to the corpus, sunglasses in 4 of 16 faces, is "
                        "found after 3)")
    pca_rank: int = Field(4, ge=0, description="PCA modes of each fold's prior (0: mean only)")
    pca_min_images: int = Field(8, ge=2, description="fewer images per prior: mean only")
    skin: bool = Field(True, description="per-image skin-colour outliers (tasks/skin.py): "
                       "texels outside brows, eyes, nostrils and lips whose colour is far "
                       "from the image's own cheeks, nose and chin (hair, collars, frames "
                       "at the face's rim, where the EM's prior has little support)")
    skin_threshold: float = Field(16.27, gt=0, description="squared Mahalanobis distance "
                                  "(log chromaticity + log luminance) beyond which a texel "
                                  "is an occluder; 16.27 = chi2 with 3 dof at 0.999")
    skin_floor: tuple[float, float] = Field((0.04, 0.15), description="lowest std of the "
                                            "skin model: (log chromaticity, log luminance of "
                                            "the albedo; doubled without a fitted light)")
    skin_rim: float = Field(0.12, ge=0, le=1, description="the skin cue judges texels at most "
                            "this share of the UV side from the visible region's edge "
                            "(1: all); further in, the EM's prior is well supported")
    skin_min_core: float = Field(0.25, gt=0, le=1, description="an image seeing less of the "
                                 "core gets no skin cue")
    skin_grow_threshold: float = Field(11.34, gt=0, description="hysteresis: texels connected "
                                       "to a flag (beyond skin_threshold, in the rim) are "
                                       "flagged too while their squared Mahalanobis distance "
                                       "exceeds this (11.34 = chi2 with 3 dof at 0.99): the "
                                       "strand tips and the skin-mixed texels along a strand")
    skin_grow_px: int = Field(6, ge=0, description="the hysteresis grows at most this many "
                              "texels (at UV 256^2, scaled with the UV size) from a flag, "
                              "deeper than skin_rim too; 0: no hysteresis")
    lines: bool = Field(True, description="thin line-shaped occluders (tasks/lines.py): "
                        "texels of the forehead and temples on a line (oriented "
                        "second-derivative filters on the residual against the skin model) "
                        "linked to an existing flag by hysteresis: hair strands hanging from "
                        "a flagged fringe, whose colour alone is too close to skin. Runs "
                        "with the skin cue, in the finish pass only")
    line_sigma: float = Field(0.8, gt=0, le=8, description="across-line std of the filters "
                              "in texels at UV 256^2 (scaled with the UV size): a strand "
                              "1-2 texels wide. Where it scales below 0.5 texels (UV < 160^2 "
                              "at 0.8) the line cue does not run: strands are sub-texel "
                              "colour mixes there")
    line_length: float = Field(3.0, ge=1, le=10, description="along-line std of the filters "
                               "over the across-line one: longer is blinder to specks and "
                               "pores, and to curved strands")
    line_threshold: float = Field(3.0, gt=0, description="a texel is on a line when its "
                                  "response exceeds the median over the image's line zone "
                                  "by this many robust stds (1.4826 MAD)")
    line_min_depth: int = Field(3, ge=1, description="a piece of line texels is flagged only "
                                "if it reaches this many geodesic steps (texels at UV 256^2, "
                                "scaled, at least 2) from the flags: a strand leaves its hair, "
                                "a flag's anti-aliased edge runs along it")
    line_max_tilt: float = Field(60.0, ge=0, le=90, description="only lines at most this "
                                 "many degrees from the face's up-down direction (in UV) "
                                 "count: strands hang from the hairline, a forehead's "
                                 "wrinkles run across it; 90: every orientation")
    line_grow_px: int = Field(12, ge=0, description="line texels are flagged at most this "
                              "many geodesic steps (texels at UV 256^2, scaled) from an "
                              "existing flag; 0: none")
    line_continue: bool = Field(True, description="follow each flagged line past its end "
                                "along its own orientation (tasks/lines.py "
                                "continue_lines): a strand's end, where the filters' response "
                                "falls to about half, and its tip over the brows, which the "
                                "line zone leaves out; the brow band is entered only as a "
                                "continuation of a line flagged in the line zone")
    line_continue_threshold: float = Field(1.5, gt=0, description="the continuation's "
                                           "lower threshold: the followed orientation's "
                                           "response over the line zone's median, in its "
                                           "robust stds (line_threshold is the upper one)")
    line_continue_px: int = Field(8, ge=0, description="the continuation's bound: at most "
                                  "this many steps (texels at UV 256^2, scaled) past a "
                                  "flagged line's end; 0: none")
    min_images: int = Field(3, ge=2, description="fewer images in the batch: no UV outliers "
                                                 "(no unbiased prior can be built)")

    @model_validator(mode="after")
    def _continue_below_line(self):
        if self.line_continue_threshold > self.line_threshold:
            raise ValueError(f"line_continue_threshold {self.line_continue_threshold} is "
                             f"above line_threshold {self.line_threshold}: the "
                             "continuation's low threshold must not exceed the lines'")
        return self

    @model_validator(mode="after")
    def _grow_below_seed(self):
        if self.skin_grow_threshold > self.skin_threshold:
            raise ValueError(f"skin_grow_threshold {self.skin_grow_threshold} is above "
                             f"skin_threshold {self.skin_threshold}: the hysteresis's low "
                             "threshold must not exceed the seeds'")
        return self
