"""Ingest: flatten BUSI class folders into one manifest, accounting for every file.

Every file under raw_dir ends up paired, ignored (OS clutter such as .DS_Store) or listed as a
problem: a silently dropped file would change the dataset without anyone noticing.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg.data import (
    ALL_CLASSES,
    CLASSES,
    LESION_CLASSES,
    MASK_SEP,
    OS_CLUTTER,
    burned_marks,
    conversion_note,
    fill_outline,
    image_to_gray,
    mask_to_bool,
    open_image,
    process_map,
)
from busiseg.errors import BusisegError
from busiseg.layouts import Layout, name_rule, scan

MASK_RE = name_rule("{id}_mask", multi=True)  # BUSI: NAME_mask.png, NAME_mask_1.png, ...
MAX_LINES = 25


@dataclass
class Problem:
    file: str
    kind: str
    message: str


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
    notes: list[Problem] = field(default_factory=list)  # conversions made, kept with a warning
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Finding:
    """A label or content doubt about a readable case; the audit policy says what it costs."""

    case_id: str
    file: str
    kind: str  # label_mismatch | cross_class_duplicate | burned_marks | converted | binarised
    detail: str
    action: str = "kept"  # kept | skipped | masked


@dataclass
class AuditPolicy:
    label_mismatch: str = "warn"  # warn | skip | error
    cross_class_duplicates: str = "warn"
    burned_marks: str = "warn"  # also mask: keep the case, paint the marks over (data.py)


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


def _scan(raw: Path) -> tuple[list[Case], list[Problem], list[str]]:
    """Walk raw_dir and pair images with masks by exact stem; no file is left unaccounted."""
    problems: list[Problem] = []
    ignored: list[str] = []
    cases: list[Case] = []

    def rel(p: Path) -> str:
        return p.relative_to(raw).as_posix()

    def problem(p: Path, kind: str, msg: str) -> None:
        problems.append(Problem(rel(p), kind, f"{p}: {msg}"))

    top = sorted(raw.iterdir(), key=lambda p: p.name)
    class_dirs = {p.name: p for p in top if p.is_dir() and p.name in CLASSES}
    if not class_dirs and not any(p.is_dir() for p in top):
        raise BusisegError(f"data.raw_dir '{raw}' holds no class folders (benign/, malignant/, "
                           "normal/); point data.raw_dir at the Dataset_BUSI_with_GT folder")
    for p in top:
        if p.name.lower() in OS_CLUTTER:
            ignored.append(rel(p))
        elif p.is_file():
            problem(p, "outside_class_folder", "file outside the class folders; move it into "
                    "benign/, malignant/ or normal/, or remove it")
        elif p.name not in CLASSES:
            files = [f for f in sorted(p.rglob("*")) if f.is_file()]
            hint = next((c for c in CLASSES if c == p.name.lower()), None)
            fix = f"rename it to '{hint}'" if hint else "expected benign/, malignant/, normal/"
            for f in files or [p]:
                problem(f, "unknown_class_folder", f"in unknown class folder '{p.name}'; {fix}, "
                        "or remove it")
    for cls in CLASSES:
        if cls not in class_dirs:
            problems.append(Problem(cls, "missing_class_folder",
                                    f"{raw / cls}: class folder is missing; BUSI has benign/, "
                                    "malignant/ and normal/"))
            continue
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for p in sorted(class_dirs[cls].rglob("*")):
            if p.is_dir():
                continue
            if p.name.lower() in OS_CLUTTER:
                ignored.append(rel(p))
                continue
            if p.parent != class_dirs[cls]:
                problem(p, "nested_folder", "inside a nested folder; BUSI class folders are flat: "
                        "move the file up into the class folder or remove it")
                continue
            if p.suffix.lower() != ".png":
                problem(p, "not_png", "not a PNG file; convert it to PNG or remove it")
                continue
            stem = p.name[: -len(p.suffix)]
            m = MASK_RE.match(stem)
            if m:
                masks[m["id"]].append((int(m["k"] or 0), p))
            elif stem in images:
                problem(p, "duplicate_name", f"same name as {images[stem].name}; keep one")
            else:
                images[stem] = p
        if not images:
            problems.append(Problem(cls, "empty_class_folder",
                                    f"{class_dirs[cls]}: class folder has no images; add the "
                                    "images or remove the folder"))
        for stem, img in images.items():
            found = sorted(masks.pop(stem, []), key=lambda t: t[0])
            if not found:
                problem(img, "image_without_mask", f"image has no mask (expected '{stem}_mask.png' "
                        "beside it); add the mask or remove the image")
                continue
            cases.append(Case(stem, cls, rel(img), [rel(p) for _, p in found]))
        for stem, found in masks.items():
            for _, p in found:
                problem(p, "mask_without_image", f"mask has no image (expected '{stem}.png' "
                        "beside it); add the image or remove the mask")
    _flag_duplicate_ids(raw, cases)
    return cases, problems, ignored


def _flag_duplicate_ids(raw: Path, cases: list[Case]) -> None:
    seen: dict[str, Case] = {}
    for c in cases:
        if c.case_id in seen:
            c.problems.append(Problem(c.image, "duplicate_case_id",
                                      f"{raw / c.image}: same case name as "
                                      f"{raw / seen[c.case_id].image}; rename one of them"))
        seen.setdefault(c.case_id, c)


def _check_case(raw: Path, case: Case, outline: bool = False) -> Case:
    """Decode the image and all its masks; record sizes and hashes, or the problems found."""
    path = raw / case.image
    try:
        img = open_image(path)
        gray = image_to_gray(img, path)
    except BusisegError as exc:
        case.problems.append(Problem(case.image, "bad_image", str(exc)))
        return case
    if (note := conversion_note(img)) is not None:
        case.notes.append(Problem(case.image, "converted", note))
    marks = burned_marks(img)
    case.mark_pixels = 0 if marks is None else int(marks.sum())
    union = np.zeros(gray.shape, dtype=bool)
    case.height, case.width = gray.shape
    case.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    case.pixel_sha256 = hashlib.sha256(gray.tobytes() + bytes(str(gray.shape), "ascii")).hexdigest()
    case.dhash = dhash(gray)
    for m in case.masks:
        mp = raw / m
        notes: list[str] = []
        try:
            mask = mask_to_bool(open_image(mp), mp, notes)
            if outline:
                mask = fill_outline(mask)
        except BusisegError as exc:
            case.problems.append(Problem(m, "bad_mask", str(exc)))
            continue
        case.notes += [Problem(m, "binarised", note) for note in notes]
        if mask.shape != gray.shape:
            case.problems.append(Problem(
                m, "mask_size", f"{mp}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{gray.shape[1]}x{gray.shape[0]}; re-export the mask at the image size"))
        else:
            union |= mask
    case.lesion_pixels = int(union.sum())
    return case


def dhash(gray: np.ndarray, side: int = 8) -> int:
    """Difference hash: robust to re-encoding, resizing and small intensity changes."""
    small = Image.fromarray(gray).resize((side + 1, side), Image.Resampling.BOX)
    a = np.asarray(small, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def duplicate_groups(cases: list[Case], max_hamming: int) -> tuple[list[int], list[dict]]:
    """Union-find over exact (same pixels) and near (dHash distance ≤ max_hamming) duplicates."""
    n = len(cases)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    by_pixels: dict[str, int] = {}
    for i, c in enumerate(cases):
        if c.pixel_sha256 in by_pixels:
            union(by_pixels[c.pixel_sha256], i)
        else:
            by_pixels[c.pixel_sha256] = i
    dist = None
    if max_hamming >= 0 and n > 1:
        h = np.array([c.dhash for c in cases], dtype=np.uint64)
        x = (h[:, None] ^ h[None, :]).view(np.uint8).reshape(n, n, 8)
        dist = np.unpackbits(x, axis=2).sum(axis=2)
        ii, jj = np.nonzero(np.triu(dist <= max_hamming, k=1))
        for i, j in zip(ii.tolist(), jj.tolist()):
            union(i, j)
    roots = [find(i) for i in range(n)]
    members: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(roots):
        members[r].append(i)
    group_of = {}
    groups = []
    for gid, (_, idx) in enumerate(sorted(members.items())):
        for i in idx:
            group_of[i] = gid
        if len(idx) > 1:
            exact = len({cases[i].pixel_sha256 for i in idx}) == 1
            maxd = 0 if dist is None else int(dist[np.ix_(idx, idx)].max())
            groups.append({"group": gid, "kind": "exact" if exact else "near",
                           "max_hamming": maxd, "cases": [cases[i].case_id for i in idx],
                           "classes": sorted({cases[i].cls for i in idx})})
    return [group_of[i] for i in range(n)], groups


def ingest(raw_dir: str | Path, on_problem: str = "error", near_dup_hamming: int = 6,
           workers: int = 0, audit: AuditPolicy | None = None,
           layout: Layout | None = None, section: str = "data") -> IngestResult:
    """`section` names the params in messages: data, or external.NAME for an external set."""
    audit, layout = audit or AuditPolicy(), layout or Layout()
    raw = Path(raw_dir)
    key = f"{section}.raw_dir"
    if not raw.exists():
        raise BusisegError(f"{key} '{raw}' does not exist; download the dataset and point "
                           f"{key} at it (BUSI: its Dataset_BUSI_with_GT folder, see README)")
    if not raw.is_dir():
        raise BusisegError(f"{key} '{raw}' is not a folder; point it at the dataset's folder")
    if not any(raw.iterdir()):
        raise BusisegError(f"{key} '{raw}' is empty; unzip the dataset into it")
    cases, problems, ignored = (_scan(raw) if layout.layout == "busi"
                                else _scan_layout(raw, layout, section))
    cases = process_map(partial(_check_case, raw, outline=layout.mask_kind == "outline"), cases,
                        workers, chunksize=16)
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
             "dup_group": g} for c, g in zip(good, groups_of)]
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
    return IngestResult(rows, problems, ignored, groups, metrics, findings)


def _scan_layout(raw: Path, layout: Layout,
                 section: str) -> tuple[list[Case], list[Problem], list[str]]:
    found, troubles, ignored = scan(raw, layout, section)
    cases = [Case(f.case_id, f.cls, f.image, f.masks, patient=f.patient) for f in found]
    problems = [Problem(t.file, t.kind, t.message) for t in troubles]
    _flag_duplicate_ids(raw, cases)
    return cases, problems, ignored


def _join_patients(cases: list[Case], groups_of: list[int]) -> list[int]:
    """Split groups: duplicate groups merged with each patient's (case folder's) images, so the
    split never puts one patient on two sides. Numbered by first appearance."""
    if not any(c.patient for c in cases):
        return groups_of
    parent = {g: g for g in groups_of}

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    first_of: dict[str, int] = {}
    for c, g in zip(cases, groups_of):
        if c.patient:
            root, other = find(g), find(first_of.setdefault(c.patient, g))
            if root != other:
                parent[max(root, other)] = min(root, other)
    roots = [find(g) for g in groups_of]
    number = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return [number[r] for r in roots]


AUDIT_KINDS = {  # finding kind -> (metrics key, the AuditPolicy field that decides its fate)
    "label_mismatch": ("audit_label_mismatch", "label_mismatch"),
    "cross_class_duplicate": ("audit_cross_class_duplicates", "cross_class_duplicates"),
    "burned_marks": ("audit_burned_marks", "burned_marks"),
    "converted": ("audit_converted_images", None),
    "binarised": ("audit_binarised_masks", None),
}


def audit_cases(cases: list[Case], groups: list[dict]) -> list[Finding]:
    """Label and content doubts about readable cases, in manifest order."""
    findings: list[Finding] = []
    by_id = {c.case_id: c for c in cases}
    cross_class = {}
    for g in groups:
        if len(g["classes"]) > 1:
            for cid in g["cases"]:
                others = ", ".join(f"{o} ({by_id[o].cls})" for o in g["cases"] if o != cid)
                cross_class[cid] = (f"{g['kind']} duplicate group spanning "
                                    f"{' and '.join(g['classes'])}: also {others}")
    for c in cases:
        findings += [Finding(c.case_id, n.file, n.kind, n.message) for n in c.notes]
        if c.cls in LESION_CLASSES and c.lesion_pixels == 0:
            findings.append(Finding(c.case_id, c.image, "label_mismatch",
                                    f"class {c.cls} but its masks mark no lesion"))
        elif c.cls not in LESION_CLASSES and c.lesion_pixels > 0:
            findings.append(Finding(c.case_id, c.image, "label_mismatch",
                                    f"class {c.cls} but its masks mark {c.lesion_pixels} "
                                    "lesion pixels"))
        if c.case_id in cross_class:
            findings.append(Finding(c.case_id, c.image, "cross_class_duplicate",
                                    cross_class[c.case_id]))
        if c.mark_pixels:
            findings.append(Finding(c.case_id, c.image, "burned_marks",
                                    f"{c.mark_pixels} coloured pixels burned into the grey image "
                                    "(calipers, arrows or text)"))
    return findings


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


def audit_counts(findings: list[Finding]) -> dict:
    """Cases per finding kind (masks for binarised), and cases the audit dropped."""
    counts = {}
    for kind, (key, _) in AUDIT_KINDS.items():
        hits = [f for f in findings if f.kind == kind]
        counts[key] = len(hits) if kind == "binarised" else len({f.case_id for f in hits})
    counts["audit_skipped"] = len({f.case_id for f in findings if f.action == "skipped"})
    return counts


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
