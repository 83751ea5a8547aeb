"""Loss terms, and the pluggable interface for extra (adversarial, perceptual, ...) terms.

Every term maps a prediction and a target, both (B, C, H, W) float, to a scalar tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error; (B,C,H,W) x2 -> ()."""
    return (pred - target).abs().mean()


def symmetry(pred: torch.Tensor, mirror: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean |pred - mirror(pred)|: a completed UV map should match its bilateral mirror."""
    return (pred - mirror(pred)).abs().mean()


def total_variation(pred: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of vertical and horizontal neighbours."""
    dy = (pred[..., 1:, :] - pred[..., :-1, :]).abs().mean()
    dx = (pred[..., :, 1:] - pred[..., :, :-1]).abs().mean()
    return dx + dy


class LossHook(nn.Module):
    """An extra loss term the trainer adds to a task's loss: ``weight * self(pred, target, batch)``.

    Subclasses implement ``forward(pred, target, batch) -> ()`` (gradients flow into ``pred``).
    A hook that trains networks of its own (a discriminator) overrides ``step``, which the
    trainer calls once per training step after the generator update with detached tensors,
    and keeps its optimizer in ``self.optimizer``; its ``state_dict`` (modules and optimizer)
    goes into checkpoints, so resume stays exact.

    Attributes:
        name: the key under which the term is logged (``loss_<name>``).
        weight: the term's weight in the total loss.
    """

    name: str = "hook"

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)
        self.optimizer: torch.optim.Optimizer | None = None

    def step(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> dict[str, float]:
        """Update the hook's own parameters, if any; returns values to log."""
        return {}

    def hook_state(self) -> dict:
        state = {"modules": self.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_hook_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


def _average_grads_across_ranks(module: nn.Module) -> None:
    """Under DDP, a hook's own networks are not wrapped: average their gradients by hand so
    every rank takes the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


class PatchDiscriminator(nn.Module):
    """A PatchGAN critic: (B, C, H, W) -> (B, 1, H/4, W/4) real/fake logits."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(math.gcd(2 * width, 8), 2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdversarialLoss(LossHook):
    """Non-saturating GAN term with a PatchGAN discriminator trained in ``step``.

    Generator term: ``softplus(-D(pred)).mean()``; discriminator: ``softplus(-D(real)) +
    softplus(D(fake))``. The discriminator's parameters are never touched by the generator's
    optimizer (the trainer only optimises the task network).
    """

    name = "adversarial"

    def __init__(self, weight: float, in_channels: int = 3, width: int = 32, lr: float = 2e-4,
                 discriminator: nn.Module | None = None):
        super().__init__(weight)
        self.discriminator = discriminator or PatchDiscriminator(in_channels, width)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def forward(self, pred, target, batch):
        self.discriminator.requires_grad_(False)
        try:
            return F.softplus(-self.discriminator(pred)).mean()
        finally:
            self.discriminator.requires_grad_(True)

    def step(self, pred, target, batch):
        pred, target = pred.detach().float(), target.detach().float()
        d_loss = F.softplus(-self.discriminator(target)).mean() + F.softplus(self.discriminator(pred)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        _average_grads_across_ranks(self.discriminator)
        self.optimizer.step()
        return {"loss_discriminator": float(d_loss.detach())}


class RandomFeatures(nn.Module):
    """A fixed, randomly initialised conv feature pyramid (seeded): a perceptual-loss feature
    extractor that needs no downloaded weights. Returns a list of feature maps."""

    def __init__(self, in_channels: int = 3, width: int = 16, levels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c = [], in_channels
        for i in range(levels):
            conv = nn.Conv2d(c, width * 2**i, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (9 * c)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            c = width * 2**i
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.layers:
            x = F.relu(conv(x))
            feats.append(x)
        return feats


class PerceptualLoss(LossHook):
    """Mean L1 distance between feature maps of a frozen extractor.

    Args:
        features: any module mapping (B, C, H, W) to a list of feature maps (e.g. a truncated
            VGG, if you have its weights); default :class:`RandomFeatures`.
    """

    name = "perceptual"

    def __init__(self, weight: float, features: nn.Module | None = None, in_channels: int = 3):
        super().__init__(weight)
        self.features = features or RandomFeatures(in_channels)
        self.features.requires_grad_(False)
        self.features.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen extractor: never switch normalisation layers to train
        return self

    def forward(self, pred, target, batch):
        fp = self.features(pred)
        with torch.no_grad():
            ft = self.features(target)
        return sum((a - b).abs().mean() for a, b in zip(fp, ft, strict=True)) / len(fp)
