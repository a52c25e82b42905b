"""Ingest: pair every image of a dataset with its masks into one manifest, accounting for every
file, and audit what was paired.

Every file under raw_dir ends up paired, ignored (OS clutter such as .DS_Store) or listed as a
problem: a silently dropped file would change the dataset without anyone noticing. Which file is
an image, a mask or a class is the layout's business (layouts.scan); this decodes each case.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from busiseg.data import dicom
from busiseg.data.audit import (
    AUDIT_KINDS,
    AuditPolicy,
    Finding,
    audit_cases,
    audit_counts,
    components,
    dhash,
    duplicate_groups,
)
from busiseg.data.classes import ALL_CLASSES, CLASSES
from busiseg.data.images import (
    burned_marks,
    close_outline,
    fit_mask,
    mask_to_bool,
    open_image,
    process_map,
    to_gray,
    to_rgb,
)
from busiseg.data.layouts import PATIENT_SEP, Layout, Problem, scan
from busiseg.data.manifest import MASK_SEP
from busiseg.errors import BusisegError

MAX_LINES = 25


@dataclass
class Case:
    case_id: str
    cls: str
    image: str
    masks: list[str]
    width: int = 0
    height: int = 0
    sha256: str = ""
    pixel_sha256: str = ""
    dhash: int = 0
    lesion_pixels: int = 0
    mark_pixels: int = 0
    patient: str = ""  # per_case layouts: the case folder; its images share one split
    pixel_height_mm: float | None = None  # a DICOM's pixel size, where it states one
    pixel_width_mm: float | None = None
    notes: list[Problem] = field(default_factory=list)  # conversions made, kept with a warning
    problems: list[Problem] = field(default_factory=list)


@dataclass
class IngestResult:
    rows: list[dict]  # the manifest, one dict per image, in manifest order
    problems: list[Problem]
    ignored: list[str]
    duplicate_groups: list[dict]
    metrics: dict
    findings: list[Finding] = field(default_factory=list)

    @property
    def manifest(self):
        """The manifest as a DataFrame (pandas is imported only when asked for)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


class IngestError(BusisegError):
    def __init__(self, problems: list[Problem], section: str = "data", audit: bool = False):
        self.problems = problems
        lines = [p.message for p in problems[:MAX_LINES]]
        if len(problems) > MAX_LINES:
            lines.append(f"... and {len(problems) - MAX_LINES} more problems")
        if audit:
            lines.append(f"ingest: {len(problems)} audit finding(s) refused by their policy "
                         "(each line names the param to change)")
        else:
            lines.append(f"ingest: {len(problems)} problem(s); fix the files above, or set "
                         f"{section}.on_problem: skip to drop them and list them in the report")
        super().__init__("\n".join(lines))


def _flag_duplicate_ids(raw: Path, cases: list[Case]) -> None:
    seen: dict[str, Case] = {}
    for c in cases:
        if c.case_id in seen:
            c.problems.append(Problem(c.image, "duplicate_case_id",
                                      f"{raw / c.image}: same case name as "
                                      f"{raw / seen[c.case_id].image}; rename one of them"))
        seen.setdefault(c.case_id, c)


