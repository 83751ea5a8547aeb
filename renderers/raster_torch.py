"""The rasterizer in pure torch: screen vertices + triangles -> :class:`~.raster.Fragments` of
tensors on the input's device (CPU or CUDA), batched over images.

Same conventions as :mod:`facecorpus.renderers.raster` (pixel centres, 1/256-pixel vertex
snapping with exact int64 edge functions and the top-left fill rule, nearest depth wins, both
windings unless ``cull_backfaces``, ``perspective_correct`` depth/barycentrics, dropped
invalid triangles), so it gives the numba rasterizer's fragments except where two surfaces
are within float32 depth precision of each other (see below). No gradient: as with the numba
path, :func:`~.diff.barycentrics` recomputes differentiable barycentrics from ``pix_to_face``.

Algorithm (no per-pixel loop, so it runs as a few large kernels on a GPU): every triangle's
pixel-centre bounding box is enumerated as (triangle, pixel) candidates, chunked so that at
most ``max_candidates`` exist at a time (memory bound independent of mesh and image size);
each candidate is tested with the edge functions, and the covered ones are reduced into the
z-buffer with one ``scatter_reduce(amin)`` over an int64 that packs the depth key (float32,
order-preserving bits) above the face id. The minimum is therefore the nearest face, and on
an exact depth tie the lowest face id - the numba rasterizer's order (it keeps the first face
on ties) - independent of thread scheduling: the result is deterministic on every device.
Depth keys are compared at float32 precision (numba compares float64): where two faces'
keys agree to float32 the lower face id wins, which can differ from numba on such pixels.
"""

from __future__ import annotations

import itertools

import torch
from facecorpus.renderers.raster import Fragments

_SUB = 256.0
_LIMIT = float(1 << 20)
_FACE_BITS = 31
_EMPTY = torch.iinfo(torch.int64).max


def _sortable(key: torch.Tensor) -> torch.Tensor:
    """float32 (any shape) -> int64 in [0, 2^32) with the same order (IEEE bits, negative
    values' magnitude bits flipped, shifted to non-negative)."""
    b = key.contiguous().view(torch.int32).to(torch.int64)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b + (1 << 31)


