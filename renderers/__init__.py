"""Rendering primitives: cameras -> rasterize -> interpolate -> texture/shade.

The CPU rasterizer (numba) is the default; :mod:`.diff` is the differentiable torch path over
the same fragments; :mod:`.backends` holds the optional pytorch3d backend. Submodules are
imported explicitly (``from facecorpus.renderers.raster import rasterize``) so that importing
the package stays cheap.
"""

import os

# numba's default threading layer here is GNU OpenMP, whose idle threads spin at barriers.
# On a shared or oversubscribed machine (Dask workers, CI) that made 2-thread renders 10-30x
# slower than 1-thread ones (docs/benchmarks.md, renderers). Passive waiting costs ~nothing
# on an idle machine. Only a default: an explicit OMP_WAIT_POLICY wins, and it must be set
# before the OpenMP runtime starts, i.e. before the first parallel kernel runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
