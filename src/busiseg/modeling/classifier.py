"""The image classifier beside the mask model: an ImageNet encoder, pooled, with one logit for
"is there a lesion?" and one for "is it malignant?" (read only where there is a lesion).

Two kinds (classify.kind): `encoder` learns from the image labels alone; `segmentation` is a
U-Net whose masks teach its encoder where lesions are (presence measured better so on BUSI), its
masks discarded after training. Either answers with the same two logits. Its members (folds ×
seeds) live in one file, models/classifier.pt, so evaluate can score each image out of fold by
the members that never trained on it, and predict can average them all.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from busiseg.errors import BusisegError
from busiseg.files import atomic_torch_save

ENCODER = "tu-tf_efficientnet_lite0"  # the encoder busiseg bundles ImageNet weights for
LOGITS = ("lesion", "malignant")  # the classifier's outputs, in order
FORMAT = 1
DECODER_CHANNELS = (128, 64, 32, 16, 8)  # kind segmentation: busi-lite0-fast-cv5's decoder


class ImageClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, encoder: str = ENCODER) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.encoder = smp.encoders.get_encoder(encoder, in_channels=in_channels, depth=5,
                                                    weights=None)
        self.config = {"in_channels": in_channels, "encoder": encoder}
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(self.encoder.out_channels[-1], len(LOGITS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×2 logits: lesion, malignant."""
        features = self.encoder(x)[-1]
        return self.head(self.drop(features.mean(dim=(2, 3))))


class MaskSupervisedClassifier(nn.Module):
    """smp's U-Net with its own classification head (aux_params) on the deepest features: the
    decoder and mask head exist to be trained (`with_masks`), `forward` skips them."""

    def __init__(self, in_channels: int = 1, encoder: str = ENCODER,
                 decoder_channels: tuple[int, ...] = DECODER_CHANNELS) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = smp.create_model(
                "unet", encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                classes=1, decoder_channels=tuple(decoder_channels),
                aux_params={"classes": len(LOGITS), "pooling": "avg", "dropout": 0.2})
        self.config = {"in_channels": in_channels, "encoder": encoder,
                       "decoder_channels": list(decoder_channels)}

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×2 logits: lesion, malignant."""
        return self.net.classification_head(self.net.encoder(x)[-1])

    def with_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N×2 logits, N×1×H×W mask logits)."""
        masks, logits = self.net(x)
        return logits, masks


KINDS = {"encoder": ImageClassifier, "segmentation": MaskSupervisedClassifier}


def build_classifier(kind: str, config: dict) -> nn.Module:
    if kind not in KINDS:
        raise BusisegError(f"classifier kind {kind!r} unknown (known: {', '.join(KINDS)}); "
                           "re-run dvc repro classify")
    return KINDS[kind](**config)


def save_classifier(path: Path, members: list[dict], config: dict, info: dict,
                    kind: str = "encoder") -> None:
    """`members`: per member its fold (-1: trained on the train split), seed and state dict;
    `info`: what evaluate and predict need to feed it (size, channels, normalisation), the
    split it was trained on and what it was trained for."""
    atomic_torch_save({"format": FORMAT, "kind": kind, "config": config,
                       "members": members, **info}, Path(path))


def save_none(path: Path) -> None:
    """classify.kind: none, as a file: evaluate then keeps the mask model's own lesion score."""
    atomic_torch_save({"format": FORMAT, "kind": "none"}, Path(path))


def read_classifier(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: no classifier file; run the classify stage (dvc repro)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise BusisegError(f"{path}: not a busiseg classifier file ({str(exc)[:80]}); re-run "
                           "dvc repro classify") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise BusisegError(f"{path}: not a busiseg classifier file of format {FORMAT}; re-run "
                           "dvc repro classify")
    return blob


def build_members(blob: dict, device: torch.device | str = "cpu") -> list[nn.Module]:
    out = []
    for member in blob["members"]:
        model = build_classifier(blob["kind"], blob["config"])
        model.load_state_dict(member["state"])
        out.append(model.to(device).eval())
    return out
