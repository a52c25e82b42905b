"""The classifier composed with the mask model in evaluate: its p_lesion replaces the mask
model's lesion score wherever the score is read (the presence decision, its calibration, the
confidence), and its p_malignant gives the malignancy figures. Out of fold, fold k's images are
scored by the members of fold k only, which never trained on them; test by every member."""

from __future__ import annotations

import numpy as np
import torch

from busiseg.errors import BusisegError
from busiseg.evaluation.malignancy import labelled, malignancy_figures, youden_threshold
from busiseg.inference.classify import Classifier
from busiseg.modeling.classifier import read_classifier
from busiseg.params import Params


def open_classifier(path, device: torch.device, batch_size: int, dtype, split: dict | None,
                    size: int) -> Classifier | None:
    """The classifier file's members on `device`; None for classify.kind none. One trained on
    another split or cache size than the mask model is refused: its out-of-fold scores would
    come from members that trained on the images they score."""
    blob = read_classifier(path)
    if blob["kind"] == "none":
        return None
    if split and blob.get("split") and blob["split"] != split:
        raise BusisegError(f"{path}: trained on another split (split.csv "
                           f"{str(blob['split'].get('sha256'))[:12]}) than the mask model "
                           f"({str(split.get('sha256'))[:12]}); re-run dvc repro")
    if int(blob["size"]) != size:
        raise BusisegError(f"{path}: trained at {blob['size']} px, the cache is {size} px; re-run "
                           "dvc repro classify")
    return Classifier.from_blob(blob, device, batch_size, dtype)


def out_of_fold(c: Classifier, images: torch.Tensor, idx: list[int],
                fold: np.ndarray) -> np.ndarray:
    """N×2 for the out-of-fold images `idx` (fold order), each by its own fold's members."""
    out = np.zeros((len(idx), 2))
    for k in np.unique(fold):
        mine = np.flatnonzero(fold == k)
        out[mine] = c.probabilities(images[torch.tensor([idx[i] for i in mine])], int(k))
    return out


def malignancy_keys(p: Params, held: np.ndarray, held_classes: list[str],
                    held_fold: np.ndarray | None, test: np.ndarray,
                    test_classes: list[str]) -> dict:
    """Out of fold (`held_fold` given): each fold at the cut chosen on the other folds, `cv_`
    keys; test at the cut chosen on every held-out image. Without folds, `held` is val: the
    cut is chosen there and only test is reported."""
    e = p.evaluate
    known, label = labelled(held_classes)
    cut = youden_threshold(held[known], label)
    out = {}
    if held_fold is not None:
        cuts = np.zeros(len(held))
        for k in np.unique(held_fold):
            others = known & (held_fold != k)
            _, other_label = labelled([c for c, o in zip(held_classes, others) if o])
            cuts[held_fold == k] = youden_threshold(held[others], other_label)
        out.update(malignancy_figures(held, held_classes, cuts, e.bootstrap, e.bootstrap_seed,
                                      "cv_"))
    figures = malignancy_figures(test, test_classes, cut, e.bootstrap, e.bootstrap_seed)
    return {**out, **figures, **({"malignant_threshold": cut} if figures or out else {})}
