"""Segmentation networks, built from small blocks and chosen by name from ``params.yaml``.

Every arch is a row of the ``ARCHS`` table under the name that ``model.arch`` uses, so the pipeline
never imports a class directly and a new arch needs no change outside this file. All models map
``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``; the loss applies the sigmoid.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from busiseg.errors import BusisegError, first_line

__all__ = [
    "ARCHS",
    "Arch",
    "AttentionGate",
    "CompactNet",
    "ConvNormAct",
    "DoubleConv",
    "FoldEnsemble",
    "ResidualBlock",
    "SMP_DECODERS",
    "SegModel",
    "SmpModel",
    "UNet",
    "UNetPlusPlus",
    "Up",
    "arch_settings",
    "build_model",
    "check_input_size",
    "is_smp",
    "list_archs",
]

NORMS = ("batch", "instance", "group", "none")
UPS = ("transpose", "bilinear")
MAX_DEPTH = 6

BlockFn = Callable[[int, int, float], nn.Module]  # (in_ch, out_ch, dropout) -> block


# --------------------------------------------------------------------------------------------
# Validation: every message names the params.yaml key so the user knows what to edit.
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and value >= lo and (hi is None or value <= hi):
        return value
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    raise BusisegError(f"model.{name} must be {want}, got {value!r}")


def _check_fraction(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and 0.0 <= value < 1.0:
        return float(value)
    raise BusisegError(f"model.{name} must be a number in [0, 1), got {value!r}")


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise BusisegError(f"model.{name} must be true or false, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise BusisegError(f"model.{name} {value!r} is unknown; choose one of: {', '.join(choices)}")


def _check_common(
    in_channels: int, out_channels: int, base: int, depth: int, norm: str, dropout: float, up: str
) -> None:
    _check_int("in_channels", in_channels, 1)
    _check_int("out_channels", out_channels, 1)
    _check_int("base", base, 1)
    _check_int("depth", depth, 1, MAX_DEPTH)
    _check_choice("norm", norm, NORMS)
    _check_fraction("dropout", dropout)
    _check_choice("up", up, UPS)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Assemblies
# --------------------------------------------------------------------------------------------


class SegModel(nn.Module):
    """What the trainer relies on besides ``forward``: the size constraint, whether training
    returns several outputs, and the kwargs to rebuild it (set by :func:`build_model`)."""

    size_divisor: int = 1
    deep_supervision: bool = False
    config: dict[str, Any]


def _block_fn(kind: str, norm: str) -> BlockFn:
    if kind == "residual":
        return lambda i, o, p: ResidualBlock(i, o, norm, p)
    return lambda i, o, p: DoubleConv(i, o, norm, p)


def _encoder(in_channels: int, chs: list[int], block: BlockFn, dropout: float) -> nn.ModuleList:
    """Levels 0..depth; dropout sits in the two deepest levels, where the original U-Net put it
    (end of the contracting path), since that is where the parameters and over-fitting are."""
    depth = len(chs) - 1
    drop = [dropout if i >= depth - 1 else 0.0 for i in range(depth + 1)]
    levels: list[nn.Module] = [block(in_channels, chs[0], drop[0])]
    for i in range(1, depth + 1):
        levels.append(nn.Sequential(nn.MaxPool2d(2), block(chs[i - 1], chs[i], drop[i])))
    return nn.ModuleList(levels)


class UNet(SegModel):
    """U-Net (Ronneberger et al. 2015); ``block``/``attention`` turn it into ResUNet or Attention
    U-Net so the three differ in exactly one idea."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        base: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        up: str = "transpose",
        block: str = "double",
        attention: bool = False,
    ) -> None:
        super().__init__()
        _check_common(in_channels, out_channels, base, depth, norm, dropout, up)
        self.depth = depth
        self.size_divisor = 2**depth
        chs = [base * 2**i for i in range(depth + 1)]
        make_block = _block_fn(block, norm)
        self.encoder = _encoder(in_channels, chs, make_block, dropout)
        fuse = lambda a, b: make_block(a, b, 0.0)  # noqa: E731
        ups = []
        for i in reversed(range(depth)):
            gate = None
            if attention:
                gate = AttentionGate(chs[i + 1], chs[i], max(1, chs[i] // 2), norm)
            ups.append(Up(chs[i + 1], chs[i], chs[i], up=up, block=fuse, gate=gate))
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv2d(chs[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(self, x.shape[-2], x.shape[-1])
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for step in self.decoder:
            x = step(x, skips.pop())
        return self.head(x)


class UNetPlusPlus(SegModel):
    """UNet++ (Zhou et al. 2018): dense nested skips narrow the semantic gap between encoder and
    decoder features; the top-row heads allow deep supervision and later pruning.

    Node X[i][j] (level i, column j) fuses X[i][0..j-1] with the upsampled X[i+1][j-1].
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        base: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        up: str = "transpose",
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        _check_common(in_channels, out_channels, base, depth, norm, dropout, up)
        self.deep_supervision = _check_bool("deep_supervision", deep_supervision)
        self.depth = depth
        self.size_divisor = 2**depth
        chs = [base * 2**i for i in range(depth + 1)]
        make_block = _block_fn("double", norm)
        self.encoder = _encoder(in_channels, chs, make_block, dropout)
        self.ups = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                self.ups[f"{i}_{j}"] = make_up(up, chs[i + 1], chs[i])
                self.nodes[f"{i}_{j}"] = make_block((j + 1) * chs[i], chs[i], 0.0)
        # heads[k] reads X[0][depth - k]: the final node first, as the loss expects.
        n_heads = depth if self.deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(chs[0], out_channels, 1) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input_size(self, x.shape[-2], x.shape[-1])
        grid: list[list[torch.Tensor]] = []
        for level in self.encoder:
            x = level(x)
            grid.append([x])
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                key = f"{i}_{j}"
                coarse = self.ups[key](grid[i + 1][j - 1])
                grid[i].append(self.nodes[key](torch.cat([*grid[i], coarse], dim=1)))
        if self.deep_supervision and self.training:
            return [head(grid[0][self.depth - k]) for k, head in enumerate(self.heads)]
        return self.heads[0](grid[0][self.depth])


class CompactNet(SegModel):
    """Small skip-less encoder-decoder (ELU, batch norm, dropout) as used for BUS baselines: it
    shows how much the U-Net skips actually buy on this data.

    Widths base, 2*base, 4*base down to 1/8 resolution; the decoder climbs back to 1/2 resolution
    and base/2 channels, and a final bilinear upsampling restores the input size.
    """

    size_divisor = 8

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, base: int = 64, dropout: float = 0.2
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("out_channels", out_channels, 1)
        _check_int("base", base, 1)
        _check_fraction("dropout", dropout)

        def conv2(i: int, o: int) -> DoubleConv:
            return DoubleConv(i, o, "batch", 0.0, act=lambda: nn.ELU(inplace=True))

        def drop() -> nn.Module:
            return nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

        c1, c2, c3, c_out = base, 2 * base, 4 * base, max(1, base // 2)
        self.encoder = nn.Sequential(
            conv2(in_channels, c1), nn.MaxPool2d(2), drop(),
            conv2(c1, c2), nn.MaxPool2d(2), drop(),
            conv2(c2, c3), nn.MaxPool2d(2), drop(),
        )  # fmt: skip
        self.bottleneck = nn.Sequential(conv2(c3, c3), drop())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, 2, stride=2), conv2(c2, c2), drop(),
            nn.ConvTranspose2d(c2, c1, 2, stride=2), conv2(c1, c_out), drop(),
        )  # fmt: skip
        self.head = nn.Conv2d(c_out, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(self, x.shape[-2], x.shape[-1])
        size = x.shape[-2:]
        y = self.decoder(self.bottleneck(self.encoder(x)))
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.head(y)


SMP_DECODERS = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3",
                "deeplabv3plus", "upernet", "segformer")
"""segmentation_models_pytorch's decoders by its own lower-case names (`smp.create_model`). Left
out: DPT (needs a vision-transformer encoder) and PAN (fails below 128 px, e.g. the demo's 96)."""


class SmpModel(SegModel):
    """A segmentation_models_pytorch encoder-decoder: the way to ImageNet-pretrained encoders.
    Built with random weights (so a model file rebuilds it offline, without the pretrained file);
    `busiseg.pretrained` loads the encoder's weights before training."""

    size_divisor = 32  # five 2x down-samplings in every smp encoder at depth 5

    def __init__(self, in_channels: int = 1, out_channels: int = 1, decoder: str = "unet",
                 encoder: str = "tu-tf_efficientnet_lite0") -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("out_channels", out_channels, 1)
        self.decoder_name = decoder
        import segmentation_models_pytorch as smp  # imported here: zoo-only runs never pay for it

        names = smp.encoders.get_encoder_names()
        if not isinstance(encoder, str) or not (encoder in names or encoder.startswith("tu-")):
            near = difflib.get_close_matches(str(encoder), names, n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise BusisegError(
                f"model.encoder {encoder!r} is not an encoder segmentation_models_pytorch knows; "
                f"{hint}list them with python -c 'import segmentation_models_pytorch as s; "
                f"print(s.encoders.get_encoder_names())', or use tu-<timm model name>")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # smp's note on timm- names
            try:
                self.net = smp.create_model(decoder, encoder_name=encoder, encoder_weights=None,
                                            in_channels=in_channels, classes=out_channels)
            except Exception as exc:  # noqa: BLE001 - smp/timm refuse combinations in many ways
                raise BusisegError(f"model.encoder {encoder!r} does not build with "
                                   f"segmentation_models_pytorch {decoder!r}: "
                                   f"{first_line(exc, 200)}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FoldEnsemble(nn.Module):
    """The fold models of a cross-validation run as one model: the mean of the members'
    probabilities, returned as logits, so TTA, evaluate, predict and ONNX export treat it like
    any single model."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.size_divisor = max(int(getattr(m, "size_divisor", 1)) for m in members)
        self.config = {**members[0].config, "members": len(members)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        prob = prob.clamp(1e-7, 1 - 1e-7)  # finite logits; 1e-7 is far from any threshold
        return torch.log(prob) - torch.log1p(-prob)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One row of the table: the assembly, the settings that make this arch what it is (not
    settable from params.yaml), and a line for the README."""

    model: type[SegModel]
    fixed: dict[str, Any] = field(default_factory=dict)
    about: str = ""


ARCHS: dict[str, Arch] = {
    "unet": Arch(UNet, {"block": "double", "attention": False},
                 "classic U-Net, the reference every other arch is compared with"),
    "attention_unet": Arch(UNet, {"block": "double", "attention": True},
                           "U-Net with attention-gated skips (Oktay et al. 2018)"),
    "res_unet": Arch(UNet, {"block": "residual", "attention": False},
                     "U-Net with residual blocks at every level"),
    "unet_plus_plus": Arch(UNetPlusPlus, {},
                           "UNet++ with optional deep supervision (Zhou et al. 2018)"),
    "compact": Arch(CompactNet, {}, "skip-less encoder-decoder baseline"),
    **{f"smp_{name}": Arch(SmpModel, {"decoder": name},
                           f"segmentation_models_pytorch {name}, any smp encoder (model.encoder)")
       for name in SMP_DECODERS},
}


def is_smp(arch: str) -> bool:
    """segmentation_models_pytorch archs take an encoder (and its weights) instead of the zoo's
    width and depth."""
    return isinstance(arch, str) and arch.startswith("smp_")


def list_archs() -> list[str]:
    return sorted(ARCHS)


def arch_settings(arch: str) -> dict[str, inspect.Parameter]:
    """The keyword settings params.yaml may give this arch (`model.*`), with their defaults."""
    if not isinstance(arch, str) or arch not in ARCHS:
        _check_choice("arch", arch, list_archs())
    row = ARCHS[arch]
    params = inspect.signature(row.model).parameters
    return {k: v for k, v in params.items() if k not in row.fixed}


def build_model(arch: str, in_channels: int = 1, out_channels: int = 1, **kw: Any) -> nn.Module:
    """The one way the pipeline makes a model, so params.yaml mistakes fail early with a message
    naming the key, and ``model.config`` always round-trips through ``build_model(**config)``."""
    params = arch_settings(arch)
    allowed = [p for p in params if p not in ("in_channels", "out_channels")]
    unknown = sorted(k for k in kw if k not in allowed)
    if unknown:
        names = ", ".join(f"model.{k}" for k in unknown)
        verb = "is not a parameter" if len(unknown) == 1 else "are not parameters"
        raise BusisegError(
            f"{names} {verb} of model.arch {arch!r}; choose from: {', '.join(allowed)}"
        )
    row = ARCHS[arch]
    model = row.model(in_channels=in_channels, out_channels=out_channels, **row.fixed, **kw)
    given = {"in_channels": in_channels, "out_channels": out_channels, **kw}
    config: dict[str, Any] = {"arch": arch}
    for name, p in params.items():
        value = given.get(name, p.default)
        if isinstance(p.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # YAML's "dropout: 0" should still read back as a float
        config[name] = value
    model.config = config
    return model


def check_input_size(model: nn.Module, height: int, width: int) -> None:
    """Fails with advice instead of a shape mismatch deep inside a skip concatenation."""
    n = int(getattr(model, "size_divisor", 1))
    if height % n == 0 and width % n == 0:
        return
    if isinstance(getattr(model, "depth", None), int):
        raise BusisegError(
            f"input size {height}x{width} is not divisible by {n} (2**model.depth); "
            f"choose preprocess.size as a multiple of {n} or lower model.depth"
        )
    raise BusisegError(
        f"input size {height}x{width} is not divisible by {n} (required by model.arch "
        f"{getattr(model, 'config', {}).get('arch', type(model).__name__)!r}); "
        f"choose preprocess.size as a multiple of {n}"
    )
