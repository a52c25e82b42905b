"""The assemblies (after milesial's unet_model): U-Net and its attention and residual variants,
UNet++, a skip-less baseline, segmentation_models_pytorch's encoder-decoders, and the fold
ensemble. All map (B, in_channels, H, W) to logits (B, out_channels, H, W); the loss applies the
sigmoid. Which of them `model.arch` names is the registry's table.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from busiseg.errors import BusisegError, first_line
from busiseg.modeling.blocks import (
    AttentionGate,
    DoubleConv,
    PresenceHead,
    ResidualBlock,
    Up,
    check_bool,
    check_common,
    check_fraction,
    check_int,
    make_up,
)

BlockFn = Callable[[int, int, float], nn.Module]  # (in_ch, out_ch, dropout) -> block




def split_output(out):
    """(mask logits, presence logits N×1 or None) of any model's output: a model built with
    `presence` returns both, others the mask logits (or a list of them, deep supervision)."""
    if isinstance(out, tuple) and len(out) == 2 and out[1].ndim == 2:
        return out
    return out, None


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

    # one keyword per model.* param: the registry reads this signature for what params.yaml may set
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
        presence: bool = False,
    ) -> None:
        super().__init__()
        check_common(in_channels, out_channels, base, depth, norm, dropout, up)
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
        self.presence = PresenceHead(chs[-1]) if check_bool("presence", presence) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(self, x.shape[-2], x.shape[-1])
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        presence = self.presence(x) if self.presence is not None else None
        for step in self.decoder:
            x = step(x, skips.pop())
        return self.head(x) if presence is None else (self.head(x), presence)


class UNetPlusPlus(SegModel):
    """UNet++ (Zhou et al. 2018): dense nested skips narrow the semantic gap between encoder and
    decoder features; the top-row heads allow deep supervision and later pruning.

    Node X[i][j] (level i, column j) fuses X[i][0..j-1] with the upsampled X[i+1][j-1].
    """

    # one keyword per model.* param: the registry reads this signature for what params.yaml may set
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
        presence: bool = False,
    ) -> None:
        super().__init__()
        check_common(in_channels, out_channels, base, depth, norm, dropout, up)
        self.deep_supervision = check_bool("deep_supervision", deep_supervision)
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
        self.presence = PresenceHead(chs[-1]) if check_bool("presence", presence) else None

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
            out = [head(grid[0][self.depth - k]) for k, head in enumerate(self.heads)]
        else:
            out = self.heads[0](grid[0][self.depth])
        return out if self.presence is None else (out, self.presence(grid[self.depth][0]))


class CompactNet(SegModel):
    """Small skip-less encoder-decoder (ELU, batch norm, dropout) as used for BUS baselines: it
    shows how much the U-Net skips actually buy on this data.

    Widths base, 2*base, 4*base down to 1/8 resolution; the decoder climbs back to 1/2 resolution
    and base/2 channels, and a final bilinear upsampling restores the input size.
    """

    size_divisor = 8

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, base: int = 64, dropout: float = 0.2,
        presence: bool = False,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        check_int("base", base, 1)
        check_fraction("dropout", dropout)

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
        self.presence = PresenceHead(c3) if check_bool("presence", presence) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(self, x.shape[-2], x.shape[-1])
        size = x.shape[-2:]
        deep = self.bottleneck(self.encoder(x))
        y = F.interpolate(self.decoder(deep), size=size, mode="bilinear", align_corners=False)
        return self.head(y) if self.presence is None else (self.head(y), self.presence(deep))


SMP_DECODERS = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3",
                "deeplabv3plus", "upernet", "segformer")
"""segmentation_models_pytorch's decoders by its own lower-case names (`smp.create_model`). Left
out: DPT (needs a vision-transformer encoder) and PAN (fails below 128 px, e.g. the demo's 96)."""
WIDTH_LIST_DECODERS = ("unet", "unetplusplus", "manet")  # take one width per decoder stage


class SmpModel(SegModel):
    """A segmentation_models_pytorch encoder-decoder: the way to ImageNet-pretrained encoders.
    Built with random weights (so a model file rebuilds it offline, without the pretrained file);
    `busiseg.modeling.pretrained` loads the encoder's weights before training."""

    size_divisor = 32  # five 2x down-samplings in every smp encoder at depth 5

    def __init__(self, in_channels: int = 1, out_channels: int = 1, decoder: str = "unet",
                 encoder: str = "tu-tf_efficientnet_lite0", presence: bool = False,
                 decoder_channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        self.decoder_name = decoder
        widths = {"decoder_channels": tuple(decoder_channels)} if decoder_channels else {}
        if widths and decoder not in WIDTH_LIST_DECODERS:
            raise BusisegError(f"model.decoder_channels is read by "
                               f"{', '.join('smp_' + d for d in WIDTH_LIST_DECODERS)} only, not "
                               f"smp_{decoder}; set it to [] (the decoder's own widths)")
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
                                            in_channels=in_channels, classes=out_channels,
                                            **widths)
            except Exception as exc:  # noqa: BLE001 - smp/timm refuse combinations in many ways
                raise BusisegError(f"model.encoder {encoder!r} does not build with "
                                   f"segmentation_models_pytorch {decoder!r}: "
                                   f"{first_line(exc, 200)}") from None
        if check_bool("presence", presence):
            from segmentation_models_pytorch.base.heads import ClassificationHead
            from segmentation_models_pytorch.base.initialization import initialize_head

            # smp's own classification head (what aux_params builds, same weight names), drawn
            # from a forked generator: with or without it, every other weight starts the same
            with torch.random.fork_rng(devices=[]):
                head = ClassificationHead(self.net.encoder.out_channels[-1], 1, "avg", 0.2)
                initialize_head(head)
            self.net.classification_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def presence_head(model: nn.Module) -> nn.Module | None:
    """The module that turns the deepest features into the presence logit (None without one):
    what training hooks to keep that head from changing the segmentation."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    head = getattr(model, "presence", None)
    net = getattr(model, "net", None)
    if head is None and net is not None:
        head = getattr(net, "classification_head", None)
    return head


class FoldEnsemble(nn.Module):
    """The fold models of a cross-validation run as one model: the mean of the members'
    probabilities, returned as logits, so TTA, evaluate, predict and ONNX export treat it like
    any single model. It always answers "is there a lesion?" too, as the mean of the members'
    answers: their presence heads', or without heads their most confident pixels' (the scale
    the presence threshold was chosen on out of fold, one member per image; the maximum of the
    averaged map would sit lower)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.size_divisor = max(int(getattr(m, "size_divisor", 1)) for m in members)
        self.config = {**members[0].config, "members": len(members)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.combine([m(x) for m in self.members])

    @staticmethod
    def combine(outputs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble's output from its members' own outputs on one batch: apart from
        `forward` so that evaluate, which also scores each member alone, runs every member
        once and combines what it kept."""
        outs = [split_output(o) for o in outputs]
        mask = _mean_logit([o[0] for o in outs])
        return mask, _mean_logit([lesion_logit(o) for o in outs])


class Blend(nn.Module):
    """Trained models as one: the mask from some (`masks_from`), the lesion score from others
    (`presence_from`), each the mean of those models' probabilities as in FoldEnsemble. A presence
    head trained jointly costs the segmentation some Dice, so the masks can come from a model
    trained without one and the score from one trained with it; or several seeds of one recipe
    average their masks and scores alike. One fold's Blend is one member of a FoldEnsemble, so
    out of fold each image still sees only models that never trained on it."""

    def __init__(self, parts: list[nn.Module], masks_from: list[int],
                 presence_from: list[int]) -> None:
        super().__init__()
        if not masks_from or not presence_from or not set(masks_from) | set(presence_from) <= \
                set(range(len(parts))):
            raise ValueError(f"a blend of {len(parts)} models needs masks_from and presence_from "
                             f"among 0..{len(parts) - 1}, got {masks_from}, {presence_from}")
        self.parts = nn.ModuleList(parts)
        self.masks_from, self.presence_from = list(masks_from), list(presence_from)
        self.size_divisor = max(int(getattr(m, "size_divisor", 1)) for m in parts)
        self.config = {"arch": "blend", "parts": [m.config for m in parts],
                       "masks_from": self.masks_from, "presence_from": self.presence_from}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        used = sorted(set(self.masks_from) | set(self.presence_from))
        outs = {i: split_output(self.parts[i](x)) for i in used}  # each part runs once
        mask = _mean_logit([outs[i][0] for i in self.masks_from])
        return mask, _mean_logit([lesion_logit(outs[i]) for i in self.presence_from])


def lesion_logit(out: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """One model's answer to "is there a lesion?" (N×1 logits) from its split output: its
    presence head, or without one its most confident pixel (the scale segment's lesion score
    reads a head-less model on, pass by pass)."""
    masks, presence = out
    return presence if presence is not None else masks.flatten(1).amax(1, keepdim=True)


def _mean_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    """The logit of the members' mean probability."""
    prob = torch.stack([torch.sigmoid(t.float()) for t in logits]).mean(0)
    prob = prob.clamp(1e-7, 1 - 1e-7)  # finite logits; 1e-7 is far from any threshold
    return torch.log(prob) - torch.log1p(-prob)


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
