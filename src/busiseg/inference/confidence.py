"""How far to trust one image's prediction: a per-image confidence score, higher = more likely
right. Computed here, from the model's own outputs, so evaluate, external sets, `busiseg predict`
and the ONNX path give an image the same score; the review flag is this score below a threshold
chosen on held-out images (evaluate.review_fraction).

The kinds (evaluate.confidence), each defined for a single model, so the out-of-fold predictions
of a cross-validation (one member per image) have it too and the flag's threshold can be chosen
there without the test set:

- ``entropy``: one minus the mean binary entropy (bits) of the probability map over the pixels
  the model leans towards lesion (probability ≥ half the mask threshold); an image where no
  pixel gets there scores 1. A crisp outline scores high, a hesitant blob low.
- ``presence``: how far the calibrated lesion score is from a coin toss, |2s − 1|: trust in the
  answer to "is there a lesion?", blind to the outline.
- ``combined``: their product, low when either is.
"""

from __future__ import annotations

import numpy as np

KINDS = ("entropy", "presence", "combined")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def calibrate(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Lesion scores → probabilities one can read, with the temperature evaluate fitted on
    held-out images (evaluation.presence.fit_temperature)."""
    return 1 / (1 + np.exp(-logit(scores) / temperature))


def _entropy_confidence(probs: np.ndarray, threshold: float) -> np.ndarray:
    p = np.clip(probs.reshape(len(probs), -1).astype(np.float64), 1e-7, 1 - 1e-7)
    bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    region = p >= threshold / 2
    n = region.sum(axis=1)
    mean_bits = np.divide((bits * region).sum(axis=1), n, out=np.zeros(len(p)), where=n > 0)
    return 1.0 - mean_bits


def confidence(probs: np.ndarray, calibrated_scores: np.ndarray, threshold: float,
               kind: str = "entropy") -> np.ndarray:
    """Per image (probs N×H×W, the calibrated lesion scores N, the mask threshold) → N scores
    in [0, 1]."""
    if kind not in KINDS:
        raise ValueError(f"confidence kind {kind!r}; choose one of {', '.join(KINDS)}")
    if len(probs) == 0:
        return np.zeros(0)
    presence = np.abs(2 * np.asarray(calibrated_scores, dtype=np.float64) - 1)
    if kind == "presence":
        return presence
    entropy = _entropy_confidence(probs, threshold)
    return entropy if kind == "entropy" else entropy * presence


def flag(scores: np.ndarray, review_threshold: float | None) -> np.ndarray:
    """The images to send to a reader: confidence below the review threshold (None: none)."""
    scores = np.asarray(scores, dtype=np.float64)
    if review_threshold is None:
        return np.zeros(len(scores), dtype=bool)
    return scores < review_threshold
