"""Joint image/mask augmentation for whole batches on the training device.

Per-sample Python transforms cost more than the forward pass of a small U-Net on a CPU; here every
random parameter is drawn per sample, but the warps and intensity changes run as a few batched
tensor ops. Geometry goes through one affine grid (+ optional elastic field) so the image and its
mask move together exactly. Random draws come from a CPU generator: identical on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from busiseg.params import AugmentParams


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _affine_theta(p: AugmentParams, n: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample 2×3 matrices for affine_grid (normalised coordinates, output → input)."""
    angle = _uniform(gen, n, -p.rotate, p.rotate) * (math.pi / 180)
    scale = 1 + _uniform(gen, n, -p.scale, p.scale)
    tx, ty = (_uniform(gen, n, -2 * p.shift, 2 * p.shift) for _ in range(2))
    fx = torch.where(torch.rand(n, generator=gen) < p.hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < p.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * fx, -sin * fy, tx], dim=1),
        torch.stack([sin * fx, cos * fy, ty], dim=1),
    ], dim=1)
    return theta


def _elastic(grid: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Smooth random displacement: coarse noise upsampled, in pixels of a 256×256 image."""
    n, h, w, _ = grid.shape
    coarse = torch.randn(n, 2, 5, 5, generator=gen) * (2 * strength / 256)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    return grid + field.to(grid.device, grid.dtype).permute(0, 2, 3, 1)


def _blur(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = _uniform(gen, len(x), 0.5, 1.5).to(x.device)
    r = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # n×5, separable
    n, c, h, w = x.shape
    xb = x.reshape(1, n * c, h, w)
    kc = k.repeat_interleave(c, 0)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kc[:, None, None, :], groups=n * c)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), kc[:, None, :, None], groups=n * c)
    return torch.where(mask.view(n, 1, 1, 1).to(x.device), xb.reshape(n, c, h, w), x)


def augment_batch(x: torch.Tensor, y: torch.Tensor, p: AugmentParams,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float images in [0, 1], N×C×H×W; y: float masks in {0, 1}, N×1×H×W; on any device.
    The geometry is shared by every channel and the mask; intensity changes are drawn per
    image and applied alike to its channels."""
    n = len(x)
    dev = x.device
    warp = p.rotate > 0 or p.scale > 0 or p.shift > 0 or p.elastic > 0
    if warp:
        theta = _affine_theta(p, n, gen).to(dev, torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if p.elastic > 0:
            grid = _elastic(grid, p.elastic, gen)
        x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        y = (F.grid_sample(y, grid.to(y.dtype), mode="bilinear", padding_mode="zeros",
                           align_corners=False) > 0.5).to(y.dtype)
    elif p.hflip > 0 or p.vflip > 0:
        fx = (torch.rand(n, generator=gen) < p.hflip).to(dev).view(n, 1, 1, 1)
        fy = (torch.rand(n, generator=gen) < p.vflip).to(dev).view(n, 1, 1, 1)
        x = torch.where(fx, x.flip(-1), x)
        y = torch.where(fx, y.flip(-1), y)
        x = torch.where(fy, x.flip(-2), x)
        y = torch.where(fy, y.flip(-2), y)
    if p.brightness > 0 or p.contrast > 0:
        b = _uniform(gen, n, -p.brightness, p.brightness).to(dev, x.dtype).view(n, 1, 1, 1)
        c = (1 + _uniform(gen, n, -p.contrast, p.contrast)).to(dev, x.dtype).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean + b
    if p.gamma > 0:
        g = torch.exp(_uniform(gen, n, -p.gamma, p.gamma)).to(dev, x.dtype).view(n, 1, 1, 1)
        x = x.clamp(0, 1) ** g
    if p.blur > 0:
        x = _blur(x, torch.rand(n, generator=gen) < p.blur, gen)
    if p.noise > 0:
        noise = torch.randn(x.shape, generator=gen).to(dev, x.dtype)
        x = x * (1 + p.noise * noise)
    return x.clamp(0, 1), y
