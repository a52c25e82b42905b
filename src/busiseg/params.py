"""Typed, validated params.

`params.yaml` is the single source of every knob. It is read once per stage and checked as a whole,
so a typo or an impossible value stops the run at its first stage with one line that names the key,
instead of surfacing later as a silent default or a traceback deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from busiseg.errors import BusisegError


@dataclass(frozen=True)
class DemoParams:
    """Synthetic BUSI-layout dataset that a fresh clone trains on."""

    n_benign: int = 48
    n_malignant: int = 32
    n_normal: int = 24
    min_size: int = 160
    max_size: int = 320
    seed: int = 0

    def check(self) -> None:
        for name in ("n_benign", "n_malignant", "n_normal"):
            _require(getattr(self, name) >= 0, f"demo.{name}", "must be ≥ 0")
        _require(self.n_benign + self.n_malignant + self.n_normal > 0, "demo.n_benign",
                 "demo.n_benign + n_malignant + n_normal must be > 0")
        _require(32 <= self.min_size <= self.max_size <= 2048, "demo.min_size",
                 "need 32 ≤ demo.min_size ≤ demo.max_size ≤ 2048")


@dataclass(frozen=True)
class LayoutParams:
    """Where a dataset's images and masks are and how they are named (busiseg.data.layouts); the
    training data (data.*) and every external dataset (external.NAME.*) have these keys."""

    raw_dir: str = "data/demo/Dataset_BUSI_with_GT"
    # "error": stop and list every bad file; "skip": drop affected cases, list them in the report
    on_problem: Literal["error", "skip"] = "error"
    layout: Literal["busi", "paired", "flat", "per_case"] = "busi"
    images_dir: str = "images"
    masks_dir: str = "masks"
    image_name: str = "{id}"
    mask_name: str = "{id}_mask"
    classes: Literal["folders", "csv", "none"] = "folders"
    classes_csv: str = ""
    mask_kind: Literal["region", "outline"] = "region"
    ignore: str = ""  # other layouts: comma-separated file-name patterns to ignore, e.g. '*.csv'
    # a regular expression on the case id whose first group names the patient (or pregnancy):
    # that patient's cases share one split, e.g. HC18's '^(\d+)_' for 010_, 010_2, 010_3
    patient_id: str = ""
    # a multi-frame DICOM's frames that become images: all | first | middle | '1,5,9' (1-based)
    frames: str = "all"
    # a mask at another size than its image: error, or resample it when the aspect ratios agree
    mask_resize: Literal["error", "resample"] = "error"

    def check_layout(self, section: str) -> None:
        _require(bool(self.raw_dir.strip()), f"{section}.raw_dir", "must not be empty")
        for name in ("image_name", "mask_name"):
            _require(getattr(self, name).count("{id}") == 1, f"{section}.{name}",
                     "needs exactly one {id}, e.g. '{id}_mask' or 'mask_{id}'")
        _require(self.layout != "busi" or self.classes == "folders", f"{section}.classes",
                 "BUSI's layout takes its classes from its folders; keep 'folders' or set "
                 f"{section}.layout")
        _require(self.classes != "csv" or bool(self.classes_csv.strip()),
                 f"{section}.classes_csv", f"must name the CSV (case_id,class) when "
                 f"{section}.classes is csv")
        for name in ("images_dir", "masks_dir"):
            value = getattr(self, name)
            _require(bool(value.strip()) and "/" not in value and value not in (".", ".."),
                     f"{section}.{name}", "must name one folder directly under raw_dir")
        _require(self.layout != "paired" or self.images_dir != self.masks_dir,
                 f"{section}.masks_dir", f"must differ from {section}.images_dir (images and "
                 "masks in one folder: layout flat)")
        _require(self.layout not in ("flat", "per_case") or self.image_name != self.mask_name,
                 f"{section}.mask_name", f"must differ from {section}.image_name when images "
                 "and masks share a folder")

        frames = self.frames.strip().lower()
        _require(frames in ("all", "first", "middle")
                 or re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", frames) is not None
                 and all(int(t) >= 1 for t in frames.split(",")), f"{section}.frames",
                 "must be all, first, middle or 1-based frame numbers such as '1,5,9'")
        if self.patient_id:
            try:
                groups = re.compile(self.patient_id).groups
            except re.error as exc:
                groups = -1
                _require(False, f"{section}.patient_id", f"is not a regular expression ({exc})")
            _require(groups >= 1, f"{section}.patient_id", "needs a (group) that captures the "
                     "patient's part of the case id, e.g. '^(\\d+)_'")

    def check(self) -> None:
        """Checked by check_layout, which knows the section's name."""


