"""From images to lesion masks: the one path that validation during training, evaluate and
predict all take, so a figure reported by evaluate is what predict gives on the same image.

It needs a forward function alone (a PyTorch model, or an ONNX Runtime session behind the same
call), never training code. Inputs are uint8 images; each step below is the single written copy of
its rule: normalisation, batching, flip TTA, threshold and post-processing, resizing back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from busiseg.data.images import resize_image
from busiseg.errors import BusisegError
from busiseg.runtime.device import autocast

Forward = Callable[[torch.Tensor], torch.Tensor]  # normalised N×1×H×W float → logits


def normalize(x_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x_uint8.float() / 255 - mean) / std


def input_batches(images: torch.Tensor, mean: float, std: float, device: torch.device,
                  batch_size: int, channels_last: bool = False) -> Iterator[torch.Tensor]:
    """Normalised batches of uint8 N×1×H×W images, moved to the device one batch at a time."""
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), mean, std)
        yield x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def probabilities(forward: Forward, images: torch.Tensor, mean: float, std: float,
                  device: torch.device, batch_size: int, dtype: torch.dtype | None = None,
                  tta: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (float32, CPU, N×1×H×W); with `tta` averaged with the prediction of
    the horizontally flipped image, flipped back."""
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    out = []
    for x in input_batches(images, mean, std, device, batch_size, channels_last):
        with autocast(device, dtype):
            prob = torch.sigmoid(forward(x).float())
            if tta:
                prob = 0.5 * (prob + torch.sigmoid(forward(x.flip(-1)).float()).flip(-1))
        out.append(prob.cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class MaskSettings:
    """What turns probabilities into a mask. Evaluate chooses it (on val) and writes it into
    metrics/eval.json; predict and export read it from there, never from the model file, so an
    evaluation setting can change without re-training."""

    threshold: float = 0.5
    tta: bool = False
    largest_cc: bool = False
    fill_holes: bool = False

    @classmethod
    def from_eval(cls, path: str | Path) -> MaskSettings:
        """The threshold and the pieces the evaluate stage applied to test (its used_* keys)."""
        path = Path(path)
        try:
            m = json.loads(path.read_text())
            settings = cls(threshold=float(m["threshold"]), tta=bool(m["used_tta"]),
                           largest_cc=bool(m["used_largest_cc"]),
                           fill_holes=bool(m["used_fill_holes"]))
        except FileNotFoundError:
            raise BusisegError(f"{path}: not found; run `dvc repro evaluate` first, or give "
                               "--threshold") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BusisegError(f"{path}: not an evaluate metrics file with threshold and used_* "
                               f"keys ({type(exc).__name__}: {exc}); re-run `dvc repro evaluate`"
                               ) from None
        return settings.checked(str(path))

    def checked(self, source: str) -> MaskSettings:
        if not 0 < self.threshold < 1:
            raise BusisegError(f"{source}: threshold must be in (0, 1), got {self.threshold}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def postprocess(mask: np.ndarray, largest_cc: bool, fill_holes: bool) -> np.ndarray:
    """Per image (H×W bool): optional largest connected component, then hole filling."""
    if largest_cc and mask.any():
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == (1 + int(np.argmax(sizes)))
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def binarize(probs: np.ndarray, threshold: float, largest_cc: bool = False,
             fill_holes: bool = False) -> np.ndarray:
    """N×H×W probabilities → N×H×W bool masks, post-processed."""
    pred = probs >= threshold
    if (largest_cc or fill_holes) and len(pred):
        pred = np.stack([postprocess(m, largest_cc, fill_holes) for m in pred])
    return pred


def segment(forward: Forward, gray: np.ndarray, size: int, mean: float, std: float,
            settings: MaskSettings, device: torch.device | None = None) -> np.ndarray:
    """One grey image of any size → bool mask of the same size. The image is resized to the
    training size exactly as preprocess resized the training images; the probability map, not
    the mask, is resized back, so the outline stays smooth."""
    small = torch.from_numpy(resize_image(gray, size))[None, None]
    prob = probabilities(forward, small, mean, std, device or torch.device("cpu"), 1,
                         tta=settings.tta)
    full = torch.nn.functional.interpolate(prob, size=gray.shape, mode="bilinear",
                                           align_corners=False)
    return binarize(full[:, 0].numpy(), settings.threshold, settings.largest_cc,
                    settings.fill_holes)[0]
