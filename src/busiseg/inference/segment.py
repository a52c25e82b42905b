"""From images to lesion masks: the one path that validation during training, evaluate and
predict all take, so a figure reported by evaluate is what predict gives on the same image.

It needs a forward function alone (a PyTorch model, or an ONNX Runtime session behind the same
call), never training code. Inputs are uint8 images; each step below is the single written copy of
its rule: normalisation, batching, flip TTA, threshold and post-processing, resizing back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from busiseg.data.images import resize_image
from busiseg.errors import BusisegError
from busiseg.inference.confidence import KINDS, calibrate, confidence, flag
from busiseg.modeling.archs import split_output
from busiseg.modeling.pretrained import Stats
from busiseg.runtime.device import autocast

Forward = Callable[[torch.Tensor], torch.Tensor]  # normalised N×1×H×W float → logits
CPU = torch.device("cpu")


def as_stats(value) -> Stats:
    """A stored mean or std (model file, ONNX metadata): one number for grey input, one per
    channel for colour."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def normalize(x: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """uint8 images (0–255), or float ones already in [0, 1], N×C×H×W → the model's input:
    (x − mean) / std, per channel when mean and std are lists."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if isinstance(mean, (list, tuple)):
        mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Feed:
    """How images reach a network: the normalisation it was trained with, and the device, batch
    size, precision (autocast dtype, None: float32) and memory layout it runs with."""

    mean: Stats
    std: Stats
    device: torch.device = CPU
    batch_size: int = 16
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Normalised batches of uint8 N×C×H×W images, moved to the device one at a time."""
        for i in range(0, len(images), self.batch_size):
            x = normalize(images[i:i + self.batch_size].to(self.device), self.mean, self.std)
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.inference_mode()
def predict_probabilities(forward: Forward, images: torch.Tensor, feed: Feed,
                          tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid probabilities (float32, CPU, N×1×H×W) and each image's lesion score (N, see
    `lesion_score`); with `tta` both averaged with those of the horizontally flipped image (the
    map flipped back). The one inference path: evaluate, predict and the ONNX checks call it
    alike."""
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    maps, scores = [], []
    for x in feed.batches(images):
        with autocast(feed.device, feed.dtype):
            prob, score = lesion_score(forward(x))
            if tta:
                flipped, flipped_score = lesion_score(forward(x.flip(-1)))
                prob = 0.5 * (prob + flipped.flip(-1))
                score = 0.5 * (score + flipped_score)
        maps.append(prob.cpu())
        scores.append(score.cpu())
    if not maps:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(maps), torch.cat(scores)


def lesion_score(output) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability maps, lesion scores) of one forward pass. The score is how sure the model is
    that the image holds a lesion, the one number the presence decision thresholds: the presence
    head's probability, or for a model without one its most confident pixel. Taken per pass and
    averaged over TTA passes (and, in a fold ensemble, over members), so an ensemble's score is
    the mean of its members' scores, on the scale its presence threshold was chosen on."""
    logits, presence = split_output(output)
    prob = torch.sigmoid(logits.float())
    if presence is not None:
        return prob, torch.sigmoid(presence.float()[:, 0])
    return prob, prob.flatten(1).amax(1)


def probabilities(forward: Forward, images: torch.Tensor, feed: Feed,
                  tta: bool = False) -> torch.Tensor:
    """The probability maps of `predict_probabilities` alone."""
    return predict_probabilities(forward, images, feed, tta)[0]


def gate(masks: np.ndarray, scores: np.ndarray, presence_threshold: float | None) -> np.ndarray:
    """Empty the masks of images whose lesion score is below the presence threshold (None: off)."""
    if presence_threshold is None or not len(masks):
        return masks
    keep = np.asarray(scores) >= presence_threshold
    return masks & keep.reshape(-1, *([1] * (masks.ndim - 1)))


class Decided(NamedTuple):
    masks: np.ndarray  # N boolean masks
    scores: np.ndarray  # the lesion score the presence decision read
    calibrated: np.ndarray  # the lesion score calibrated at the presence temperature
    trust: np.ndarray  # each image's confidence
    flagged: np.ndarray  # confidence below the review threshold