@dataclass(frozen=True)
class DataParams(LayoutParams):
    # near-duplicate frames: max Hamming distance between 64-bit perceptual hashes; -1 disables
    near_dup_hamming: int = 6
    workers: int = 0  # decoding processes; 0 = one per core
    progress: Literal["auto", "on", "off"] = "auto"  # ingest's and preprocess's bars
    # the audit: what a doubtful label costs (warn keeps and lists it, skip drops it, error stops)
    label_mismatch: Literal["warn", "skip", "error"] = "warn"
    cross_class_duplicates: Literal["warn", "skip", "error"] = "warn"
    burned_marks: Literal["warn", "skip", "error", "mask"] = "warn"

    def check(self) -> None:
        self.check_layout("data")
        _require(self.workers >= 0, "data.workers", "must be ≥ 0 (0 = all cores)")
        _require(-1 <= self.near_dup_hamming <= 32, "data.near_dup_hamming", "must be in -1..32")


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 96
    workers: int = 0  # 0 = one process per core
    # 1: grey (ultrasound); 3: colour kept end to end (endoscopy, dermoscopy, MRI sequences
    # stored as RGB), grey files repeated into three channels
    channels: int = 1

    def check(self) -> None:
        _require(32 <= self.size <= 2048, "preprocess.size",
                 f"must be in 32..2048, got {self.size}")
        _require(self.channels in (1, 3), "preprocess.channels",
                 f"is {self.channels}; 1 (grey) or 3 (colour)")
        _require(self.workers >= 0, "preprocess.workers", "must be ≥ 0 (0 = all cores)")


@dataclass(frozen=True)
class SplitParams:
    seed: int = 0
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    folds: int = 0  # k-fold assignment of the non-test cases (cross-validation); 0 = off

    def check(self) -> None:
        for name in ("train", "val", "test"):
            _require(0.0 <= getattr(self, name) < 1.0, f"split.{name}", "must be in [0, 1)")
        total = self.train + self.val + self.test
        _require(abs(total - 1.0) < 1e-6, "split.train",
                 f"split.train + split.val + split.test must sum to 1, got {total:g}")
        _require(self.train > 0 and self.val > 0 and self.test > 0, "split.val",
                 "train, val and test fractions must all be > 0")
        _require(self.folds == 0 or 2 <= self.folds <= 20, "split.folds", "must be 0 or 2..20")


