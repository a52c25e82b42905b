"""The classifier composed with the mask model in evaluate: its p_lesion replaces the mask
model's lesion score wherever the score is read (the presence decision, its calibration, the
confidence), and its p_malignant gives the malignancy figures. Out of fold, fold k's images are
scored by the members of fold k only, which never trained on them; test by every member."""

from __future__ import annotations

import numpy as np
import torch

from busiseg.errors import BusisegError
from busiseg.evaluation.malignancy import labelled, malignancy_figures, youden_threshold
from busiseg.evaluation.presence import fit_temperature
from busiseg.inference.classify import Classifier
from busiseg.inference.confidence import calibrate
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


def calibrated_cut(held: np.ndarray, held_classes: list[str]) -> tuple[float, float]:
    """(temperature, cut) chosen on these images: the temperature that calibrates p_malignant
    among the labelled ones (as the lesion score's), then Youden's cut on the calibrated value."""
    known, label = labelled(held_classes)
    temperature = round(fit_temperature(held[known], label.astype(bool)), 6)  # as eval.json
    return temperature, youden_threshold(calibrate(held[known], temperature), label)


def malignancy_keys(p: Params, held: np.ndarray, held_classes: list[str],
                    held_fold: np.ndarray | None, test: np.ndarray,
                    test_classes: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
    """Out of fold (`held_fold` given): each fold calibrated and cut with what the other folds
    chose, `cv_` keys; test with what every held-out image chose. Without folds, `held` is
    val: the choice is made there and only test is reported. Returns the keys and the
    calibrated p_malignant of the held-out and the test images."""
    e = p.evaluate
    temperature, cut = calibrated_cut(held, held_classes)
    out = {}
    held_calibrated = calibrate(held, temperature)
    if held_fold is not None:
        cuts = np.zeros(len(held))
        for k in np.unique(held_fold):
            others, mine = held_fold != k, held_fold == k
            t_k, cuts[mine] = calibrated_cut(held[others], [c for c, o in zip(held_classes,
                                                                                others) if o])
            held_calibrated[mine] = calibrate(held[mine], t_k)
        out.update(malignancy_figures(held, held_classes, cuts, e.bootstrap,
                                      e.bootstrap_seed, "cv_", held_calibrated))
    test_calibrated = calibrate(test, temperature)
    figures = malignancy_figures(test, test_classes, cut, e.bootstrap, e.bootstrap_seed,
                                 calibrated=test_calibrated)
    chosen = {"malignant_threshold": cut, "malignant_temperature": temperature}
    both = len(np.unique(labelled(held_classes)[1])) == 2  # else nothing was fitted
    return {**out, **figures, **(chosen if both else {})}, held_calibrated, test_calibrated