def rasterize_torch(screen_vertices: torch.Tensor, triangles, height: int, width: int, *,
                    cull_backfaces: bool = False, perspective_correct: bool = True,
                    max_candidates: int = 1 << 21) -> Fragments:
    """Rasterize triangles into a z-buffer on ``screen_vertices``' device.

    Args:
        screen_vertices: (N, V, 3) tensor ``[x_px, y_px, depth]`` (any float dtype, any
            device; rounded to float32 first, as the numba path does).
        triangles: (F, 3) integer tensor or array, shared by all images; F < 2^31.
        height, width: image size in pixels.
        cull_backfaces, perspective_correct: as for :func:`~.raster.rasterize`.
        max_candidates: (triangle, pixel) pairs tested at once (memory: about 85 bytes
            each, measured on CPU; the barycentric pass adds about 250 bytes per pixel of
            the batch).

    Returns:
        :class:`~.raster.Fragments` whose fields are tensors on the input's device:
        pix_to_face (N, H, W) int32 (-1 background), bary (N, H, W, 3) float32, zbuf
        (N, H, W) float32 (+inf background).
    """
    sv = screen_vertices
    if not torch.is_tensor(sv):
        sv = torch.as_tensor(sv)
    if sv.dim() != 3 or sv.shape[-1] != 3:
        raise ValueError(f"screen_vertices must be (N, V, 3), got {tuple(sv.shape)}")
    dev = sv.device
    tris = torch.as_tensor(triangles, device=dev)
    if tris.dim() != 2 or tris.shape[1] != 3 or tris.dtype.is_floating_point:
        raise ValueError(f"triangles must be (F, 3) integers, got {tuple(tris.shape)}")
    tris = tris.long()
    H, W = int(height), int(width)
    if H <= 0 or W <= 0:
        raise ValueError(f"image size must be positive, got {H}x{W}")
    N, V = sv.shape[0], sv.shape[1]
    F = tris.shape[0]
    if F >= 1 << _FACE_BITS:
        raise ValueError(f"at most 2^31 - 1 triangles, got {F}")
    if F and (int(tris.min()) < 0 or int(tris.max()) >= V):
        raise ValueError(f"triangle indices out of range [0, {V})")
    persp = bool(perspective_correct)
    with torch.no_grad():
        p = sv.detach().to(torch.float32).to(torch.float64)  # (N, V, 3)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        ok = (x.abs() <= _LIMIT) & (y.abs() <= _LIMIT) & torch.isfinite(z)
        if persp:
            ok &= z > 0
        XY = torch.floor(torch.nan_to_num(p[..., :2]) * _SUB + 0.5).long()
        XY = torch.where(ok[..., None], XY, torch.zeros_like(XY))
        ZW = torch.where(ok, 1.0 / z if persp else z, torch.zeros_like(z))
        ZW = torch.nan_to_num(ZW)

        # per (image, triangle) set-up, flattened to T = N * F rows
        a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
        X0, Y0 = XY[:, a, 0].reshape(-1), XY[:, a, 1].reshape(-1)
        X1, Y1 = XY[:, b, 0].reshape(-1), XY[:, b, 1].reshape(-1)
        X2, Y2 = XY[:, c, 0].reshape(-1), XY[:, c, 1].reshape(-1)
        w0, w1, w2 = ZW[:, a].reshape(-1), ZW[:, b].reshape(-1), ZW[:, c].reshape(-1)
        good = (ok[:, a] & ok[:, b] & ok[:, c]).reshape(-1)
        ymin = torch.minimum(Y0, torch.minimum(Y1, Y2))
        ymax = torch.maximum(Y0, torch.maximum(Y1, Y2))
        xmin = torch.minimum(X0, torch.minimum(X1, X2))
        xmax = torch.maximum(X0, torch.maximum(X1, X2))
        i0 = (-torch.div(128 - ymin, 256, rounding_mode="floor")).clamp(min=0)
        i1 = torch.div(ymax - 128, 256, rounding_mode="floor").clamp(max=H - 1)
        j0 = (-torch.div(128 - xmin, 256, rounding_mode="floor")).clamp(min=0)
        j1 = torch.div(xmax - 128, 256, rounding_mode="floor").clamp(max=W - 1)
        area = (X1 - X0) * (Y2 - Y0) - (X2 - X0) * (Y1 - Y0)
        # area > 0: clockwise seen by the camera (y-down image), a back face; corners 1 and 2
        # are swapped so that the edge functions are positive inside
        back = area > 0
        good &= (i0 <= i1) & (j0 <= j1) & (area != 0)
        if cull_backfaces:
            good &= ~back
        X1, X2 = torch.where(back, X2, X1), torch.where(back, X1, X2)
        Y1, Y2 = torch.where(back, Y2, Y1), torch.where(back, Y1, Y2)
        w1, w2 = torch.where(back, w2, w1), torch.where(back, w1, w2)
        area = area.abs()
        sel = torch.nonzero(good).squeeze(1)
        nx = (j1 - j0 + 1)[sel]
        count = nx * (i1 - i0 + 1)[sel]
        zbuf_key = torch.full((N * H * W,), _EMPTY, dtype=torch.int64, device=dev)
        if sel.numel():
            ends = torch.cumsum(count, 0)
            total = int(ends[-1])
            # chunk boundaries on the candidate count; a triangle never straddles two chunks
            marks = torch.arange(max_candidates, max(total, max_candidates), max_candidates,
                                 device=dev)
            cuts = torch.searchsorted(ends, marks, right=True).tolist()
            bounds = [0] + sorted(set(cuts) - {0, sel.numel()}) + [sel.numel()]
            sign = -1.0 if persp else 1.0  # nearer = larger 1/w
            for s, e in itertools.pairwise(bounds):
                if s >= e:
                    continue
                t = sel[s:e]
                cnt = count[s:e]
                tc = torch.repeat_interleave(torch.arange(e - s, device=dev), cnt)
                start = torch.cumsum(cnt, 0) - cnt
                o = torch.arange(tc.numel(), device=dev) - start[tc]
                tt = t[tc]
                nxc = nx[s:e][tc]
                i = i0[tt] + torch.div(o, nxc, rounding_mode="floor")
                j = j0[tt] + o % nxc
                px = j * 256 + 128
                py = i * 256 + 128
                x0, y0, x1, y1, x2, y2 = X0[tt], Y0[tt], X1[tt], Y1[tt], X2[tt], Y2[tt]
                dy12, dx12 = y2 - y1, x2 - x1
                dy20, dx20 = y0 - y2, x0 - x2
                dy01, dx01 = y1 - y0, x1 - x0
                e0 = (px - x1) * dy12 - (py - y1) * dx12
                e1 = (px - x2) * dy20 - (py - y2) * dx20
                e2 = (px - x0) * dy01 - (py - y0) * dx01
                # top-left rule: an edge function of 0 counts only on a left or top edge
                inside = ((e0 > 0) | ((e0 == 0) & ((dy12 > 0) | ((dy12 == 0) & (dx12 < 0))))) \
                    & ((e1 > 0) | ((e1 == 0) & ((dy20 > 0) | ((dy20 == 0) & (dx20 < 0))))) \
                    & ((e2 > 0) | ((e2 == 0) & ((dy01 > 0) | ((dy01 == 0) & (dx01 < 0)))))
                k = torch.nonzero(inside).squeeze(1)
                tt, i, j = tt[k], i[k], j[k]
                key = ((e0[k].double() * w0[tt] + e1[k].double() * w1[tt]
                        + e2[k].double() * w2[tt]) * (sign / area[tt].double()))
                n_img = torch.div(tt, F, rounding_mode="floor")
                face = tt - n_img * F
                packed = (_sortable(key.to(torch.float32)) << _FACE_BITS) | face
                zbuf_key.scatter_reduce_(0, (n_img * H + i) * W + j, packed, reduce="amin")
        covered = zbuf_key != _EMPTY
        p2f = torch.where(covered, zbuf_key & ((1 << _FACE_BITS) - 1),
                          torch.full_like(zbuf_key, -1))
        bary, depth = _resolve(p, tris, p2f, covered, H, W, persp)
        return Fragments(p2f.view(N, H, W).to(torch.int32), bary.view(N, H, W, 3),
                         depth.view(N, H, W))