def _check_case(raw: Path, case: Case, outline: bool = False, channels: int = 1,
                resample: bool = False) -> Case:
    """Decode the image and all its masks; record sizes, hashes and a DICOM's pixel size, or
    the problems found. With 3 channels the conversion stated is to colour, and colour is
    signal, not a burned-in mark. `resample`: data.mask_resize (images.fit_mask)."""
    path = raw / case.image
    try:
        img = open_image(path)
        gray, note = to_gray(img, path)
        if channels == 3:
            note = to_rgb(img, path)[1]
        if dicom.is_dicom(dicom.split_ref(path)[0]):
            _pixel_size(case, path)
    except BusisegError as exc:
        case.problems.append(Problem(case.image, "bad_image", str(exc)))
        return case
    if note is not None:
        case.notes.append(Problem(case.image, "converted", note))
    marks = burned_marks(img) if channels == 1 else None
    case.mark_pixels = 0 if marks is None else int(marks.sum())
    union = np.zeros(gray.shape, dtype=bool)
    case.height, case.width = gray.shape
    case.sha256 = hashlib.sha256(dicom.split_ref(path)[0].read_bytes()).hexdigest()  # the file
    case.pixel_sha256 = hashlib.sha256(gray.tobytes() + bytes(str(gray.shape), "ascii")).hexdigest()
    case.dhash = dhash(gray)
    for m in case.masks:
        mp = raw / m
        notes: list[str] = []
        try:
            mask = mask_to_bool(open_image(mp), mp, notes)
        except BusisegError as exc:
            case.problems.append(Problem(m, "bad_mask", str(exc)))
            continue
        case.notes += [Problem(m, "binarised", note) for note in notes]
        if outline:
            mask, how = close_outline(mask)
            if how == "edge":
                case.notes.append(Problem(m, "open_outline", "outline runs out of the frame; "
                                          "closed along the image edge and filled"))
            elif how == "nothing":
                case.problems.append(Problem(
                    m, "unfillable_outline", f"{mp}: the outline encloses no region, not even "
                    "closed along the image edge (an open or broken curve); redraw it closed"))
                continue
        try:
            mask, resampled = fit_mask(mask, gray.shape, mp, resample)
        except BusisegError as exc:
            case.problems.append(Problem(m, "mask_size", str(exc)))
            continue
        if resampled:
            case.notes.append(Problem(m, "mask_resampled", resampled))
        union |= mask
    case.lesion_pixels = int(union.sum())
    return case


def _pixel_size(case: Case, path: Path) -> None:
    """The pixel's size in mm the file states, or a note saying why sizes stay in pixels."""
    size, why = dicom.pixel_size_mm(path)
    if size is None:
        case.notes.append(Problem(case.image, "no_pixel_size", f"pixel size unknown ({why}); "
                                  "lesion sizes are given in pixels only"))
    else:
        case.pixel_height_mm, case.pixel_width_mm = size


@dataclass(frozen=True)
class IngestOptions:
    """How to read a dataset, from the data.* params: what to do with a bad case (error | skip),
    the near-duplicate distance (-1: off), decoding processes (0: one per core), the audit's
    policy, the folder layout, preprocess.channels (3: the colour-mark audit is off,
    `audit_burned_marks` absent from the metrics) and whether to show a bar."""

    on_problem: str = "error"
    near_dup_hamming: int = 6
    workers: int = 0
    audit: AuditPolicy = field(default_factory=AuditPolicy)
    layout: Layout = field(default_factory=Layout)
    channels: int = 1
    progress: bool = False


def ingest(raw_dir: str | Path, options: IngestOptions | None = None,
           section: str = "data") -> IngestResult:
    """`section` names the params in messages: data, or external.NAME for an external set."""
    o = options or IngestOptions()
    on_problem, near_dup_hamming, workers = o.on_problem, o.near_dup_hamming, o.workers
    audit, layout, channels, progress = o.audit, o.layout, o.channels, o.progress
    raw = Path(raw_dir)
    key = f"{section}.raw_dir"
    if not raw.exists():
        raise BusisegError(f"{key} '{raw}' does not exist; download the dataset and point "
                           f"{key} at it (BUSI: its Dataset_BUSI_with_GT folder, see README)")
    if not raw.is_dir():
        raise BusisegError(f"{key} '{raw}' is not a folder; point it at the dataset's folder")
    if not any(raw.iterdir()):
        raise BusisegError(f"{key} '{raw}' is empty; unzip the dataset into it")
    found, problems, ignored = scan(raw, layout, section)
    cases = [Case(f.case_id, f.cls, f.image, f.masks, patient=f.patient) for f in found]
    _flag_duplicate_ids(raw, cases)
    cases = process_map(partial(_check_case, raw, outline=layout.mask_kind == "outline",
                                channels=channels, resample=layout.mask_resize == "resample"),
                        cases, workers, chunksize=16,
                        desc="ingest", progress=progress)
    for c in cases:
        problems.extend(c.problems)
        if not c.cls:  # data.classes: none
            c.cls = "lesion" if c.lesion_pixels else "normal"
    if problems and on_problem == "error":
        raise IngestError(problems, section)
    good = [c for c in cases if not c.problems]
    if not good:
        raise BusisegError(f"{key} '{raw}': no usable image/mask pairs"
                           + (f" ({len(problems)} problems skipped)" if problems else ""))
    good.sort(key=lambda c: (ALL_CLASSES.index(c.cls), _natural_key(c.case_id)))
    dups = duplicate_groups(good, near_dup_hamming)
    findings = audit_cases(good, dups[1])
    kept = apply_audit(raw, good, findings, audit, section)
    # the groups change only when the audit dropped cases
    groups_of, groups = dups if len(kept) == len(good) else duplicate_groups(kept, near_dup_hamming)
    good = kept
    groups_of = _join_patients(good, groups_of)
    rows = [{"case_id": c.case_id, "class": c.cls, "image": c.image,
             "masks": MASK_SEP.join(c.masks), "n_masks": len(c.masks), "width": c.width,
             "height": c.height, "sha256": c.sha256, "dhash": f"{c.dhash:016x}",
             "dup_group": g, **pixel_size_columns(good, c)} for c, g in zip(good, groups_of)]
    metrics = {
        "n_images": len(good),
        "n_masks": sum(len(c.masks) for c in good),
        "n_multi_mask": sum(len(c.masks) > 1 for c in good),
        **{f"n_images_{cls}": sum(c.cls == cls for c in good) for cls in ALL_CLASSES
           if cls in CLASSES or any(c.cls == cls for c in good)},
        "n_problems": len(problems),
        "n_ignored": len(ignored),
        "n_duplicate_groups": len(groups),
        "n_images_in_duplicate_groups": sum(len(g["cases"]) for g in groups),
        **audit_counts(findings),
    }
    if channels == 3:  # not measured: saying 0 would claim the images were checked
        del metrics["audit_burned_marks"]
    return IngestResult(rows, problems, ignored, groups, metrics, findings)