@dataclass(frozen=True)
class ModelParams:
    arch: str = "unet"
    base: int = 16
    depth: int = 4
    up: Literal["transpose", "bilinear"] = "transpose"
    norm: Literal["batch", "instance", "group", "none"] = "batch"
    dropout: float = 0.0
    deep_supervision: bool = False  # unet_plus_plus only
    # smp_* archs only: encoder name, and ImageNet weights ("none" = random init)
    encoder: str = "tu-tf_efficientnet_lite0"
    encoder_weights: Literal["imagenet", "none"] = "imagenet"
    encoder_weights_path: str = ""  # a local weights file; empty = bundled, else smp's download
    # smp_unet / smp_unetplusplus / smp_manet: widths of the five decoder stages, deepest first;
    # empty = smp's (256, 128, 64, 32, 16). Narrower is faster on a CPU (docs/performance.md)
    decoder_channels: tuple[int, ...] = ()
    # input normalisation applied to uint8/255 images; stored in the model file for predict
    input_mean: float = 0.5
    input_std: float = 0.25

    def check(self) -> None:
        _require(self.base >= 1, "model.base", "must be ≥ 1")
        _require(1 <= self.depth <= 6, "model.depth", "must be in 1..6")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.input_std > 0, "model.input_std", "must be > 0")
        _require(not self.encoder_weights_path or (self.arch.startswith("smp_")
                 and self.encoder_weights == "imagenet"), "model.encoder_weights_path",
                 "is read only by smp_* archs with model.encoder_weights: imagenet; "
                 "clear it or set those")
        _require(not self.decoder_channels or (len(self.decoder_channels) == 5
                 and all(c >= 1 for c in self.decoder_channels)), "model.decoder_channels",
                 f"is {list(self.decoder_channels)}; give five widths ≥ 1, deepest first, e.g. "
                 "[128, 64, 32, 16, 8], or [] for the decoder's own")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 20
    batch_size: int = 8
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: Literal["none", "cosine", "poly", "plateau"] = "cosine"
    warmup_epochs: int = 1
    patience: int = 0  # early stopping on val Dice; 0 = off
    loss: Literal["bce_dice", "focal_dice", "tversky"] = "bce_dice"
    bce_weight: float = 1.0  # weight of the pixel term (BCE or focal)
    dice_weight: float = 1.0  # weight of the region term (soft Dice or Tversky)
    # region term pooled over the batch, or averaged over the images that have a lesion
    dice_reduction: Literal["batch", "image"] = "batch"
    focal_gamma: float = 2.0
    tversky_alpha: float = 0.3  # false-positive weight
    tversky_beta: float = 0.7  # false-negative weight
    # charges normal images for their most confident pixels (the mean of their top logits)
    empty_weight: float = 0.0  # 0 = off
    empty_topk: float = 0.01  # share of an image's pixels pooled into its lesion logit
    # a presence head (is there a lesion at all?) trained with this weight; 0 = no head
    presence_weight: float = 0.0
    # the head learns from the segmentation's features without changing them (stop-gradient):
    # the masks stay those of presence_weight 0
    presence_detach: bool = False
    seed: int = 0
    # with split.folds: members per fold, trained from seeds seed, seed + 1, ... and averaged as
    # one fold model (out of fold an image meets its own fold's seeds only)
    seeds: int = 1
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 = the cores shared by queue workers, processes
    processes: int = 1  # > 1: DistributedDataParallel over this many processes (torchrun)
    # with split.folds: fold models trained side by side, each process on its share of the
    # cores; 0 = chosen by measurement (docs/performance.md), 1 = one fold after another
    fold_workers: int = 0
    # CPU kernels (oneDNN's instruction set): native = the CPU's best (or ONEDNN_MAX_CPU_ISA);
    # avx2 / avx512 pin them, so a record reproduces bit for bit on every CPU of that class
    cpu_isa: Literal["native", "avx2", "avx512"] = "native"
    sync_bn: bool = False  # with processes > 1 on GPUs: BatchNorm statistics over all processes
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU is always repeatable
    progress: Literal["auto", "on", "off"] = "auto"
    val_batch_size: int = 16  # images per forward pass when validating each epoch
    val_every: int = 1  # validate every N epochs and at the last (0: the last alone)

    def check(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be ≥ 1")
        _require(self.batch_size >= 1, "train.batch_size", "must be ≥ 1")
        _require(self.val_batch_size >= 1, "train.val_batch_size", "must be ≥ 1")
        _require(self.val_every >= 0, "train.val_every",
                 "must be ≥ 0 (1 = every epoch, 0 = the last alone)")
        _require(self.val_every == 1 or (self.patience == 0 and self.schedule != "plateau"),
                 "train.val_every", "must be 1 with train.patience > 0 or schedule plateau "
                 "(both read the validation Dice of every epoch)")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be ≥ 0")
        _require(self.warmup_epochs >= 0, "train.warmup_epochs",
                 "must be ≥ 0 (it is capped at train.epochs - 1)")
        _require(self.patience >= 0, "train.patience", "must be ≥ 0 (0 = off)")
        _require(self.bce_weight >= 0 and self.dice_weight >= 0, "train.bce_weight",
                 "loss weights must be ≥ 0")
        _require(self.bce_weight + self.dice_weight > 0, "train.dice_weight",
                 "train.bce_weight + train.dice_weight must be > 0")
        _require(self.focal_gamma >= 0, "train.focal_gamma", "must be ≥ 0")
        _require(self.tversky_alpha >= 0 and self.tversky_beta >= 0, "train.tversky_alpha",
                 "Tversky weights must be ≥ 0")
        _require(self.empty_weight >= 0, "train.empty_weight", "must be ≥ 0 (0 = off)")
        _require(0 < self.empty_topk <= 1, "train.empty_topk",
                 "must be in (0, 1]: the share of pixels pooled into each image's lesion logit")
        _require(self.presence_weight >= 0, "train.presence_weight", "must be ≥ 0 (0 = off)")
        _require(not self.presence_detach or self.presence_weight > 0, "train.presence_detach",
                 "needs a presence head: set train.presence_weight > 0 too")
        _require(self.seeds >= 1, "train.seeds", "must be ≥ 1")
        _require(self.threads >= 0, "train.threads", "must be ≥ 0 (0 = all cores)")
        _require(self.processes >= 1, "train.processes", "must be ≥ 1 (1 = no torchrun)")
        _require(self.fold_workers >= 0, "train.fold_workers",
                 "must be ≥ 0 (0 = chosen for this machine, 1 = one fold after another)")
        _require(self.fold_workers <= 1 or self.processes == 1, "train.fold_workers",
                 "and train.processes > 1 both split the cores; set one of them to 1")


@dataclass(frozen=True)
class AugmentParams:
    """Joint image/mask augmentation, drawn per sample, applied batched on the training device."""

    hflip: float = 0.5  # probability
    vflip: float = 0.0  # probability (ultrasound has a physical top: off by default)
    rotate: float = 10.0  # max degrees
    scale: float = 0.1  # max relative zoom in/out
    shift: float = 0.05  # max shift as a fraction of the size
    elastic: float = 0.0  # displacement strength in pixels of a 256 image; 0 = off
    brightness: float = 0.1  # max additive change (images in [0, 1])
    contrast: float = 0.1  # max relative change
    gamma: float = 0.0  # max |log gamma|
    blur: float = 0.0  # probability of a small Gaussian blur
    noise: float = 0.0  # std of multiplicative speckle noise

    def check(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) >= 0, f"augment.{f.name}", "must be ≥ 0")
        for name in ("hflip", "vflip", "blur"):
            _require(getattr(self, name) <= 1, f"augment.{name}", "is a probability: 0..1")
        _require(self.rotate <= 180, "augment.rotate", "must be ≤ 180 degrees")
        _require(self.scale < 1, "augment.scale", "must be < 1")
        _require(self.shift <= 0.5, "augment.shift", "must be ≤ 0.5")


