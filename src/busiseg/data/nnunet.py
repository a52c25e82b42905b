"""Export to nnU-Net v2's raw dataset layout, so that nnU-Net trains on exactly busiseg's cases,
pixels and duplicate-grouped folds, and its test predictions are scored like busiseg's.

Images and masks are read by the training cache's rules (`Reading`: burned-in marks, outlines,
masks at another size, channels) but at their original size: nnU-Net plans its own resampling,
and a comparison means something only if both tools saw the same pixels and the same union of
each image's masks.
nnU-Net's own folds would be random over images and put near-duplicate frames of one lesion on
both sides, so busiseg's folds go into splits_final.json (nnU-Net's documentation:
dataset_format.md for the layout, manual_data_splits.md for the folds).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg import busiseg_version
from busiseg.data.cache import Reading, read_pair
from busiseg.data.images import process_map
from busiseg.data.manifest import mask_list, read_manifest_rows
from busiseg.errors import BusisegError
from busiseg.runtime.progress import show_progress

MANIFEST = Path("data/manifest.csv")
SPLIT = Path("data/split.csv")
FILE_ENDING = ".png"
LABELS = {"background": 0, "lesion": 1}
CHANNEL_NAMES = {1: {"0": "ultrasound"}, 3: {"0": "R", "1": "G", "2": "B"}}
READER = "NaturalImage2DIO"
DATASET_JSON, SPLITS_JSON, CASES_CSV = "dataset.json", "splits_final.json", "cases.csv"
DATASET_FOLDER = re.compile(r"Dataset\d{3}_\S+")  # what nnU-Net looks for under nnUNet_raw


@dataclass(frozen=True)
class ExportCase:
    """One image under its nnU-Net name (`fold` -1 outside k-fold), with what reading it needs."""

    name: str
    case_id: str
    cls: str
    split: str
    fold: int
    dup_group: str
    image: str
    masks: tuple[str, ...]
    width: int
    height: int

    @property
    def test(self) -> bool:
        return self.split == "test"


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    n_train: int
    n_test: int
    n_folds: int
    k_fold: bool


def read_split_rows(path: str | Path = SPLIT) -> list[dict]:
    """With the csv module, as the manifest is read: pandas would cost seconds to import."""
    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: split not found; run the split stage first (dvc repro)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def case_names(n: int) -> list[str]:
    """busi_0001, ...: BUSI's ids hold spaces and brackets, which nnU-Net's file names must not,
    and a number in manifest order is unique and stable where a cleaned-up id could collide."""
    width = max(4, len(str(n)))
    return [f"busi_{i:0{width}d}" for i in range(1, n + 1)]


def export_cases(manifest: list[dict], split: list[dict]) -> list[ExportCase]:
    """The manifest's cases in its order, each with its split and fold. A split written for
    another manifest is refused: its folds would silently cover other images."""
    by_id = {r["case_id"]: r for r in split}
    odd = sorted({r["case_id"] for r in manifest} ^ set(by_id))
    if odd or len(by_id) != len(split):
        which = f"'{odd[0]}' is in one only" if odd else "the split lists a case twice"
        raise BusisegError(f"{SPLIT} and {MANIFEST} disagree ({which}); run dvc repro")
    try:
        cases = [ExportCase(name, row["case_id"], row["class"], s["split"], int(s["fold"]),
                            str(row["dup_group"]), row["image"], tuple(mask_list(row)),
                            int(row["width"]), int(row["height"]))
                 for name, row in zip(case_names(len(manifest)), manifest)
                 for s in [by_id[row["case_id"]]]]
    except (KeyError, ValueError) as exc:
        raise BusisegError(f"{MANIFEST} or {SPLIT} was written by another busiseg version "
                           f"({type(exc).__name__}: {exc}); run dvc repro") from None
    check_folds(cases)
    return cases


def check_folds(cases: list[ExportCase]) -> None:
    """k-fold (folds 0..K-1 over every non-test case) or train/val, nothing in between: a
    training case in no fold would be trained on by every fold model and validated by none."""
    train = [c for c in cases if not c.test]
    if not train:
        raise BusisegError(f"{SPLIT}: every case is a test case; nothing to train nnU-Net on")
    folds = sorted({c.fold for c in train})
    k_fold = any(c.fold >= 0 for c in train)
    ok = (folds == list(range(len(folds))) if k_fold
          else all(c.split in ("train", "val") for c in train))
    if not ok:
        raise BusisegError(f"{SPLIT}: folds {folds} and splits "
                           f"{sorted({c.split for c in train})} are neither k-fold nor train/val; "
                           "run dvc repro")


def nnunet_splits(cases: list[ExportCase]) -> list[dict[str, list[str]]]:
    """splits_final.json: fold k validates on busiseg's fold k and trains on the others, as
    busiseg's fold model k does; without folds, one entry: train and val as split."""
    train = [c for c in cases if not c.test]
    if all(c.fold < 0 for c in train):
        return [{"train": [c.name for c in train if c.split == "train"],
                 "val": [c.name for c in train if c.split == "val"]}]
    return [{"train": [c.name for c in train if c.fold != k],
             "val": [c.name for c in train if c.fold == k]}
            for k in range(max(c.fold for c in train) + 1)]


