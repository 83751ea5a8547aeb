"""Rendering primitives: cameras -> rasterize -> interpolate -> texture/shade.

The CPU rasterizer (numba) is the default; :mod:`.diff` is the differentiable torch path over
the same fragments; :mod:`.backends` holds the optional pytorch3d backend. Submodules are
imported explicitly (``from facecorpus.renderers.raster import rasterize``) so that importing
the package stays cheap.
"""