FITTED_PRESENCE = ("auto", "expected")  # presence decisions evaluate fits on held-out data


def parse_presence_threshold(value: object,
                             source: str = "params.yaml: evaluate.presence_threshold"):
    """The one reading of a presence threshold, wherever it is written (params.yaml, a preset,
    `-S`, `busiseg predict --presence-threshold`): off (and YAML's false or null) is None,
    auto is "auto" (evaluate chooses it on held-out data), expected is "expected" (the
    expected-Dice rule, fitted on held-out data), a number is the lesion score below which a
    mask is emptied."""
    word = value.strip().lower() if isinstance(value, str) else value
    if word is None or word is False or word == "off":  # not 0: a threshold of 0 keeps all
        return None
    if word in FITTED_PRESENCE:
        return word
    try:
        number = float(word) if not isinstance(word, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 <= number <= 1:
        raise BusisegError(f"{source} is {value!r}; choose off, auto, expected or a number in "
                           "[0, 1]")
    return number


PresenceThreshold = Annotated[float | Literal["auto", "expected"] | None,
                              parse_presence_threshold]


@dataclass(frozen=True)
class ClassifyParams:
    """The image classifier beside the mask model (stage classify): is there a lesion, and is it
    malignant. Its members train on train's cache and split, fold by fold, so out of fold an
    image meets only members that never trained on it."""

    # none: no classifier (the lesion score is the mask model's); encoder: the ImageNet
    # EfficientNet-Lite0 encoder (bundled weights), pooled, one logit each for lesion and
    # malignant; segmentation: the same encoder in a U-Net that also learns the masks (they
    # teach it where lesions are, and are discarded)
    kind: Literal["none", "encoder", "segmentation"] = "none"
    seeds: int = 1  # members per fold (per split without folds), seeds seed, seed + 1, ...
    seed: int = 0
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    malignant_weight: float = 1.0  # the malignancy loss's weight beside presence's (0: off)
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = 0  # 0 = all cores (in turn), one each side by side
    member_workers: int = 0  # members trained side by side (0: as the mask folds, 1: in turn)
    cpu_isa: Literal["native", "avx2", "avx512"] = "native"

    def check(self) -> None:
        _require(self.seeds >= 1, "classify.seeds", "must be ≥ 1")
        _require(len(self.decoder_channels) == 5 and all(
            c >= 1 for c in self.decoder_channels),
            "classify.decoder_channels", "must be five widths ≥ 1, e.g. [128, 64, 32, 16, 8]")
        _require(self.member_workers >= 0, "classify.member_workers",
                 "must be ≥ 0 (0 = as measured best)")
        _require(self.epochs >= 1, "classify.epochs", "must be ≥ 1")
        _require(self.batch_size >= 2, "classify.batch_size", "must be ≥ 2 (BatchNorm)")
        _require(self.lr > 0, "classify.lr", "must be > 0")
        _require(self.weight_decay >= 0, "classify.weight_decay", "must be ≥ 0")
        _require(self.malignant_weight >= 0, "classify.malignant_weight", "must be ≥ 0")
        _require(self.threads >= 0, "classify.threads", "must be ≥ 0 (0 = all cores)")


@dataclass(frozen=True)
class EvaluateParams:
    threshold: float = 0.5
    tune_threshold: bool = False  # pick the threshold that maximises val Dice
    tta: bool = False  # average with the horizontally flipped prediction
    largest_cc: bool = False  # keep only the largest connected component
    fill_holes: bool = False
    select_on_val: bool = False  # keep only the enabled pieces that help val Dice
    batch_size: int = 16
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on a GPU, off on CPU
    bootstrap: int = 1000  # resamples of the test images for the 95 % intervals; 0 = none
    bootstrap_seed: int = 0
    # images whose lesion score is below it get an empty mask: off | auto (chosen on held-out
    # data for the best dice_all) | expected (keep a mask iff p·q̂ > 1 − p, fitted on held-out
    # data) | a probability; read by parse_presence_threshold
    presence_threshold: PresenceThreshold = None
    # the per-image trust score (busiseg.inference.confidence) and the share of images, chosen
    # on held-out data, whose score is low enough to flag them for review (0 = none)
    confidence: Literal["entropy", "presence", "combined"] = "entropy"
    review_fraction: float = 0.0
    # NSD's tolerance: boundary pixels this close to the other outline count as agreeing, in
    # pixels of the original image (busiseg.evaluation.metrics.boundary_metrics)
    surface_tolerance: float = 5.0
    progress: Literal["auto", "on", "off"] = "auto"  # evaluate's and external sets' bars

    def check(self) -> None:
        _require(0.0 < self.threshold < 1.0, "evaluate.threshold", "must be in (0, 1)")
        _require(0.0 <= self.review_fraction < 1.0, "evaluate.review_fraction",
                 "must be in [0, 1): the share of images to flag for review (0 = none)")
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be ≥ 1")
        _require(self.bootstrap >= 0, "evaluate.bootstrap", "must be ≥ 0 (0 = no intervals)")
        _require(self.surface_tolerance > 0, "evaluate.surface_tolerance",
                 "must be > 0 (pixels of the original image)")


@dataclass(frozen=True)
class PlotParams:
    n_montage: int = 8
    n_worst: int = 6

    def check(self) -> None:
        _require(self.n_montage >= 1, "plot.n_montage", "must be ≥ 1")
        _require(self.n_worst >= 1, "plot.n_worst", "must be ≥ 1")


@dataclass(frozen=True)
class Params:
    demo: DemoParams = field(default_factory=DemoParams)
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    classify: ClassifyParams = field(default_factory=ClassifyParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    plot: PlotParams = field(default_factory=PlotParams)
    # external validation sets, by name: scored with the trained model, never trained on
    external: dict[str, LayoutParams] = field(default_factory=dict)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        text = message if message.startswith(key) else f"{key} {message}"
        raise BusisegError(f"params.yaml: {text}")


def _suggest(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys: {', '.join(prefix + c for c in choices)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; ints are accepted where floats are expected.
    An Annotated hint names its own reader (e.g. parse_presence_threshold)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return hint.__metadata__[0](value, f"params.yaml: {key}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise BusisegError(f"params.yaml: {key} is {value!r}; choose one of: "
                               + ", ".join(map(str, allowed)))
        return value
    if origin is tuple:  # a list in YAML, e.g. model.decoder_channels: [128, 64, 32, 16, 8]
        if not isinstance(value, list | tuple):
            raise BusisegError(f"params.yaml: {key} must be a list, e.g. [1, 2], got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, typing.get_args(hint)[0])
                     for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and value is None:
            return None
        if float in args and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)  # `str | float`: a number is the float, whatever its spelling
        options = [a for a in args if a is not type(None)]
        for arg in options[1:]:
            try:
                return _coerce(key, value, arg)
            except BusisegError:
                pass
        return _coerce(key, value, options[0])  # none fits: the first option's message
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise BusisegError(f"params.yaml: {key} must be {hint.__name__}, got {value!r} "
                           f"({type(value).__name__})")
    return float(value) if hint is float else value


def _build(cls: type, section: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BusisegError(f"params.yaml: '{section}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise BusisegError(f"params.yaml: unknown key '{section}.{key}'"
                               + _suggest(key, names, f"{section}."))
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    obj = cls(**kwargs)
    obj.check()
    return obj


def parse_params(raw: Any) -> Params:
    """Validate a loaded params mapping; missing keys take their documented defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BusisegError("params.yaml: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Params)
    sections = [f.name for f in dataclasses.fields(Params)]
    for key in raw:
        if key not in sections:
            raise BusisegError(f"params.yaml: unknown section '{key}'" + _suggest(key, sections))
    built = {name: _build(hints[name], name, raw.get(name)) for name in sections
             if name != "external"}
    _require(built["preprocess"].channels == 1 or built["data"].burned_marks == "warn",
             "data.burned_marks", "acts on colour marks burned into grey images; with "
             "preprocess.channels 3 colour is signal and the audit is off: keep warn")
    _require(built["train"].seeds == 1 or built["split"].folds >= 2, "train.seeds",
             "> 1 needs split.folds ≥ 2 (the seeds are averaged per fold); set it to 1")
    return Params(**built, external=_build_external(raw.get("external")))


def _build_external(raw: Any) -> dict[str, LayoutParams]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BusisegError(f"params.yaml: 'external' must map names to datasets, e.g. "
                           f"external: {{udiat: {{raw_dir: PATH, layout: paired}}}}; got {raw!r}")
    out = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise BusisegError(f"params.yaml: external dataset name {name!r} must be letters, "
                               "digits, '-' or '_' (it names metrics/external/NAME.json)")
        if not isinstance(entry, dict) or "raw_dir" not in entry:
            raise BusisegError(f"params.yaml: external.{name} needs at least raw_dir (and the "
                               "layout keys data.* has, where they differ from BUSI's)")
        obj = _build(LayoutParams, f"external.{name}", entry)
        obj.check_layout(f"external.{name}")
        out[name] = obj
    return out


_BARE = re.compile(r"^[A-Za-z_./~][A-Za-z0-9_./:@+~-]*$")  # what Hydra reads back as this string
_NOT_STRINGS = re.compile(r"^(?:true|false|null|nan|inf)$", re.I)


def override_value(value: object) -> str:
    """A value as `dvc exp run -S` takes it. DVC parses each override with Hydra's grammar, which
    refuses `{`, `(`, `\\` and friends unquoted (`data.image_name={id}HC` stops the run): such
    strings go in single quotes, lists as `[a,b]`, booleans as true/false."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str) and (not _BARE.match(value) or _NOT_STRINGS.match(value)):
        quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted) + "'"
    return str(value)


def read_yaml(text: str):
    """The one YAML reader for params and presets: ruamel.yaml's YAML 1.2, as DVC itself reads
    and writes params.yaml, so busiseg and `dvc exp show` agree on every value (`1e-4` and
    DVC's `5e-05` are floats, `off` is a word, only true/false are booleans)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(text)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: params file not found; run from the project root")
    from ruamel.yaml import YAMLError

    try:
        raw = read_yaml(path.read_text())
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BusisegError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_params(raw)