def dataset_json(cases: list[ExportCase], channels: int, name: str, raw_dir: str) -> dict:
    """The keys dataset_format.md requires, the PNG reader named so nnU-Net need not guess it,
    and where the data came from."""
    n_train = sum(not c.test for c in cases)
    return {
        "name": name,
        "description": f"images of {raw_dir} exported by busiseg "
                       f"{busiseg_version()}: union lesion masks at the original size, "
                       f"busiseg's duplicate-grouped folds in {SPLITS_JSON}, test cases in "
                       f"imagesTs/labelsTs, busiseg's case ids in {CASES_CSV}",
        "channel_names": CHANNEL_NAMES[channels],
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": READER,
    }


def check_out(out: Path) -> None:
    """A new or empty folder only: files left from another export would mix into this one."""
    if out.is_file():
        raise BusisegError(f"--out {out}: is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        what = ("holds an earlier export (dataset.json)" if (out / DATASET_JSON).exists()
                else "is not empty")
        raise BusisegError(f"--out {out}: {what}; remove it or choose another folder")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A folder beside `out` that becomes `out` when the block ends without an error and is
    removed otherwise, so a failed or killed export leaves no half-written dataset behind."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty: check_out saw to it
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_case(job: tuple[str, ExportCase, Reading, str, str]) -> None:
    raw, case, reading, image_path, label_path = job
    root = Path(raw)
    pixels, union = read_pair(root, case.image, case.masks, reading, (case.height, case.width))
    Image.fromarray(pixels).save(image_path)
    Image.fromarray(union.astype(np.uint8)).save(label_path)


def write_cases(cases: list[ExportCase], raw_dir: Path, reading: Reading, folder: Path,
                workers: int = 0, progress: bool = False) -> None:
    """Training cases to imagesTr/labelsTr, test cases to imagesTs/labelsTs (nnU-Net never reads
    the latter; they are there to predict and to score)."""
    jobs = []
    for c in cases:
        images, labels = ("imagesTs", "labelsTs") if c.test else ("imagesTr", "labelsTr")
        jobs.append((str(raw_dir), c, reading, str(folder / images / f"{c.name}_0000.png"),
                     str(folder / labels / f"{c.name}.png")))
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    process_map(_write_case, jobs, workers, desc="export", progress=progress)


def write_tables(folder: Path, cases: list[ExportCase], info: dict) -> None:
    (folder / DATASET_JSON).write_text(json.dumps(info, indent=2) + "\n")
    (folder / SPLITS_JSON).write_text(json.dumps(nnunet_splits(cases), indent=2) + "\n")
    with open(folder / CASES_CSV, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["name", "case_id", "class", "split", "fold", "dup_group"])
        writer.writerows([c.name, c.case_id, c.cls, c.split, c.fold, c.dup_group] for c in cases)


def export_nnunet(params, out: str | Path, manifest: str | Path = MANIFEST,
                  split: str | Path = SPLIT) -> ExportSummary:
    """`params`: the project's (load_params); the manifest and split as the pipeline wrote them."""
    out = Path(out)
    cases = export_cases(read_manifest_rows(manifest), read_split_rows(split))
    raw = Path(params.data.raw_dir)
    if not raw.is_dir():
        raise BusisegError(f"data.raw_dir '{raw}' is not a folder; point it at the dataset "
                           f"that {MANIFEST} was ingested from, or run dvc repro")
    check_out(out)
    reading = Reading.from_params(params)
    info = dataset_json(cases, reading.channels, out.resolve().name, str(raw))
    with staged_folder(out) as folder:
        write_cases(cases, raw, reading, folder, params.preprocess.workers,
                    show_progress(params.data.progress))
        write_tables(folder, cases, info)
    train = [c for c in cases if not c.test]
    k_fold = any(c.fold >= 0 for c in train)
    return ExportSummary(out, len(train), len(cases) - len(train),
                         len(nnunet_splits(cases)), k_fold)


def summary_line(s: ExportSummary) -> str:
    folds = (f"{s.n_folds} folds in {SPLITS_JSON}" if s.k_fold
             else f"{SPLITS_JSON}: one fold, split's train/val")
    line = (f"export-dataset: {s.n_train} training cases ({folds}), "
            f"{s.n_test} test cases -> {s.out} (nnU-Net v2 raw dataset)")
    if not DATASET_FOLDER.fullmatch(s.out.resolve().name):
        line += "; nnU-Net wants it as nnUNet_raw/DatasetXXX_Name"
    return line
