"""Mesh and morphable-model math: pure numpy/scipy/numba, no Prefect, no Dask."""

from facecorpus.meshops.model import ModelFormatError, MorphableModel, Provenance

__all__ = ["ModelFormatError", "MorphableModel", "Provenance"]
