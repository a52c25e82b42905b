"""Segmentation losses: a pixel term (BCE or focal) plus a region term (soft Dice or Tversky).

The region term is pooled over the batch by default (as in nnU-Net's batch Dice): a per-image soft
Dice over *every* image scores each normal image near 1 unless the network drives every pixel to ~0,
which fights lesion detection and stalls training on BUSI, where about a sixth of the images are
normal. Batch pooling has its own bias, though: big lesions dominate the pooled overlap, so missing
a small or faint lesion entirely costs little. ``reduction="image"`` averages the region term over
the images that *have* a lesion (the pixel term alone keeps normal images empty), so every missed
lesion costs a full point, as it does in the per-image Dice that evaluate reports.

That leaves normal images to the pixel term, which is too weak to keep them empty: a confident
blob over 1 % of a normal image costs the pixel mean almost nothing. The optional empty term
(``empty_weight``) charges each normal image for its most confident pixels: BCE against "no
lesion" of the mean of its top ``empty_topk`` share of pixel logits, averaged over all images of
the batch. One-sided on purpose: the same term on lesion images (multiple-instance
style) rewards being confident *somewhere*, not on the lesion, and cost lesion Dice on BUSI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from busiseg.modeling.archs import split_output

if TYPE_CHECKING:
    from busiseg.params import TrainParams

SMOOTH = 1.0
REDUCTIONS = ("batch", "image")


def _rows(logits: torch.Tensor, target: torch.Tensor, reduction: str):
    """Probabilities and targets as one row per image ("image") or one row for the batch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'batch' or 'image', not {reduction!r}")
    prob, target = torch.sigmoid(logits.float()), target.float()
    rows = len(prob) if reduction == "image" else 1
    return prob.reshape(rows, -1), target.reshape(rows, -1)


def _reduce(loss: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "batch":
        return loss[0]
    has_lesion = target.sum(dim=1) > 0
    if not has_lesion.any():  # a batch of normal images: the pixel term alone speaks
        return loss.sum() * 0.0  # zero, still in the graph
    return loss[has_lesion].mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH,
                   reduction: str = "batch") -> torch.Tensor:
    prob, tgt = _rows(logits, target, reduction)
    inter = (prob * tgt).sum(dim=1)
    return _reduce(1 - (2 * inter + smooth) / (prob.sum(dim=1) + tgt.sum(dim=1) + smooth), tgt,
                   reduction)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                 smooth: float = SMOOTH, reduction: str = "batch") -> torch.Tensor:
    """alpha weighs false positives, beta false negatives: beta > alpha favours recall."""
    prob, tgt = _rows(logits, target, reduction)
    tp = (prob * tgt).sum(dim=1)
    fp = (prob * (1 - tgt)).sum(dim=1)
    fn = ((1 - prob) * tgt).sum(dim=1)
    return _reduce(1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth), tgt, reduction)


def image_logits(logits: torch.Tensor, topk: float) -> torch.Tensor:
    """One lesion logit per image: the mean of its top ``topk`` share of pixel logits (≥ 1 pixel).

    The mean of a small top share rather than the max: the max sends the gradient to one pixel
    per image, and a normal image's false positive is a blob, not a pixel.
    """
    flat = logits.float().reshape(len(logits), -1)
    k = max(1, min(flat.shape[1], round(topk * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def empty_loss(logits: torch.Tensor, target: torch.Tensor, topk: float) -> torch.Tensor:
    """BCE("no lesion") of each normal image's logit, averaged over *all* images of the batch.

    Over all images, like the pixel term, so the term weighs as much as normal images are common;
    averaged over the normal images only, one normal in a batch of lesions got the term's full
    weight and training collapsed to empty predictions within two epochs on BUSI.
    """
    normal = (target.reshape(len(target), -1).sum(dim=1) == 0).float()
    return (F.softplus(image_logits(logits, topk)) * normal).mean()  # softplus(z) = BCE(z, 0)


@dataclass(frozen=True)
class LossSpec:
    """The loss, as the train.* loss params describe it (`from_params`): the kind, its terms'
    weights and the Dice reduction, and the empty-image and presence terms."""

    kind: str = "bce_dice"
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    reduction: str = "batch"
    empty_weight: float = 0.0
    empty_topk: float = 0.01
    presence_weight: float = 0.0

    def __post_init__(self) -> None:  # fail at construction, not at the first batch
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'batch' or 'image', not {self.reduction!r}")
        if self.empty_weight < 0 or not 0 < self.empty_topk <= 1:
            raise ValueError("empty_weight must be ≥ 0 and empty_topk in (0, 1]")

    @classmethod
    def from_params(cls, cfg: TrainParams) -> LossSpec:
        return cls(kind=cfg.loss, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight,
                   focal_gamma=cfg.focal_gamma, tversky_alpha=cfg.tversky_alpha,
                   tversky_beta=cfg.tversky_beta, reduction=cfg.dice_reduction,
                   empty_weight=cfg.empty_weight, empty_topk=cfg.empty_topk,
                   presence_weight=cfg.presence_weight)


class SegLoss(torch.nn.Module):
    def __init__(self, spec: LossSpec | None = None):
        super().__init__()
        spec = spec or LossSpec()
        self.kind, self.bce_weight, self.dice_weight = spec.kind, spec.bce_weight, spec.dice_weight
        self.reduction = spec.reduction
        self.focal_gamma, self.alpha, self.beta = (spec.focal_gamma, spec.tversky_alpha,
                                                   spec.tversky_beta)
        self.empty_weight, self.empty_topk = spec.empty_weight, spec.empty_topk
        self.presence_weight = spec.presence_weight

    @classmethod
    def from_params(cls, cfg: TrainParams) -> SegLoss:
        """The loss train.* describes."""
        return cls(LossSpec.from_params(cfg))

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        if self.kind == "focal_dice":
            from torchvision.ops import sigmoid_focal_loss  # lazy: torchvision imports slowly

            pixel = sigmoid_focal_loss(logits, target, alpha=-1, gamma=self.focal_gamma,
                                       reduction="mean")
        else:
            pixel = F.binary_cross_entropy_with_logits(logits, target)
        if self.kind == "tversky":
            region = tversky_loss(logits, target, self.alpha, self.beta,
                                  reduction=self.reduction)
        else:
            region = soft_dice_loss(logits, target, reduction=self.reduction)
        loss = self.bce_weight * pixel + self.dice_weight * region
        if self.empty_weight:  # off: not computed, so runs without it are unchanged bit for bit
            loss = loss + self.empty_weight * empty_loss(logits, target, self.empty_topk)
        return loss

    def forward(self, outputs, target: torch.Tensor):
        """A list (deep supervision) averages the heads, the final head counting double. A model
        with a presence head returns (masks, presence logits): BCE against "the image has a
        lesion" is added with `presence_weight`."""
        outputs, presence = split_output(outputs)
        loss = self.masks(outputs, target)
        if presence is not None and self.presence_weight:
            label = (target.reshape(len(target), -1).amax(dim=1) > 0).float()
            loss = loss + self.presence_weight * F.binary_cross_entropy_with_logits(
                presence.float()[:, 0], label)
        return loss

    def masks(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor):
        if isinstance(outputs, list | tuple):
            weights = [2.0] + [1.0] * (len(outputs) - 1)
            total = sum(w * self.single(o, target) for w, o in zip(weights, outputs))
            return total / sum(weights)
        return self.single(outputs, target)
