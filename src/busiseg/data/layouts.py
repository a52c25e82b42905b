"""Dataset layouts: which file is an image, which is its mask, and which class. One scanner
reads them all, described by a few `data.*` params instead of code per dataset:

- `busi` (the default): BUSI's class folders `benign/ malignant/ normal/`, each flat, `NAME.png`
  beside `NAME_mask.png`, `NAME_mask_1.png`, … (PNG only; all three folders expected);

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
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

from busiseg.data.classes import CLASSES
from busiseg.errors import BusisegError
from busiseg.params import LayoutParams as Layout

PATIENT_SEP = "\x1f"  # between a case's patient keys: its folder, its data.patient_id group
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OS_CLUTTER = {".ds_store", "thumbs.db", "desktop.ini"}  # listed as ignored, never a problem


@dataclass
class Found:
    """A paired case before decoding: what ingest's Case is built from."""

    case_id: str
    cls: str  # "" when classes come from the mask (decided after decoding)
    image: str
    masks: list[str]
    patient: str = ""


@dataclass
class Problem:
    """A file (or folder) that cannot be used as it is: `file` relative to raw_dir, `kind` a
    stable name for tests and reports, `message` one line naming the path and the fix."""

    file: str
    kind: str
    message: str


def name_rule(pattern: str, multi: bool) -> re.Pattern:
    r"""`{id}_mask` -> ^(?P<id>.+?)_mask(?:_(?P<k>\d+))?$ ; the `_k` part only for mask rules
    with a suffix, where it cannot be mistaken for part of the id. (params.py checks that a
    rule holds exactly one {id}.)"""
    prefix, _, suffix = pattern.partition("{id}")
    extra = r"(?:_(?P<k>\d+))?" if multi and suffix else ""
    return re.compile(f"^{re.escape(prefix)}(?P<id>.+?){re.escape(suffix)}{extra}$")


def classes_csv_path(raw: Path, lay: Layout) -> Path:
    """The one place the classes CSV is looked for: relative to raw_dir (or an absolute path)."""
    return raw / lay.classes_csv


