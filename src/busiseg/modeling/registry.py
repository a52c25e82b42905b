"""The registry: every architecture is a row of ``ARCHS`` under the name ``model.arch`` uses, and
``build_model(arch, **kw)`` is the one way the pipeline makes a model (as
segmentation_models_pytorch's ``create_model``), so a new arch needs a class in ``archs`` and a
row here, nothing else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from busiseg.errors import BusisegError
from busiseg.modeling.archs import SMP_DECODERS, CompactNet, SegModel, SmpModel, UNet, UNetPlusPlus
from busiseg.modeling.blocks import check_choice


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
        check_choice("arch", arch, list_archs())
    row = ARCHS[arch]
    params = inspect.signature(row.model).parameters
    return {k: v for k, v in params.items() if k not in row.fixed}


def build_model(arch: str, in_channels: int = 1, out_channels: int = 1, **kw: Any) -> nn.Module:
    """The one way the pipeline makes a model, so params.yaml mistakes fail early with a message
    naming the key, and ``model.config`` always round-trips through ``build_model(**config)``."""
    params = arch_settings(arch)
    allowed = [p for p in params if p not in ("in_channels", "out_channels")]
    settable = [p for p in allowed if p != "presence"]  # presence: train.presence_weight
    unknown = sorted(k for k in kw if k not in allowed)
    if unknown:
        names = ", ".join(f"model.{k}" for k in unknown)
        verb = "is not a parameter" if len(unknown) == 1 else "are not parameters"
        raise BusisegError(
            f"{names} {verb} of model.arch {arch!r}; choose from: {', '.join(settable)}"
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