def pixel_size_columns(cases: list[Case], case: Case) -> dict:
    """A pixel's height and width in mm (empty where unknown), only in a manifest where some
    image states them, so a PNG dataset's manifest is what it always was."""
    if all(c.pixel_height_mm is None for c in cases):
        return {}
    return {"pixel_height_mm": "" if case.pixel_height_mm is None else case.pixel_height_mm,
            "pixel_width_mm": "" if case.pixel_width_mm is None else case.pixel_width_mm}


def _join_patients(cases: list[Case], groups_of: list[int]) -> list[int]:
    """Split groups: duplicate groups merged with each patient's (case folder's) images, so the
    split never puts one patient on two sides. Numbered by first appearance."""
    if not any(c.patient for c in cases):
        return groups_of
    node = {g: i for i, g in enumerate(dict.fromkeys(groups_of))}  # groups in file order
    first_of: dict[str, int] = {}
    pairs = [(first_of.setdefault(key, node[g]), node[g]) for c, g in zip(cases, groups_of)
             for key in filter(None, c.patient.split(PATIENT_SEP))]  # folder, patient_id group
    joined = components(len(node), pairs)
    return [joined[node[g]] for g in groups_of]


def apply_audit(raw: Path, cases: list[Case], findings: list[Finding],
                audit: AuditPolicy, section: str = "data") -> list[Case]:
    """Raise for findings whose policy is error; drop the cases of those whose policy is skip."""
    def policy(f: Finding) -> str:
        field_name = AUDIT_KINDS[f.kind][1]
        return "warn" if field_name is None else getattr(audit, field_name)

    refused = [f for f in findings if policy(f) == "error"]
    if refused:
        raise IngestError([Problem(
            f.file, f.kind, f"{raw / f.file}: {f.detail}; correct the file, or set "
            f"{section}.{AUDIT_KINDS[f.kind][1]}: warn to keep it or skip to drop it")
            for f in refused], section, audit=True)
    skipped = {f.case_id for f in findings if policy(f) == "skip"}
    for f in findings:
        if f.case_id in skipped:
            f.action = "skipped"
        elif policy(f) == "mask":
            f.action = "masked"
    kept = [c for c in cases if c.case_id not in skipped]
    if not kept:
        raise BusisegError(f"{section}.raw_dir '{raw}': the audit skipped all {len(cases)} "
                           f"cases; set its policies ({section}.label_mismatch, ...) to warn")
    return kept


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def report_dict(result: IngestResult, raw_dir: str) -> dict:
    return {
        "raw_dir": str(raw_dir),
        "problems": [asdict(p) | {"action": "skipped"} for p in result.problems],
        "ignored": result.ignored,
        "duplicate_groups": result.duplicate_groups,
        "audit": [asdict(f) for f in result.findings],
    }
