"""The classifier's probabilities for images: the one path evaluate, predict and the tests take,
so "p_lesion" and "p_malignant" mean the same everywhere."""

from __future__ import annotations

import torch

from busiseg.inference.segment import Feed
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