@dataclass(frozen=True)
class MaskSettings:
    """What turns probabilities into a mask, and how far to trust it. Evaluate chooses it on
    held-out data and writes it into metrics/eval.json (`eval_keys`); the package stage copies it
    into the packaged model and export into the ONNX metadata (`as_dict`); `from_dict` reads
    any of them back (SETTINGS names each field in each); train's own model file never holds
    it, so an evaluation setting changes without re-training."""

    threshold: float = 0.5
    tta: bool = False
    largest_cc: bool = False
    fill_holes: bool = False
    presence_threshold: float | None = None  # lesion score below it: empty mask (None: off)
    # the expected-Dice presence rule, when evaluate chose it (evaluate.presence_threshold:
    # expected): knots (confidence, expected lesion Dice) of the curve `keep` reads; None: the
    # threshold rule above, or no gate
    presence_expected_dice: tuple[tuple[float, float], ...] | None = None
    # the per-image trust score: its kind (confidence.KINDS), the lesion score's calibration it
    # reads, and the value below which an image is flagged for review (None: none)
    confidence: str = "entropy"
    presence_temperature: float = 1.0
    review_threshold: float | None = None
    # where the threshold came from (chosen on held-out data, or given), and the held-out lesion
    # Dice (validation, or out of fold) the setting was chosen at: provenance, nothing that
    # changes a mask
    tuned_threshold: bool = False
    val_dice: float | None = None

    @property
    def presence_rule(self) -> str:
        """Which presence decision empties masks (off, threshold or expected): with `expected`
        the presence threshold is null, which alone would read as no gate at all."""
        return ("expected" if self.presence_expected_dice is not None else
                "off" if self.presence_threshold is None else "threshold")

    def masks(self, probs: np.ndarray, scores: np.ndarray,
              trust: np.ndarray | None = None) -> np.ndarray:
        """N×H×W probabilities and N lesion scores → the N masks (`decide`)."""
        return self.decide(probs, scores, trust).masks

    def keep(self, calibrated: np.ndarray, trust: np.ndarray) -> np.ndarray:
        """The expected-Dice rule: keep an image's mask iff p · q̂ > 1 − p, p the calibrated
        lesion probability and q̂ the lesion Dice expected at the mask's confidence. Emptying a
        mask scores 1 on a normal image and loses the mask's Dice on a lesion image, so this is
        the decision with the larger expected Dice over all images."""
        p = calibrated
        knots = np.asarray(self.presence_expected_dice, dtype=np.float64)
        q = np.interp(np.asarray(trust, dtype=np.float64), knots[:, 0], knots[:, 1])
        return p * q > 1 - p

    def confidences(self, probs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Each image's confidence of kind `confidence` (busiseg.inference.confidence), as
        evaluate scores it."""
        return confidence(probs, calibrate(scores, self.presence_temperature), self.threshold,
                          self.confidence)

    def decide(self, probs: np.ndarray, scores: np.ndarray,
               trust: np.ndarray | None = None) -> Decided:
        """Everything these settings make of N×H×W probabilities and N lesion scores, as
        evaluate scores them: the masks (pieces applied, gated), and beside the score its
        calibrated value, each image's confidence and its review flag. `trust`: the
        confidences when the caller holds them already; they must be the training size's
        (predict's `probs` are resized back to the image, so predict passes them)."""
        calibrated = calibrate(scores, self.presence_temperature)
        if trust is None:
            trust = confidence(probs, calibrated, self.threshold, self.confidence)
        flagged = flag(trust, self.review_threshold)
        pred = binarize(probs, self.threshold, self.largest_cc, self.fill_holes)
        if self.presence_expected_dice is None:
            pred = gate(pred, scores, self.presence_threshold)
        else:
            pred = pred & self.keep(calibrated, trust).reshape(-1, *([1] * (pred.ndim - 1)))
        return Decided(pred, scores, calibrated, trust, flagged)

    def eval_keys(self) -> dict:
        """The settings as metrics/eval.json names them (SETTINGS; what `from_eval` reads
        back), and the presence rule they amount to."""
        out = {}
        for name, value in self.as_dict().items():
            if isinstance(value, bool):
                value = int(value)  # used_*: 0/1, as dvc metrics diff shows numbers
            elif name == "presence_expected_dice" and value is not None:
                value = {"confidence": [k[0] for k in value], "dice": [k[1] for k in value]}
            out[SETTINGS[name][0]] = value
        return {**out, "presence_rule": self.presence_rule}

    @classmethod
    def from_dict(cls, stored: dict) -> MaskSettings:
        """Settings from any of their stored shapes: metrics/eval.json's keys, or the fields'
        own names (a packaged model, an ONNX export, predictions.json), or the names files
        written before carry (EARLIER_NAMES). A field a file lacks keeps its default, which
        changes nothing (no gate, no flag); the first four every file holds."""
        values = {}
        for name, (eval_name, read) in SETTINGS.items():
            key = next((k for k in (name, eval_name, EARLIER_NAMES.get(name))
                        if k is not None and stored.get(k) is not None), None)
            if key is not None:
                values[name] = read(stored[key])
            elif name in ("threshold", "tta", "largest_cc", "fill_holes"):
                raise KeyError(name if name == eval_name else f"{name} or {eval_name}")
        return cls(**values)

    @classmethod
    def from_eval(cls, path: str | Path) -> MaskSettings:
        """The settings the evaluate stage applied to test (its threshold and used_* keys)."""
        path = Path(path)
        try:
            settings = cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise BusisegError(f"{path}: not found; run the evaluate stage first (`dvc repro "
                               "evaluate`), or give predict --threshold") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BusisegError(f"{path}: not an evaluate metrics file with threshold and used_* "
                               f"keys ({type(exc).__name__}: {exc}); re-run `dvc repro evaluate`"
                               ) from None
        return settings.checked(str(path))

    @classmethod
    def from_model_file(cls, blob: dict, source: str) -> MaskSettings | None:
        """The settings a packaged model file carries (the package stage's `settings`), None
        for train's own file, which carries none; malformed ones end in one line."""
        if blob.get("settings") is None:
            return None
        try:
            return cls.from_dict(blob["settings"]).checked(source)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BusisegError(f"{source}: its settings are unreadable ({type(exc).__name__}: "
                               f"{exc}); re-run the package stage (dvc repro)") from None

    def checked(self, source: str) -> MaskSettings:
        if self.confidence not in KINDS:
            raise BusisegError(f"{source}: confidence {self.confidence!r} is not one of "
                               f"{', '.join(KINDS)}")
        if not self.presence_temperature > 0:
            raise BusisegError(f"{source}: presence temperature must be > 0, got "
                               f"{self.presence_temperature}")
        if self.review_threshold is not None and not 0 <= self.review_threshold <= 1:
            raise BusisegError(f"{source}: review threshold must be in [0, 1], got "
                               f"{self.review_threshold}")
        if not 0 < self.threshold < 1:
            raise BusisegError(f"{source}: threshold must be in (0, 1), got {self.threshold}")
        if self.presence_threshold is not None and not 0 <= self.presence_threshold <= 1:
            raise BusisegError(f"{source}: presence threshold must be in [0, 1], got "
                               f"{self.presence_threshold}")
        if self.presence_expected_dice is not None:
            knots = np.asarray(self.presence_expected_dice, dtype=np.float64)
            if (knots.ndim != 2 or knots.shape[1] != 2 or not len(knots)
                    or np.any(np.diff(knots[:, 0]) < 0) or not np.all((knots >= 0) & (knots <= 1))):
                raise BusisegError(f"{source}: the expected-Dice curve must be (confidence, Dice) "
                                   "pairs in [0, 1], confidence increasing; re-run evaluate")
        return self

    def as_dict(self) -> dict:
        """JSON-shaped (the curve's knots as lists), so that a record read back from JSON, as
        predict --continue reads its own, compares equal to the settings that wrote it."""
        out = asdict(self)
        if out["presence_expected_dice"] is not None:
            out["presence_expected_dice"] = [list(k) for k in out["presence_expected_dice"]]
        return out


def expected_dice_knots(curve) -> tuple[tuple[float, float], ...]:
    """The expected-Dice curve from either of its stored shapes: eval.json's two lists
    ({"confidence": [...], "dice": [...]}, readable beside the other metrics) or the knot pairs
    an export or packaged model carries (`as_dict`)."""
    pairs = zip(curve["confidence"], curve["dice"], strict=True) if isinstance(curve, dict) \
        else curve
    return tuple((float(x), float(y)) for x, y in pairs)


# The one table of the settings' names: each MaskSettings field, its key in metrics/eval.json
# (used_*: what was applied, 0/1) and how a stored value reads back. eval_keys, from_dict,
# as_dict (a packaged model, the ONNX metadata, predictions.json) and predict's record of where
# each setting came from all derive from it.
SETTINGS: dict[str, tuple[str, Callable]] = {
    "threshold": ("threshold", float),
    "tta": ("used_tta", bool),
    "largest_cc": ("used_largest_cc", bool),
    "fill_holes": ("used_fill_holes", bool),
    "presence_threshold": ("presence_threshold", float),
    "presence_expected_dice": ("presence_expected_dice", expected_dice_knots),
    "confidence": ("confidence", str),
    "presence_temperature": ("presence_temperature", float),
    "review_threshold": ("review_threshold", float),
    "tuned_threshold": ("used_tune_threshold", bool),
    "val_dice": ("val_dice", float),
}
# the names packaged models and exports of format version 1 and 2 gave three fields
EARLIER_NAMES = {"presence_expected_dice": "expected_dice", "presence_temperature": "temperature",
                 "val_dice": "held_out_dice"}
SETTING_NAMES = tuple(SETTINGS)  # what a mask's making depends on
if tuple(f.name for f in fields(MaskSettings)) != SETTING_NAMES:
    raise AssertionError("SETTINGS must name every MaskSettings field, in order")


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


def segment(forward: Forward, image: np.ndarray, size: int, mean: Stats, std: Stats,
            settings: MaskSettings, device: torch.device | None = None) -> np.ndarray:
    """One image of any size → bool mask of the same size (see `segment_with_score`)."""
    return segment_with_score(forward, image, size, mean, std, settings, device).mask


class Segmentation(NamedTuple):
    mask: np.ndarray  # bool, the image's size
    score: float  # the lesion score the presence decision reads
    confidence: float  # how far to trust this prediction (busiseg.inference.confidence)
    flagged: bool  # confidence below the review threshold: a reader should look
    probability: np.ndarray  # float32 map, the image's size


def segment_with_score(forward: Forward, image: np.ndarray, size: int, mean: Stats, std: Stats,
                       settings: MaskSettings, device: torch.device | None = None,
                       score_of: Callable[[torch.Tensor], np.ndarray] | None = None
                       ) -> Segmentation:
    """One image of any size (grey H×W, or colour H×W×3 for a 3-channel model) → its mask,
    lesion score, confidence and probability map. The image is resized to the training size
    exactly as preprocess resized the training images; the probability map, not the mask, is
    resized back, so the outline stays smooth. An image the presence decision rejects (score
    below the threshold, or the expected-Dice rule) gets an empty mask. The confidence is taken
    at the training size, as evaluate takes it, and the expected-Dice rule reads that one.
    `score_of`: the lesion score of the resized uint8 1×C×S×S image from elsewhere (an image
    classifier beside the model), as evaluate composed them."""
    small = torch.from_numpy(resize_image(image, size))
    small = (small.permute(2, 0, 1) if small.ndim == 3 else small[None])[None]
    prob, presence = predict_probabilities(forward, small, Feed(mean, std, device or CPU, 1),
                                           tta=settings.tta)
    score = presence.numpy().astype(np.float64) if score_of is None else score_of(small)
    trust = settings.confidences(prob[:, 0].numpy(), score)
    full = torch.nn.functional.interpolate(prob, size=image.shape[:2], mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    decided = settings.decide(full, score, trust)
    return Segmentation(decided.masks[0], float(score[0]), float(trust[0]),
                        bool(decided.flagged[0]), full[0])