def scan(raw: Path, lay: Layout, section: str = "data") -> tuple[list[Found], list[Problem],
                                                                  list[str]]:
    """`section` names the params in messages: data, or external.NAME."""
    busi = lay.layout == "busi"
    if busi:  # BUSI's layout is the flat one with fixed rules, PNG only and all three classes
        lay = replace(lay, layout="flat", image_name="{id}", mask_name="{id}_mask",
                      classes="folders")
    suffixes = (".png",) if busi else IMAGE_SUFFIXES
    troubles: list[Problem] = []
    ignored: list[str] = []

    def rel(p: Path) -> str:
        return p.relative_to(raw).as_posix()

    metadata = {classes_csv_path(raw, lay).resolve()} if lay.classes == "csv" else set()
    patterns = [g.strip() for g in lay.ignore.split(",") if g.strip()]

    def trouble(p: Path, kind: str, msg: str) -> None:
        # the classes CSV kept beside the images, and files `ignore` names, are accounted for
        if p.resolve() in metadata or any(fnmatch(p.name, g) for g in patterns):
            ignored.append(rel(p))
        else:
            troubles.append(Problem(rel(p) if p != raw else ".", kind,
                                    f"{p}: {msg.replace('data.', section + '.')}"))

    def entries(folder: Path) -> list[Path]:
        """Folder contents minus OS clutter (listed as ignored)."""
        out = []
        for p in sorted(folder.iterdir(), key=lambda p: p.name):
            if p.name.lower() in OS_CLUTTER:
                ignored.append(rel(p))
            else:
                out.append(p)
        return out

    def every_file(p: Path, kind: str, msg: str) -> None:
        """A stray file, or each file of a stray folder, named on its own."""
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())) or [p]:
            if f.name.lower() in OS_CLUTTER:
                ignored.append(rel(f))
            else:
                trouble(f, kind, msg)

    def images_in(folder: Path) -> list[Path]:
        out = []
        for p in entries(folder):
            if p.is_dir():
                every_file(p, "nested_folder", "in a folder the layout has no place for; move "
                           "the file up or remove it (or check data.layout)")
            elif busi and p.suffix.lower() not in suffixes:
                trouble(p, "not_png", "not a PNG file (BUSI's layout is PNG only); convert it "
                        "to PNG or remove it")
            elif p.suffix.lower() not in suffixes:
                trouble(p, "not_image", f"not an image file ({', '.join(suffixes)}); "
                        "remove it, or name it in data.ignore")
            else:
                out.append(p)
        return out

    def groups(root: Path):
        """(patient, image candidates, mask candidates) per folder the layout reads."""
        if lay.layout == "flat":
            files = images_in(root)
            yield "", files, files
        elif lay.layout == "paired":
            dirs = {lay.images_dir: root / lay.images_dir, lay.masks_dir: root / lay.masks_dir}
            for p in entries(root):
                if p.name not in dirs:
                    every_file(p, "outside_layout", f"outside '{lay.images_dir}/' and "
                               f"'{lay.masks_dir}/'; move it into one, remove it, or name it in "
                               "data.ignore")
            for name, d in dirs.items():
                if not d.is_dir():
                    trouble(root, "missing_folder", f"has no '{name}/' folder; set "
                            "data.images_dir and data.masks_dir to the image and mask folders")
            if all(d.is_dir() for d in dirs.values()):
                yield "", images_in(dirs[lay.images_dir]), images_in(dirs[lay.masks_dir])
            else:  # the folder that is there still has every file named
                for d in dirs.values():
                    if d.is_dir():
                        for f in images_in(d):
                            trouble(f, "unpaired_folder", "its partner folder is missing; "
                                    "see the missing_folder problem")
        else:  # per_case
            for p in entries(root):
                if p.is_file():
                    trouble(p, "outside_case_folder", "file outside the case folders "
                            "(data.layout per_case); move it into its case's folder, remove it, "
                            "or name it in data.ignore")
                else:
                    files = images_in(p)
                    yield rel(p), files, files

    image_rule = name_rule(lay.image_name, multi=False)
    mask_rule = name_rule(lay.mask_name, multi=True)
    if lay.classes == "folders":
        roots = []
        for p in entries(raw):
            if p.is_dir() and p.name.lower() in CLASSES:  # any case: Benign/ is benign/
                roots.append((p.name.lower(), p))
            elif p.is_file():
                trouble(p, "outside_class_folder", "file outside the class folders; move it "
                        "into benign/, malignant/ or normal/, or remove it"
                        + ("" if busi else " (or set data.classes to csv or none)"))
            else:
                every_file(p, "unknown_class_folder", f"in unknown class folder '{p.name}' "
                           "(expected benign/, malignant/, normal/); move the file into one, "
                           "or remove it" + ("" if busi else
                                             " (or set data.classes to csv or none)"))
        if not roots:
            fix = (f"point {section}.raw_dir at the Dataset_BUSI_with_GT folder" if busi else
                   f"set {section}.classes to csv or none, or point {section}.raw_dir at the "
                   "folder above them")
            raise BusisegError(f"{section}.raw_dir '{raw}' holds no class folders (benign/, "
                               f"malignant/, normal/); {fix}")
        if busi:
            for cls in sorted(set(CLASSES) - {cls for cls, _ in roots}, key=CLASSES.index):
                troubles.append(Problem(cls, "missing_class_folder", f"{raw / cls}: class "
                                        "folder is missing; BUSI has benign/, malignant/ and "
                                        "normal/"))
    else:
        roots = [("", raw)]
    found: list[Found] = []
    for cls, root in roots:
        for patient, images, masks in groups(root):
            if busi and not images:
                troubles.append(Problem(rel(root), "empty_class_folder", f"{root}: class folder "
                                        "has no images; add the images or remove the folder"))
            found += _pair(raw, cls, patient, images, masks, image_rule, mask_rule, lay, trouble)
    if lay.classes == "csv":
        found = _classes_from_csv(raw, lay, found, trouble, section)
    if lay.patient_id:
        rule = re.compile(lay.patient_id)
        for f in found:  # a case id the rule does not match stays a patient of its own
            if (m := rule.search(f.case_id)) is not None and m.group(1):
                key = f"id:{m.group(1)}"  # joined with the folder's key, never replacing it
                f.patient = f"{f.patient}{PATIENT_SEP}{key}" if f.patient else key
    return found, troubles, ignored


