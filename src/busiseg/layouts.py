"""Dataset layouts besides BUSI's: which file is an image, which is its mask, and which class.

BUSI's layout (class folders, `NAME.png` beside `NAME_mask.png`, `NAME_mask_1.png`, …) is read by
ingest itself. The others are described by a few `data.*` params instead of code per dataset:

- `paired`: images in `images_dir`, masks in `masks_dir`;
- `flat`: images and masks side by side in one folder;
- `per_case`: one folder per case or patient, each holding image/mask pairs; its images stay in
  one split (a patient's frames in train and test would leak, as duplicate frames would);

with a name rule each for images and masks (`image_name`, `mask_name`, `{id}` standing for the
case id; a mask rule with a suffix also takes `_1`, `_2`, … for further masks of one image), and
classes from class folders, from a CSV, or from the mask alone (`lesion` or `normal`). As with
BUSI, every file under the folder ends up paired, ignored (OS clutter) or a named problem.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from busiseg.data import CLASSES, OS_CLUTTER
from busiseg.errors import BusisegError
from busiseg.params import LayoutParams as Layout

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Found:
    """A paired case before decoding: what ingest's Case is built from."""

    case_id: str
    cls: str  # "" when classes come from the mask (decided after decoding)
    image: str
    masks: list[str]
    patient: str = ""


@dataclass
class Trouble:
    file: str
    kind: str
    message: str


def name_rule(pattern: str, multi: bool) -> re.Pattern:
    """`{id}_mask` -> ^(?P<id>.+?)_mask(?:_(?P<k>\\d+))?$ ; the `_k` part only for mask rules
    with a suffix, where it cannot be mistaken for part of the id."""
    prefix, sep, suffix = pattern.partition("{id}")
    if not sep or "{id}" in suffix:
        raise BusisegError(f"data name rule '{pattern}' needs exactly one '{{id}}', e.g. "
                           "'{id}_mask' or 'mask_{id}'")
    extra = r"(?:_(?P<k>\d+))?" if multi and suffix else ""
    return re.compile(f"^{re.escape(prefix)}(?P<id>.+?){re.escape(suffix)}{extra}$")


def scan(raw: Path, lay: Layout) -> tuple[list[Found], list[Trouble], list[str]]:
    troubles: list[Trouble] = []
    ignored: list[str] = []

    def rel(p: Path) -> str:
        return p.relative_to(raw).as_posix()

    metadata = {(raw / lay.classes_csv).resolve()} if lay.classes == "csv" else set()
    patterns = [g.strip() for g in lay.ignore.split(",") if g.strip()]

    def trouble(p: Path, kind: str, msg: str) -> None:
        # the classes CSV kept beside the images, and files data.ignore names, are accounted for
        if p.resolve() in metadata or any(fnmatch(p.name, g) for g in patterns):
            ignored.append(rel(p))
        else:
            troubles.append(Trouble(rel(p) if p != raw else ".", kind, f"{p}: {msg}"))

    image_rule = name_rule(lay.image_name, multi=False)
    mask_rule = name_rule(lay.mask_name, multi=True)
    roots = _class_roots(raw, trouble, ignored, rel) if lay.classes == "folders" else [("", raw)]
    found: list[Found] = []
    for cls, root in roots:
        for patient, images, masks in _groups(root, lay, trouble, ignored, rel):
            found += _pair(raw, cls, patient, images, masks, image_rule, mask_rule, lay, trouble)
    if lay.classes == "csv":
        found = _classes_from_csv(raw, lay.classes_csv, found, trouble)
    return found, troubles, ignored


def _class_roots(raw, trouble, ignored, rel) -> list[tuple[str, Path]]:
    roots = []
    for p in sorted(raw.iterdir(), key=lambda p: p.name):
        if p.name.lower() in OS_CLUTTER:
            ignored.append(rel(p))
        elif p.is_dir() and p.name.lower() in CLASSES:
            roots.append((p.name.lower(), p))
        else:
            trouble(p, "unknown_class_folder", "not a class folder (benign/, malignant/, normal/) "
                    "though data.classes is folders; move it into one, remove it, or set "
                    "data.classes to csv or none")
    if not roots:
        raise BusisegError(f"data.raw_dir '{raw}' holds no class folders (benign/, malignant/, "
                           "normal/) though data.classes is folders; set data.classes to csv or "
                           "none, or point data.raw_dir at the folder above them")
    return roots


def _files(folder: Path, trouble, ignored, rel) -> list[Path]:
    """The image files directly in `folder`; anything else is ignored clutter or a problem."""
    out = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.lower() in OS_CLUTTER:
            ignored.append(rel(p))
        elif p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()) or [p]:
                trouble(f, "nested_folder", "in a folder the layout has no place for; move the "
                        "file up or remove it (or check data.layout)")
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            trouble(p, "not_image", f"not an image file ({', '.join(IMAGE_SUFFIXES)}); "
                    "remove it")
        else:
            out.append(p)
    return out


