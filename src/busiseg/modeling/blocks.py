"""The building blocks of the zoo's networks (after milesial's unet_parts): convolution, norm and
activation, the U-Net level, residual and attention-gated variants, and the decoder step. Each
check names the `model.*` key a user edits, since they are built straight from params.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from busiseg.errors import BusisegError

NORMS = ("batch", "instance", "group", "none")
UPS = ("transpose", "bilinear")
MAX_DEPTH = 6


# ---- validation: every message names the params.yaml key so the user knows what to edit ----


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and value >= lo and (hi is None or value <= hi):
        return value
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    raise BusisegError(f"model.{name} must be {want}, got {value!r}")


def check_fraction(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and 0.0 <= value < 1.0:
        return float(value)
    raise BusisegError(f"model.{name} must be a number in [0, 1), got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise BusisegError(f"model.{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise BusisegError(f"model.{name} {value!r} is unknown; choose one of: {', '.join(choices)}")


def check_common(
    in_channels: int, out_channels: int, base: int, depth: int, norm: str, dropout: float, up: str
) -> None:
    check_int("in_channels", in_channels, 1)
    check_int("out_channels", out_channels, 1)
    check_int("base", base, 1)
    check_int("depth", depth, 1, MAX_DEPTH)
    check_choice("norm", norm, NORMS)
    check_fraction("dropout", dropout)
    check_choice("up", up, UPS)


# ---- blocks -----------------------------------------------------------------------------------


def _group_count(channels: int) -> int:
    """Largest divisor of ``channels`` up to 8, so GroupNorm works at any width (even base=3)."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def make_norm(kind: str, channels: int) -> nn.Module:
    """Instance/group norm exist because batch statistics are noisy at the small batches that
    full-resolution ultrasound forces on a single GPU."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise BusisegError(f"model.norm {kind!r} is unknown; choose one of: {', '.join(NORMS)}")


def make_up(mode: str, in_ch: int, out_ch: int) -> nn.Module:
    """Doubles resolution and changes width.

    For ``bilinear`` the 1x1 conv runs *before* the upsampling: both are linear (and bilinear
    weights sum to 1, so the bias commutes too), hence the result is identical at 1/4 the cost.
    """
    if mode == "transpose":
        return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
    if mode == "bilinear":
        return nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel_size=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
    raise BusisegError(f"model.up {mode!r} is unknown; choose one of: {', '.join(UPS)}")


class ConvNormAct(nn.Sequential):
    """Conv, norm, activation; the conv bias is dropped when a norm's shift makes it redundant."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        norm: str = "batch",
        act: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
        kernel_size: int = 3,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
            make_norm(norm, out_ch),
            act(),
        )


class DoubleConv(nn.Sequential):
    """The U-Net level: two 3x3 convs widen the receptive field before each resolution change."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        norm: str = "batch",
        dropout: float = 0.0,
        act: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
    ) -> None:
        layers: list[nn.Module] = [
            ConvNormAct(in_ch, out_ch, norm, act),
            ConvNormAct(out_ch, out_ch, norm, act),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Double conv with an identity path, which keeps gradients alive in deep/wide encoders."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=bias), make_norm(norm, out_ch))
        )
        self.act = nn.ReLU(inplace=True)
        self.drop: nn.Module = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.drop(self.act(y + self.shortcut(x)))


class AttentionGate(nn.Module):
    """Additive attention (Oktay et al. 2018): the coarser decoder state decides which skip pixels
    pass, suppressing echo texture far from the lesion.

    ``x`` is brought down to ``g``'s resolution by a strided 2x2 conv (as in the paper) rather than
    ``g`` up, so the gate costs a quarter of the work; the 1-channel map is then upsampled.
    """

    def __init__(self, g_ch: int, x_ch: int, inter_ch: int, norm: str = "batch") -> None:
        super().__init__()
        bias = norm == "none"
        self.w_x = nn.Sequential(
            nn.Conv2d(x_ch, inter_ch, 2, stride=2, bias=bias), make_norm(norm, inter_ch)
        )
        self.w_g = nn.Sequential(nn.Conv2d(g_ch, inter_ch, 1, bias=bias), make_norm(norm, inter_ch))
        self.psi = nn.Conv2d(inter_ch, 1, 1)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.w_g(g) + self.w_x(x))))
        alpha = F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * alpha.to(x.dtype)


class Up(nn.Module):
    """Decoder step: upsample, optionally gate the skip, concatenate, fuse with a block."""

    def __init__(
        self,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        *,
        up: str,
        block: Callable[[int, int], nn.Module],
        gate: AttentionGate | None = None,
    ) -> None:
        super().__init__()
        self.up = make_up(up, in_ch, skip_ch)
        self.gate = gate
        self.block = block(2 * skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            skip = self.gate(x, skip)
        return self.block(torch.cat([skip, self.up(x)], dim=1))


class PresenceHead(nn.Module):
    """Is there a lesion at all? One logit per image from the deepest features, pooled: the
    question a pixel map answers only indirectly, and normal breasts need answered."""

    def __init__(self, channels: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))
