"""Model names -> models: the one place that turns a user's model spec into a MorphableModel.

Specs: ``procedural``; ``ict`` / ``ict-facekit`` (face region) or ``ict:<region>`` /
``ict-facekit:<region>`` (built from the local mirror or the cache, see
:func:`facecorpus.meshops.ict.build_ict_facekit`); or a path to a model file (``.npz`` written
by :meth:`MorphableModel.save`, or a BFM/FLAME/3DDFA file for :mod:`~facecorpus.meshops.loaders`).
"""

from __future__ import annotations

import os
from pathlib import Path

from facecorpus.meshops.model import ModelFormatError, MorphableModel

MODEL_NAMES = ("procedural", "ict-facekit", "ict")


def load_model(spec: str | os.PathLike, *, source: str | None = None, **loader_kwargs
               ) -> MorphableModel:
    """Resolve a model spec (see the module docstring).

    Raises:
        AssetUnavailableError: an ICT spec whose source cannot be reached.
        ModelFormatError: a path that is not a readable model file.
    """
    s = str(spec)
    name, _, region = s.partition(":")
    if name == "procedural":
        from facecorpus.meshops.procedural import procedural_model

        return procedural_model()
    if name in ("ict", "ict-facekit"):
        from facecorpus.meshops.ict import build_ict_facekit

        return build_ict_facekit(source, region or "face")
    p = Path(s).expanduser()
    if p.exists():
        from facecorpus.meshops.loaders import load_model_file

        return load_model_file(p, **loader_kwargs)
    raise ModelFormatError(p, None, f"not a model name ({', '.join(MODEL_NAMES)}) nor an "
                                    "existing model file")


def describe(model: MorphableModel, uv_size: int = 256) -> dict:
    """Facts about a model for people and reports: counts, modes, landmarks, regions, UV
    coverage and mirror-map coverage at ``uv_size``, symmetry residual (mm), licence."""
    import numpy as np
    from facecorpus.meshops.geometry import symmetry_map
    from facecorpus.meshops.uv import rasterize_uv, uv_mirror_coverage, uv_mirror_map

    pairs = np.unique(np.c_[model.triangles.reshape(-1), model.uv_triangles.reshape(-1)], axis=0)
    seam = int((np.bincount(pairs[:, 0], minlength=model.n_vertices) > 1).sum())
    _, res = symmetry_map(model.vertices)
    raster = rasterize_uv(model.uv, model.uv_triangles, uv_size)
    mirror = uv_mirror_map(model, uv_size)
    ext = np.ptp(model.vertices, axis=0)
    lic = model.provenance.license.strip().splitlines()
    return {
        "name": model.name,
        "units": model.units,
        "vertices": model.n_vertices,
        "triangles": int(model.triangles.shape[0]),
        "uv_coords": int(model.uv.shape[0]),
        "uv_seam_vertices": seam,
        "extent_xyz": [round(float(x), 2) for x in ext],
        "identity_modes": model.n_id,
        "identity_std_range": ([round(float(model.id_std.min()), 4),
                                round(float(model.id_std.max()), 4)] if model.n_id else []),
        "expression_modes": model.n_exp,
        "expression_names": list(model.exp_names),
        "albedo": ("none" if model.albedo_mean is None else
                   f"mean + {0 if model.albedo_basis is None else model.albedo_basis.shape[0]} modes"),
        "landmarks": int(model.landmarks.shape[0]),
        "contour_right": int(model.contour_right.size),
        "contour_left": int(model.contour_left.size),
        "regions": {k: int(v.size) for k, v in model.regions.items()},
        "uv_size": uv_size,
        "uv_coverage": round(float(raster.mask.mean()), 4),
        "uv_mirror_coverage": round(uv_mirror_coverage(mirror, raster), 4),
        "symmetry_residual_max": round(float(res.max()), 4),
        "symmetry_residual_mean": round(float(res.mean()), 5),
        "source": model.provenance.source,
        "sha256": model.provenance.sha256,
        "license": lic[0] if lic else "",
        "license_lines": len(lic),
        "notes": model.provenance.notes,
        "content_hash": model.content_hash()[:16],
    }
