"""What a predict run leaves beside its masks: predictions.csv (one row per image, appended as
each image is done) and predictions.json (how the masks were made and what became of every
input), so a folder of masks can be traced without the shell history.

Every input's path is written absolute (`input_path`): rows added by runs started in different
folders (`--continue`) all resolve, wherever the reader stands."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from busiseg import busiseg_version
from busiseg.data.dicom import image_stem
from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_path, atomic_write_text
from busiseg.inference.predict_options import Outputs, Predictor, RunOptions, SourcedSettings
from busiseg.inference.segment import MaskSettings
from busiseg.inference.sizes import SIZE_COLUMNS

SCORES = "predictions.csv"
RECORD = "predictions.json"
COLUMNS = ("image", "mask", "lesion_score", "lesion", "presence_threshold", "confidence",
           "flagged", "review_threshold", "presence_rule", *SIZE_COLUMNS, "p_lesion",
           "p_malignant")
PATHS = "absolute"  # how the record's image paths are written, said in predictions.json


@dataclass
class Failure:
    """An input that was not predicted, and why."""

    path: Path
    reason: str


def mask_name(image: Path) -> str:
    return f"{image_stem(image)}_mask.png"


def input_path(path: Path) -> str:
    """An input as the record names it: absolute, without resolving links, so the name the user
    gave stays recognisable."""
    return os.path.abspath(path)


@dataclass
class Tally:
    """Every input of a run, accounted for: `found`, the images found to predict before
    --continue skipped those done; the rows written; those skipped and those that failed."""

    found: int
    written: list[dict]
    skipped: list[Failure]
    failures: list[Failure]


def run_record(predictor: Predictor, model_path: Path, chosen: SourcedSettings,
               outputs: Outputs, options: RunOptions, tally: Tally, finished: bool) -> dict:
    """predictions.json: enough to redo the run (version, model digests, settings, command) and
    to account for every input of this run. Written when the run starts (`finished` false,
    nothing written yet) and again when it ends."""
    return {
        "busiseg": busiseg_version(),
        "finished": finished,
        "command": list(options.command) if options.command is not None else None,
        "cwd": str(Path.cwd()),  # where the command ran: its relative arguments start here
        "image_paths": PATHS,
        "model": {"path": str(model_path.resolve()), "kind": predictor.kind,
                  "weights_digest": predictor.weights_digest,
                  "file_sha256": predictor.file_sha256},
        "device": str(predictor.device),
        "settings": chosen.settings.as_dict(),
        "settings_source": dict(chosen.sources),
        "outputs": {"mask_values": [0, outputs.mask_value], "overlays": outputs.overlays,
                    "probabilities": outputs.probabilities, "continue": outputs.resume,
                    "mask_marks": options.mask_marks, "scores": SCORES},
        "inputs": {"found": tally.found,
                   "written": [{"image": r["image"], "mask": r["mask"]} for r in tally.written],
                   "skipped": [{"path": input_path(f.path), "reason": f.reason}
                               for f in tally.skipped],
                   "failed": [{"path": input_path(f.path), "reason": f.reason}
                              for f in tally.failures]},
    }


def write_record(path: Path, record: dict) -> None:
    try:
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise BusisegError(f"--out {path.parent}: cannot write {path.name} "
                           f"({first_line(exc)}); free space or choose another folder") from None


def read_scores(path: Path) -> list[dict]:
    """An earlier run's whole rows (a row cut short by a kill is left out), for --continue."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as fh:
            return [row for row in csv.DictReader(fh)
                    if row.get("mask") and None not in row.values() and None not in row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BusisegError(f"--continue: {path} is unreadable ({first_line(exc)}); move it "
                           "aside, or predict without --continue") from None


def write_scores(path: Path, rows: list[dict], settings: MaskSettings) -> None:
    """predictions.csv with its header and `rows` (the rows --continue keeps), replacing any
    earlier file; `append_score` adds each image as it is done. Per image: its lesion score (the
    presence head's probability, or the most confident pixel for a model without one), the
    decision (1: a lesion was drawn), the presence threshold that made it (empty: none) and the
    rule (off, threshold, or expected: MaskSettings.keep); its
    confidence (`settings.confidence`), the review flag (1: a reader should look) and the
    threshold that set it (empty: none); the drawn lesion's area, long and short axis
    (inference.sizes) in the image's pixels, and in mm where a DICOM states its pixel size
    (empty otherwise); with a packaged image classifier, its p_lesion (then the lesion score)
    and p_malignant (empty without one, or where it learnt no malignancy). A row kept from an
    earlier run keeps the thresholds that run applied."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        _score_writer(fh, header=True).writerows(_score_row(r, settings) for r in rows)


def append_score(path: Path, row: dict, settings: MaskSettings) -> None:
    """One image's row, on disk before the next image starts."""
    try:
        with open(path, "a", newline="") as fh:
            _score_writer(fh).writerow(_score_row(row, settings))
    except OSError as exc:
        raise BusisegError(f"--out {path.parent}: cannot write {path.name} "
                           f"({first_line(exc)}); free space or choose another folder") from None


def _score_writer(fh, header: bool = False):
    writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n", extrasaction="ignore")
    if header:
        writer.writeheader()
    return writer


def _score_row(row: dict, settings: MaskSettings) -> dict:
    def blank(value: float | None) -> float | str:
        return "" if value is None else value

    return {"presence_threshold": blank(settings.presence_threshold),
            "presence_rule": settings.presence_rule,
            "review_threshold": blank(settings.review_threshold), **row}
