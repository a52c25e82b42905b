"""What a predict run is given: the loaded model with what feeding it needs, the mask settings
with where each field came from, what it writes beside the masks, and how it goes. Apart from
predict.py so its record (run_record.py) reads them without importing the run itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from busiseg.inference.classify import Classifier
from busiseg.inference.segment import SETTING_NAMES, Forward, MaskSettings, Stats


@dataclass(frozen=True)
class SourcedSettings:
    """Settings with where each field came from, so the record can say why a mask looks as it
    does; `origin` is the short summary the command prints."""

    settings: MaskSettings
    sources: dict[str, str]
    origin: str

    @classmethod
    def given(cls, settings: MaskSettings, by: str = "the caller") -> SourcedSettings:
        """Settings a library caller holds itself, every field sourced to it."""
        return cls(settings, dict.fromkeys(SETTING_NAMES, f"given by {by}"), by)


@dataclass
class Predictor:
    """A loaded model of either kind, with what feeding it needs."""

    forward: Forward
    size: int
    input_mean: Stats
    input_std: Stats
    device: torch.device
    own_settings: MaskSettings | None  # evaluate's choice, when the model file carries it
    channels: int = 1  # what the model takes: 1 grey, 3 colour (preprocess.channels)
    own_sources: dict[str, str] = field(default_factory=dict)  # per field: "model: …"
    kind: str = "pt"  # pt | onnx
    weights_digest: str | None = None  # the .pt blob's digest, or the one an export carries
    file_sha256: str = ""  # of the model file: a packaged copy differs from train's file
    classifier: Classifier | None = None  # the packaged image classifier, if any


@dataclass(frozen=True)
class Outputs:
    """What predict writes for each image besides its mask, and how."""

    overlays: bool = True
    probabilities: bool = False  # NAME_prob.png, 16-bit (`save_probability_png`)
    mask_value: int = 255  # a lesion pixel's value: 255 to view, 1 for label-reading tools
    resume: bool = False  # --continue: an image done by an earlier run is skipped (plan_resume)
    dicom_seg: bool = False  # NAME_seg.dcm beside the masks of each DICOM input (dicom_seg)


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, one field per `busiseg predict` option that is neither a setting nor an
    output: `mask_marks` paints burned-in colour marks over first, as a model trained with
    data.burned_marks: mask saw its images; `overrides` are MaskSettings fields given on the
    command line (the presence threshold); `fallback_eval` the evaluate file read for a model
    that carries no settings; `command` the argv the record keeps."""

    device: str = "cpu"
    progress: bool | None = None  # None: a bar on a terminal
    mask_marks: bool = False
    overrides: dict | None = None
    fallback_eval: Path | None = None
    command: list[str] | None = None
    frames: str = "all"  # a multi-frame DICOM's frames to predict (dicom.select_frames)
