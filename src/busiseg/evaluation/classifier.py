"""The classifier file evaluate composes with the mask model (the composing itself is
evaluate's `Loaded.held_out` and `score_test`: its p_lesion replaces the mask model's lesion
score, out of fold by fold k's members only; malignancy.py reads its p_malignant)."""

from __future__ import annotations

import torch

from busiseg.errors import BusisegError
from busiseg.inference.classify import Classifier
from busiseg.modeling.classifier import read_classifier


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