def _resolve(p, tris, p2f, covered, H, W, persp):
    """Barycentrics and depth of the winning face at each covered pixel centre from the
    unsnapped float64 positions (as numba's ``_resolve_row``; centroid weights for a face
    that is degenerate in float but not after snapping). p2f, covered: (N*H*W,)."""
    dev = p.device
    NHW = p2f.numel()
    bary = torch.zeros((NHW, 3), dtype=torch.float32, device=dev)
    depth = torch.full((NHW,), float("inf"), dtype=torch.float32, device=dev)
    q = torch.nonzero(covered).squeeze(1)
    if not q.numel():
        return bary, depth
    n = torch.div(q, H * W, rounding_mode="floor")
    rem = q - n * H * W
    i = torch.div(rem, W, rounding_mode="floor")
    j = rem - i * W
    corners = tris[p2f[q]]  # (P, 3)
    v = p[n[:, None], corners]  # (P, 3, 3)
    cx = j.double() + 0.5
    cy = i.double() + 0.5
    x0, y0, x1, y1, x2, y2 = v[:, 0, 0], v[:, 0, 1], v[:, 1, 0], v[:, 1, 1], v[:, 2, 0], v[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    fine = area.abs() > 1e-12
    inv = 1.0 / torch.where(fine, area, torch.ones_like(area))
    third = torch.full_like(area, 1.0 / 3.0)
    l0 = torch.where(fine, ((x1 - cx) * (y2 - cy) - (x2 - cx) * (y1 - cy)) * inv, third)
    l1 = torch.where(fine, ((x2 - cx) * (y0 - cy) - (x0 - cx) * (y2 - cy)) * inv, third)
    l2 = torch.where(fine, 1.0 - l0 - l1, third)
    lam = torch.stack([l0, l1, l2], -1)
    if persp:
        qq = lam / v[:, :, 2]
        z = 1.0 / qq.sum(-1)
        lam = qq * z[:, None]
    else:
        z = (lam * v[:, :, 2]).sum(-1)
    bary[q] = lam.to(torch.float32)
    depth[q] = z.to(torch.float32)
    return bary, depth