def _groups(root: Path, lay: Layout, trouble, ignored, rel):
    """(patient, image candidates, mask candidates) per folder the layout reads."""
    if lay.layout == "flat":
        files = _files(root, trouble, ignored, rel)
        yield "", files, files
    elif lay.layout == "paired":
        dirs = {lay.images_dir: root / lay.images_dir, lay.masks_dir: root / lay.masks_dir}
        for name, d in dirs.items():
            if not d.is_dir():
                trouble(root, "missing_folder", f"has no '{name}/' folder; set data.images_dir "
                        "and data.masks_dir to the image and mask folders")
        for p in sorted(root.iterdir(), key=lambda p: p.name):
            if p.name.lower() in OS_CLUTTER:
                ignored.append(rel(p))
            elif p.name not in dirs:
                for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
                    trouble(f, "outside_layout", f"outside '{lay.images_dir}/' and "
                            f"'{lay.masks_dir}/'; move it into one or remove it")
        if all(d.is_dir() for d in dirs.values()):
            yield "", _files(dirs[lay.images_dir], trouble, ignored, rel), \
                _files(dirs[lay.masks_dir], trouble, ignored, rel)
    else:  # per_case
        for p in sorted(root.iterdir(), key=lambda p: p.name):
            if p.name.lower() in OS_CLUTTER:
                ignored.append(rel(p))
            elif p.is_file():
                trouble(p, "outside_case_folder", "file outside the case folders "
                        "(data.layout per_case); move it into its case's folder or remove it")
            else:
                files = _files(p, trouble, ignored, rel)
                yield p.name, files, files


def _pair(raw, cls, patient, images, masks, image_rule, mask_rule, lay, trouble) -> list[Found]:
    by_id: dict[str, Path] = {}
    mask_of: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    same_folder = images is masks
    for p in masks:
        m = mask_rule.match(p.name[: -len(p.suffix)])
        if m:
            mask_of[m["id"]].append((int(m.groupdict().get("k") or 0), p))
        elif not same_folder:
            trouble(p, "unmatched_name", f"name does not follow data.mask_name "
                    f"'{lay.mask_name}'; rename it or change data.mask_name")
    claimed = {p for found in mask_of.values() for _, p in found}
    for p in images:
        if same_folder and p in claimed:
            continue
        m = image_rule.match(p.name[: -len(p.suffix)])
        if not m:
            trouble(p, "unmatched_name", f"name follows neither data.image_name "
                    f"'{lay.image_name}' nor data.mask_name '{lay.mask_name}'; rename it or "
                    "change the rules" if same_folder else f"name does not follow data.image_name "
                    f"'{lay.image_name}'; rename it or change data.image_name")
        elif m["id"] in by_id:
            trouble(p, "duplicate_name", f"same case id as {by_id[m['id']].name}; keep one")
        else:
            by_id[m["id"]] = p
    out = []
    for cid, img in by_id.items():
        found = sorted(mask_of.pop(cid, []), key=lambda t: t[0])
        if not found:
            want = lay.mask_name.replace("{id}", cid)
            trouble(img, "image_without_mask", f"image has no mask (expected '{want}.*' "
                    f"{'beside it' if same_folder else 'in ' + lay.masks_dir + '/'}); add the "
                    "mask, remove the image, or check data.mask_name")
            continue
        case_id = f"{patient}/{cid}" if patient else cid
        out.append(Found(case_id, cls, img.relative_to(raw).as_posix(),
                         [p.relative_to(raw).as_posix() for _, p in found], patient))
    for cid, found in mask_of.items():
        want = lay.image_name.replace("{id}", cid)
        for _, p in found:
            trouble(p, "mask_without_image", f"mask has no image (expected '{want}.*'); add the "
                    "image, remove the mask, or check data.image_name")
    return out


def _classes_from_csv(raw: Path, path_text: str, found: list[Found], trouble) -> list[Found]:
    """Class per case from a CSV with columns case_id and class (a per_case layout may name the
    case folder instead of each image)."""
    path = Path(path_text)
    if not path.is_absolute() and not path.is_file():
        path = raw / path_text
    if not path.is_file():
        raise BusisegError(f"data.classes_csv '{path_text}' not found (looked as given and under "
                           f"{raw}); give the CSV of case_id,class or set data.classes: none")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"case_id", "class"} <= set(rows[0]):
        raise BusisegError(f"{path}: needs a header with columns case_id and class (benign, "
                           "malignant or normal)")
    table = {r["case_id"].strip(): r["class"].strip().lower() for r in rows}
    out = []
    for f in found:
        cls = table.get(f.case_id, table.get(f.patient))
        if cls is None:
            trouble(raw / f.image, "no_class", f"case '{f.case_id}' has no row in {path}; add "
                    "one (case_id,class)")
        elif cls not in CLASSES:
            trouble(raw / f.image, "unknown_class", f"class '{cls}' in {path} is not benign, "
                    "malignant or normal; correct the row")
        else:
            f.cls = cls
            out.append(f)
    return out