def _pair(raw, cls, patient, images, masks, image_rule, mask_rule, lay, trouble) -> list[Found]:
    by_id: dict[str, Path] = {}
    mask_of: dict[str, dict[int, Path]] = defaultdict(dict)
    same_folder = images is masks
    for p in masks:
        m = mask_rule.match(p.name[: -len(p.suffix)])
        if not m:
            if not same_folder:
                trouble(p, "unmatched_name", f"name does not follow data.mask_name "
                        f"'{lay.mask_name}'; rename it or change data.mask_name")
            continue
        k = int(m.groupdict().get("k") or 0)
        if k in mask_of[m["id"]]:
            trouble(p, "duplicate_name", f"same mask name as {mask_of[m['id']][k].name}; keep "
                    "one")
        else:
            mask_of[m["id"]][k] = p
    claimed = {p for found in mask_of.values() for p in found.values()}
    for p in images:
        if same_folder and p in claimed:
            continue
        m = image_rule.match(p.name[: -len(p.suffix)])
        if not m:
            trouble(p, "unmatched_name", (
                f"name follows neither data.image_name '{lay.image_name}' nor data.mask_name "
                f"'{lay.mask_name}'; rename it or change the rules") if same_folder else (
                f"name does not follow data.image_name '{lay.image_name}'; rename it or change "
                "data.image_name"))
        elif m["id"] in by_id:
            trouble(p, "duplicate_name", f"same case id as {by_id[m['id']].name}; keep one")
        else:
            by_id[m["id"]] = p
    out = []
    for cid, img in by_id.items():
        found = [p for _, p in sorted(mask_of.pop(cid, {}).items())]
        if not found:
            want = lay.mask_name.replace("{id}", cid)
            where = "beside it" if same_folder else f"in {lay.masks_dir}/"
            trouble(img, "image_without_mask", f"image has no mask (expected '{want}.*' {where}); "
                    "add the mask, remove the image, or check data.mask_name")
            continue
        case_id = f"{Path(patient).name}/{cid}" if patient else cid
        out.append(Found(case_id, cls, img.relative_to(raw).as_posix(),
                         [p.relative_to(raw).as_posix() for p in found], patient))
    for cid, found in mask_of.items():
        want = lay.image_name.replace("{id}", cid)
        for p in found.values():
            trouble(p, "mask_without_image", f"mask has no image (expected '{want}.*'); add the "
                    "image, remove the mask, or check data.image_name")
    return out


def _classes_from_csv(raw: Path, lay: Layout, found: list[Found], trouble,
                      section: str) -> list[Found]:
    """Class per case from a CSV with columns case_id and class (a per_case layout may name the
    case folder instead of each image)."""
    path = classes_csv_path(raw, lay)
    if not path.is_file():
        raise BusisegError(f"{section}.classes_csv '{lay.classes_csv}' not found (looked for "
                           f"{path}); put the CSV of case_id,class in {section}.raw_dir or set "
                           f"{section}.classes: none")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BusisegError(f"{path}: not a readable UTF-8 CSV ({str(exc)[:80]}); save it as "
                           "CSV with columns case_id,class") from None
    if not rows or not {"case_id", "class"} <= set(rows[0]):
        raise BusisegError(f"{path}: needs a header with columns case_id and class (benign, "
                           "malignant or normal)")
    table: dict[str, str] = {}
    for n, r in enumerate(rows, start=2):
        cid, cls = (r.get("case_id") or "").strip(), (r.get("class") or "").strip().lower()
        if not cid:
            continue
        if table.get(cid, cls) != cls:
            raise BusisegError(f"{path}: line {n} gives case '{cid}' class '{cls}' but an "
                               f"earlier row gives '{table[cid]}'; keep one")
        table[cid] = cls
    out = []
    for f in found:
        cls = table.get(f.case_id) or (table.get(Path(f.patient).name) if f.patient else None)
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
