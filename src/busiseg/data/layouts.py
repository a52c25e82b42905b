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

from busiseg.data import dicom
from busiseg.data.classes import CLASSES
from busiseg.errors import BusisegError
from busiseg.params import LayoutParams as Layout

PATIENT_SEP = "\x1f"  # between a case's patient keys: its folder, its data.patient_id group
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *dicom.DICOM_SUFFIXES)
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
    """Every case under `raw` in layout `lay`, every problem file, every ignored file. `section`
    names the params in messages: data, or external.NAME."""
    return Scanner(raw, lay, section).scan()


class Scanner:
    """One walk over a dataset folder: a method per layout yields the folders it reads, and
    every file the layout has no place for is named as a problem (or, when data.ignore or the
    classes CSV accounts for it, listed as ignored)."""

    def __init__(self, raw: Path, lay: Layout, section: str) -> None:
        self.busi = lay.layout == "busi"
        if self.busi:  # BUSI's layout is the flat one with fixed rules, PNG only, three classes
            lay = replace(lay, layout="flat", image_name="{id}", mask_name="{id}_mask",
                          classes="folders")
        self.raw, self.lay, self.section = raw, lay, section
        self.suffixes = (".png",) if self.busi else IMAGE_SUFFIXES
        self.troubles: list[Problem] = []
        self.ignored: list[str] = []
        self.metadata = {classes_csv_path(raw, lay).resolve()} if lay.classes == "csv" else set()
        self.patterns = [g.strip() for g in lay.ignore.split(",") if g.strip()]

    def rel(self, p: Path) -> str:
        return p.relative_to(self.raw).as_posix()

    def trouble(self, p: Path, kind: str, msg: str) -> None:
        # the classes CSV kept beside the images, and files `ignore` names, are accounted for
        if p.resolve() in self.metadata or any(fnmatch(p.name, g) for g in self.patterns):
            self.ignored.append(self.rel(p))
        else:
            self.troubles.append(Problem(self.rel(p) if p != self.raw else ".", kind,
                                         f"{p}: {msg.replace('data.', self.section + '.')}"))

    def entries(self, folder: Path) -> list[Path]:
        """Folder contents minus OS clutter (listed as ignored)."""
        out = []
        for p in sorted(folder.iterdir(), key=lambda p: p.name):
            if p.name.lower() in OS_CLUTTER:
                self.ignored.append(self.rel(p))
            else:
                out.append(p)
        return out

    def every_file(self, p: Path, kind: str, msg: str) -> None:
        """A stray file, or each file of a stray folder, named on its own."""
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())) or [p]:
            if f.name.lower() in OS_CLUTTER:
                self.ignored.append(self.rel(f))
            else:
                self.trouble(f, kind, msg)

    def images_in(self, folder: Path) -> list[Path]:
        out = []
        for p in self.entries(folder):
            if p.is_dir():
                self.every_file(p, "nested_folder", "in a folder the layout has no place for; "
                                "move the file up or remove it (or check data.layout)")
            elif self.busi and p.suffix.lower() not in self.suffixes:
                self.trouble(p, "not_png", "not a PNG file (BUSI's layout is PNG only); convert "
                             "it to PNG or remove it")
            elif (p.suffix.lower() in self.suffixes
                  and p.suffix.lower() not in dicom.DICOM_SUFFIXES):
                out.append(p)
            elif dicom.is_dicom(p):  # by name, or a PACS export's file without a suffix
                out += self.frames_of(p)
            else:
                self.trouble(p, "not_image", f"not an image file ({', '.join(self.suffixes)}); "
                             "remove it, or name it in data.ignore")
        return out

    def frames_of(self, p: Path) -> list[Path]:
        """A DICOM file's images: itself, or one reference per frame data.frames selects."""
        try:
            return dicom.frames(p, self.lay.frames, f"{self.section}.frames")
        except BusisegError as exc:
            self.trouble(p, "bad_image", str(exc).split(": ", 1)[-1])
            return []

    def flat(self, root: Path):
        """(patient, image candidates, mask candidates) for each folder the layout reads."""
        files = self.images_in(root)
        yield "", files, files

    def paired(self, root: Path):
        lay = self.lay
        dirs = {lay.images_dir: root / lay.images_dir, lay.masks_dir: root / lay.masks_dir}
        for p in self.entries(root):
            if p.name not in dirs:
                self.every_file(p, "outside_layout", f"outside '{lay.images_dir}/' and "
                                f"'{lay.masks_dir}/'; move it into one, remove it, or name it "
                                "in data.ignore")
        for name, d in dirs.items():
            if not d.is_dir():
                self.trouble(root, "missing_folder", f"has no '{name}/' folder; set "
                             "data.images_dir and data.masks_dir to the image and mask folders")
        if all(d.is_dir() for d in dirs.values()):
            yield "", self.images_in(dirs[lay.images_dir]), self.images_in(dirs[lay.masks_dir])
        else:  # the folder that is there still has every file named
            for d in dirs.values():
                if d.is_dir():
                    for f in self.images_in(d):
                        self.trouble(f, "unpaired_folder", "its partner folder is missing; "
                                     "see the missing_folder problem")

    def per_case(self, root: Path):
        for p in self.entries(root):
            if p.is_file():
                self.trouble(p, "outside_case_folder", "file outside the case folders "
                             "(data.layout per_case); move it into its case's folder, remove "
                             "it, or name it in data.ignore")
            else:
                files = self.images_in(p)
                yield self.rel(p), files, files

    def class_roots(self) -> list[tuple[str, Path]]:
        """(class, folder) for each class folder; the dataset root alone without them."""
        if self.lay.classes != "folders":
            return [("", self.raw)]
        busi, section, raw = self.busi, self.section, self.raw
        also = "" if busi else " (or set data.classes to csv or none)"
        roots = []
        for p in self.entries(raw):
            if p.is_dir() and p.name.lower() in CLASSES:  # any case: Benign/ is benign/
                roots.append((p.name.lower(), p))
            elif p.is_file():
                self.trouble(p, "outside_class_folder", "file outside the class folders; move "
                             "it into benign/, malignant/ or normal/, or remove it" + also)
            else:
                self.every_file(p, "unknown_class_folder", f"in unknown class folder "
                                f"'{p.name}' (expected benign/, malignant/, normal/); move the "
                                "file into one, or remove it" + also)
        if not roots:
            fix = (f"point {section}.raw_dir at the Dataset_BUSI_with_GT folder" if busi else
                   f"set {section}.classes to csv or none, or point {section}.raw_dir at the "
                   "folder above them")
            raise BusisegError(f"{section}.raw_dir '{raw}' holds no class folders (benign/, "
                               f"malignant/, normal/); {fix}")
        if busi:
            for cls in sorted(set(CLASSES) - {cls for cls, _ in roots}, key=CLASSES.index):
                self.troubles.append(Problem(cls, "missing_class_folder", f"{raw / cls}: class "
                                             "folder is missing; BUSI has benign/, malignant/ "
                                             "and normal/"))
        return roots

    def pair(self, cls: str, patient: str, images: list[Path], masks: list[Path]) -> list[Found]:
        """Each image with its masks by the name rules; strays named as problems."""
        raw, lay, trouble = self.raw, self.lay, self.trouble
        image_rule = name_rule(lay.image_name, multi=False)
        mask_rule = name_rule(lay.mask_name, multi=True)
        by_id: dict[str, Path] = {}
        mask_of: dict[str, dict[int, Path]] = defaultdict(dict)
        same_folder = images is masks
        for p in masks:
            m = mask_rule.match(dicom.image_stem(p))
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
            m = image_rule.match(dicom.image_stem(p))
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
                trouble(img, "image_without_mask", f"image has no mask (expected '{want}.*' "
                        f"{where}); add the mask, remove the image, or check data.mask_name")
                continue
            case_id = f"{Path(patient).name}/{cid}" if patient else cid
            out.append(Found(case_id, cls, img.relative_to(raw).as_posix(),
                             [p.relative_to(raw).as_posix() for p in found], patient))
        for cid, found in mask_of.items():
            want = lay.image_name.replace("{id}", cid)
            for p in found.values():
                trouble(p, "mask_without_image", f"mask has no image (expected '{want}.*'); add "
                        "the image, remove the mask, or check data.image_name")
        return out

    def scan(self) -> tuple[list[Found], list[Problem], list[str]]:
        lay = self.lay
        folders = {"flat": self.flat, "paired": self.paired, "per_case": self.per_case}
        found: list[Found] = []
        for cls, root in self.class_roots():
            for patient, images, masks in folders[lay.layout](root):
                if self.busi and not images:
                    self.troubles.append(Problem(self.rel(root), "empty_class_folder",
                                                 f"{root}: class folder has no images; add the "
                                                 "images or remove the folder"))
                found += self.pair(cls, patient, images, masks)
        if lay.classes == "csv":
            found = _classes_from_csv(self.raw, lay, found, self.trouble, self.section)
        if lay.patient_id:
            rule = re.compile(lay.patient_id)
            for f in found:  # a case id the rule does not match stays a patient of its own
                if (m := rule.search(f.case_id)) is not None and m.group(1):
                    key = f"id:{m.group(1)}"  # joined with the folder's key, never replacing it
                    f.patient = f"{f.patient}{PATIENT_SEP}{key}" if f.patient else key
        return found, self.troubles, self.ignored


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
