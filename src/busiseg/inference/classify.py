"""The classifier's probabilities for images: the one path evaluate, predict and the tests take,
so "p_lesion" and "p_malignant" mean the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from busiseg.errors import BusisegError
from busiseg.inference.confidence import calibrate
from busiseg.inference.segment import Feed
from busiseg.modeling.classifier import build_members
from busiseg.runtime.device import autocast


@torch.inference_mode()
def classifier_logits(members: list[torch.nn.Module], images: torch.Tensor,
                      feed: Feed) -> torch.Tensor:
    """N×2 logits (lesion, malignant) of uint8 N×C×H×W images: the members' mean logit, each
    averaged with the horizontally flipped image's, as the masks' flip TTA averages."""
    out = []
    for x in feed.batches(images):
        with autocast(feed.device, feed.dtype):
            logits = [0.5 * (m(x) + m(x.flip(-1))) for m in members]
        out.append(torch.stack(logits).float().mean(dim=0).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def classifier_probabilities(members: list[torch.nn.Module], images: torch.Tensor,
                             feed: Feed) -> torch.Tensor:
    """N×2 probabilities: p_lesion, p_malignant (the latter read as: if there is a lesion)."""
    return torch.sigmoid(classifier_logits(members, images, feed))


@dataclass
class Classifier:
    """A classifier file's members on a device, and how to feed them: evaluate picks a fold's
    members out of fold, predict averages them all."""

    members: list[torch.nn.Module]
    folds: list[int]  # each member's fold (-1: trained on the train split)
    feed: Feed
    size: int
    malignancy: bool  # trained for malignancy (the data had benign/malignant lesions)
    # fitted by evaluate out of fold (a packaged model carries it): p_malignant is reported
    # calibrated; None (classify's own file) gives the members' raw probability
    malignant_temperature: float | None = None

    @classmethod
    def from_blob(cls, blob: dict, device: torch.device, batch_size: int = 1,
                  dtype: torch.dtype | None = None) -> Classifier:
        feed = Feed(blob["input_mean"], blob["input_std"], device, batch_size, dtype)
        return cls(build_members(blob, device), [int(m["fold"]) for m in blob["members"]],
                   feed, int(blob["size"]), bool(blob.get("malignancy")),
                   blob.get("malignant_temperature"))

    def probabilities(self, images: torch.Tensor, fold: int | None = None) -> np.ndarray:
        """N×2 (p_lesion, p_malignant) by the members of `fold` (None: all of them)."""
        chosen = [m for m, f in zip(self.members, self.folds) if fold is None or f == fold]
        if not chosen:
            raise BusisegError(f"models/classifier.pt has no member of fold {fold}; re-run dvc "
                               "repro classify (its folds must be split.folds)")
        out = classifier_probabilities(chosen, images, self.feed).numpy().astype(np.float64)
        if self.malignant_temperature is not None:
            out[:, 1] = calibrate(out[:, 1], self.malignant_temperature)
        return out
