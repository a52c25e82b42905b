"""Segmentation losses: a pixel term (BCE or focal) plus a region term (soft Dice or Tversky).

The region term is pooled over the batch (as in nnU-Net's batch Dice): a per-image soft Dice
scores every image without a lesion near 1 unless the network drives *every* pixel to ~0, which
fights lesion detection and stalls training on BUSI, where about a sixth of the images are normal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1.0


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                   smooth: float = SMOOTH) -> torch.Tensor:
    prob = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    inter = (prob * target).sum()
    return 1 - (2 * inter + smooth) / (prob.sum() + target.sum() + smooth)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                 smooth: float = SMOOTH) -> torch.Tensor:
    """alpha weighs false positives, beta false negatives: beta > alpha favours recall."""
    prob = torch.sigmoid(logits.float()).flatten()
    target = target.float().flatten()
    tp = (prob * target).sum()
    fp = (prob * (1 - target)).sum()
    fn = ((1 - prob) * target).sum()
    return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


class SegLoss(torch.nn.Module):
    def __init__(self, kind: str = "bce_dice", bce_weight: float = 1.0, dice_weight: float = 1.0,
                 focal_gamma: float = 2.0, tversky_alpha: float = 0.3, tversky_beta: float = 0.7):
        super().__init__()
        self.kind, self.bce_weight, self.dice_weight = kind, bce_weight, dice_weight
        self.focal_gamma, self.alpha, self.beta = focal_gamma, tversky_alpha, tversky_beta

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        if self.kind == "focal_dice":
            from torchvision.ops import sigmoid_focal_loss  # lazy: torchvision imports slowly

            pixel = sigmoid_focal_loss(logits, target, alpha=-1, gamma=self.focal_gamma,
                                       reduction="mean")
        else:
            pixel = F.binary_cross_entropy_with_logits(logits, target)
        if self.kind == "tversky":
            region = tversky_loss(logits, target, self.alpha, self.beta)
        else:
            region = soft_dice_loss(logits, target)
        return self.bce_weight * pixel + self.dice_weight * region

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor):
        """A list (deep supervision) averages the heads, the final head counting double."""
        if isinstance(outputs, list | tuple):
            weights = [2.0] + [1.0] * (len(outputs) - 1)
            total = sum(w * self.single(o, target) for w, o in zip(weights, outputs))
            return total / sum(weights)
        return self.single(outputs, target)
