"""facecorpus: data generation and dataset building for single-image 3D face reconstruction.

Subpackages (imports flow one way: flows -> tasks -> meshops, renderers, datasets):

- ``facecorpus.meshops``   mesh and morphable-model math (pure numpy/scipy/numba)
- ``facecorpus.renderers`` rasterize, interpolate, texture, shade (CPU numba + torch)
- ``facecorpus.datasets``  sharded Zarr v3 + Parquet manifest store and torch readers
- ``facecorpus.tasks``     stages: a pure batch function plus its thin Prefect task
- ``facecorpus.flows``     Prefect flows composing the stages, run on Dask
- ``facecorpus.training``  compact PyTorch trainers that read the datasets
- ``facecorpus.configs``   typed (pydantic) run configs and their YAML defaults
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facecorpus")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
