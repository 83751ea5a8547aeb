"""Compact encoder-decoder networks with skip connections, and the UV mirror operator.

All modules take and return NCHW float tensors. ``UNet`` is fully convolutional: any input
size works (it pads to a multiple of ``2**depth`` and crops back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ConvBlock(nn.Sequential):
    """(conv3x3 -> GroupNorm -> SiLU) x 2. GroupNorm, not BatchNorm: batch-size independent,
    identical in train/eval and needs no sync under DDP."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
            nn.SiLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout),
            nn.SiLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.block = ConvBlock(2 * cskip, cskip)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([self.reduce(x), skip], dim=1))


class UNet(nn.Module):
    """A small U-Net.

    Args:
        in_channels, out_channels: C_in, C_out.
        width: channels at full resolution; level i has ``min(width * 2**i, max_width)``.
        depth: number of stride-2 down-sampling levels.

    Shape:
        (B, C_in, H, W) -> (B, C_out, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16, depth: int = 3,
                 max_width: int = 256):
        super().__init__()
        ch = [min(width * 2**i, max_width) for i in range(depth + 1)]
        self.depth = depth
        self.stem = ConvBlock(in_channels, ch[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1), ConvBlock(ch[i + 1], ch[i + 1]))
            for i in range(depth))
        self.up = nn.ModuleList(_Up(ch[i + 1], ch[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = [self.stem(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for u in self.up:
            y = u(y, skips.pop())
        return self.head(y)[..., :h, :w]


class UVMirror(nn.Module):
    """Maps every texel to its bilateral mirror: ``out[..., r, c] = x[..., src(r, c)]``.

    Args:
        index: None for a horizontal flip (a left-right symmetric UV layout), or a LongTensor
            (S, S) of flat source indices into S*S, or (S, S, 2) of (row, col) source texels
            (as ``meshops.uv.uv_mirror_map`` returns). Negative entries (no mirror, or a texel
            outside the layout) map the texel to itself.

    Shape:
        (B, C, S, S) -> (B, C, S, S)
    """

    def __init__(self, index: torch.Tensor | None = None):
        super().__init__()
        if index is not None:
            index = torch.as_tensor(index)
            if index.dtype.is_floating_point:
                raise ValueError(f"UV mirror index must be integer, got {index.dtype}")
            if index.ndim == 3 and index.shape[-1] == 2 and index.shape[0] == index.shape[1]:
                none = (index < 0).any(-1)
                index = index[..., 0].long() * index.shape[1] + index[..., 1].long()
                index[none] = -1
            if index.ndim != 2 or index.shape[0] != index.shape[1]:
                raise ValueError(f"UV mirror index must be (S,S) or (S,S,2), got {tuple(index.shape)}")
            index = index.long()
            n = index.numel()
            if int(index.max()) >= n:
                raise ValueError(f"UV mirror index has entries outside [0, {n})")
            own = torch.arange(n).view_as(index)
            index = torch.where(index < 0, own, index)
        self.register_buffer("index", index, persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return torch.flip(x, dims=(-1,))
        if x.shape[-2:] != self.index.shape:
            raise ValueError(f"UV map {tuple(x.shape[-2:])} does not match mirror index "
                             f"{tuple(self.index.shape)}")
        flat = x.flatten(-2)
        return flat[..., self.index.flatten()].view_as(x)

    @staticmethod
    def flip_index(size: int) -> torch.Tensor:
        """The (S, S) flat index equivalent to a horizontal flip."""
        r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        return r * size + (size - 1 - c)

    @classmethod
    def from_file(cls, path: str | Path, key: str = "mirror_map") -> UVMirror:
        """From an ``.npy`` array, or the ``key`` array of an ``.npz`` (the pseudo-GT flow's
        ``dataset/uv_regions.npz`` holds ``mirror_map``). No pickle."""
        import numpy as np
        from facecorpus.core.errors import InputError

        try:
            arr = np.load(path, allow_pickle=False)
            if isinstance(arr, np.lib.npyio.NpzFile):
                with arr:
                    if key not in arr.files:
                        raise InputError(f"{path}: no array {key!r} (has {arr.files})")
                    arr = arr[key]
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read UV mirror index ({e})") from e
        try:
            return cls(torch.from_numpy(np.ascontiguousarray(arr)))
        except ValueError as e:
            raise InputError(f"{path}: {e}") from e


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads and predicts. ``inputs`` and ``target`` are dataset field names."""

    name: str
    inputs: tuple[str, ...]
    target: str
    in_channels: int
    out_channels: int


TASKS: dict[str, TaskSpec] = {
    "pncc": TaskSpec("pncc", ("image",), "pncc", 3, 3),
    "inpaint": TaskSpec("inpaint", ("uv_visible", "uv_visible_mask"), "uv_pseudo_gt", 6, 3),
    "position": TaskSpec("position", ("image",), "uv_position", 3, 3),
}


class TaskNet(nn.Module):
    """A U-Net plus the task's input assembly.

    ``forward(inputs)`` takes the normalised input fields as NCHW floats (masks as (B,1,H,W)):
    - pncc / position: ``{"image": (B,3,H,W)}`` -> (B,3,H,W) (position: resized to ``out_size``)
    - inpaint: ``{"uv_visible": (B,3,S,S), "uv_visible_mask": (B,1,S,S)}`` -> (B,3,S,S); the
      network sees the masked map concatenated with its mirror (6 channels).
    """

    def __init__(self, task: str, width: int = 16, depth: int = 3, max_width: int = 256,
                 mirror: UVMirror | None = None, out_size: tuple[int, int] | None = None):
        super().__init__()
        self.spec = TASKS[task]
        self.net = UNet(self.spec.in_channels, self.spec.out_channels, width, depth, max_width)
        self.mirror = mirror if mirror is not None else UVMirror()
        self.out_size = tuple(out_size) if out_size else None

    def assemble(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.spec.name == "inpaint":
            vis = inputs["uv_visible"] * inputs["uv_visible_mask"]
            return torch.cat([vis, self.mirror(vis)], dim=1)
        return inputs["image"]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.net(self.assemble(inputs))
        if self.out_size is not None and tuple(y.shape[-2:]) != self.out_size:
            y = F.interpolate(y, size=self.out_size, mode="bilinear", align_corners=False)
        return y
