"""DICOM images: how a scanner's file becomes the grey or colour frames every other reader takes,
and what its pixels measure in millimetres.

A multi-frame file (a cine loop) is many images: each frame is referred to as ``FILE#fNNN``
(DICOM's 1-based frame number) and named ``STEM_fNNN`` wherever a case id or an output name is
made from it, so the layouts, ingest, the cache and predict pass one path around as for PNG.
Nothing but pixels and the pixel size is read out of a file: patient, study and institution
never reach a manifest, a record or a log.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from busiseg.errors import BusisegError, first_line

DICOM_SUFFIXES = (".dcm", ".dicom")
FRAME_MARK = "#f"
_FRAME_REF = re.compile(r"^(?P<file>.+)#f(?P<k>\d+)$")
CM_UNITS = 3  # PhysicalUnitsX/YDirection: 3 = cm (DICOM PS3.3 C.8.5.5.1.15)
TWO_D = 1  # RegionSpatialFormat 1: a 2D tissue image (not M-mode, spectral or a waveform)

# what decodes each compressed transfer syntax, for the one line that names the missing decoder
DECODERS = {
    "1.2.840.10008.1.2.4.50": "Pillow (JPEG baseline)",
    "1.2.840.10008.1.2.4.51": "Pillow or pylibjpeg-libjpeg (JPEG extended)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg with pylibjpeg-libjpeg, or python-gdcm (JPEG lossless)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg with pylibjpeg-libjpeg, or python-gdcm (JPEG lossless)",
    "1.2.840.10008.1.2.4.80": "pyjpegls (JPEG-LS)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (JPEG-LS)",
    "1.2.840.10008.1.2.4.90": "Pillow with OpenJPEG, or pylibjpeg-openjpeg (JPEG 2000)",
    "1.2.840.10008.1.2.4.91": "Pillow with OpenJPEG, or pylibjpeg-openjpeg (JPEG 2000)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg 2 or later (HTJ2K)",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg 2 or later (HTJ2K)",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg 2 or later (HTJ2K)",
    "1.2.840.10008.1.2.5": "pydicom's own RLE decoder, or pylibjpeg-rle",
}


def is_dicom(path: Path) -> bool:
    """By name, or by the 'DICM' magic a PACS export without a suffix still carries."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def split_ref(path: Path) -> tuple[Path, int | None]:
    """(the file, its 1-based frame number or None) of an image path that may name a frame."""
    path = Path(path)
    m = _FRAME_REF.match(path.name)
    if m is None or path.exists():
        return path, None
    return path.with_name(m["file"]), int(m["k"])


def frame_ref(path: Path, frame: int) -> Path:
    return Path(path).with_name(f"{Path(path).name}{FRAME_MARK}{frame:03d}")


def image_stem(path: Path) -> str:
    """The name a case id or an output is made from: ``scan`` for scan.png or a single-frame
    scan.dcm, ``scan_f003`` for frame 3 of scan.dcm."""
    file, frame = split_ref(Path(path))
    stem = file.name[: -len(file.suffix)] if file.suffix else file.name
    return stem if frame is None else f"{stem}_f{frame:03d}"


_last: dict = {}  # the last file read, keyed by (path, size, mtime): see _read


def _read(path: Path, pixels: bool = False):
    """The file's dataset, with its pixel data when `pixels`. The last file read is kept, so a
    cine loop whose frames are read one by one, and its pixel size after them, cost one read of
    the file, not one per frame; a file changed on disk since is read again."""
    import pydicom

    try:
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        kept = _last.get(key)
        if kept is not None and (kept[1] or not pixels):
            return kept[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
        raise BusisegError(f"{path}: not a readable DICOM file ({first_line(exc, 100)}); "
                           "re-export it from the scanner or PACS, or remove it") from None
    _last.clear()
    _last[key] = (ds, pixels)
    return ds


def frame_count(path: Path) -> int:
    ds = _read(path)
    if "PixelData" not in ds and "Rows" not in ds:
        raise BusisegError(f"{path}: a DICOM file without an image (no pixel data: a report, "
                           "a structured report or a segmentation?); remove it or name it in "
                           "data.ignore")
    return max(int(ds.get("NumberOfFrames", 1) or 1), 1)


def select_frames(count: int, rule: str, where: str) -> list[int]:
    """The 1-based frames `rule` picks from `count`: all, first, middle, or numbers '1,5,9'."""
    rule = str(rule).strip().lower()
    if rule == "all":
        return list(range(1, count + 1))
    if rule == "first":
        return [1]
    if rule == "middle":
        return [(count + 1) // 2]
    try:
        wanted = [int(t) for t in rule.split(",") if t.strip()]
    except ValueError:
        raise BusisegError(f"{where} '{rule}': give all, first, middle or frame numbers such as "
                           "'1,5,9'") from None
    if not wanted or min(wanted) < 1:
        raise BusisegError(f"{where} '{rule}': frame numbers start at 1")
    return [k for k in wanted if k <= count]


def frames(path: Path, rule: str = "all", where: str = "data.frames") -> list[Path]:
    """The image paths a DICOM file stands for: itself when it holds one frame, else a frame
    reference for each frame `rule` selects (none when all it selects are beyond the file)."""
    count = frame_count(path)
    if count == 1:
        return [Path(path)]
    return [frame_ref(path, k) for k in select_frames(count, rule, where)]


def read_frame(path: Path):
    """One frame as a PIL image (L or RGB, 8-bit), with `info['conversion']` saying what was
    done, so the image-mode rules of images.to_gray / to_rgb then apply as to any file."""
    from PIL import Image

    file, frame = split_ref(Path(path))
    ds = _read(file, pixels=True)
    count = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    if frame is not None and frame > count:
        raise BusisegError(f"{file}: has {count} frames, not {frame}; choose frames 1..{count}")
    pixels = _decode(file, ds, 0 if frame is None else frame - 1, count)
    kind = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    array, note = _to_8bit(pixels, ds, kind)
    img = Image.fromarray(array, "RGB" if array.ndim == 3 else "L")
    where = f"frame {frame} of {count}" if frame is not None else "image"
    img.info["conversion"] = f"DICOM {kind} {where}" + (f", {note}" if note else "")
    return img


def _decode(file: Path, ds, index: int, count: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index if count > 1 else None)
    except Exception as exc:  # noqa: BLE001 - a decoder failure names the decoder to install
        uid = str(syntax or "")
        name = getattr(syntax, "name", uid or "unknown transfer syntax")
        decoder = DECODERS.get(uid)
        if decoder is not None and ("plugin" in str(exc) or "decod" in str(exc).lower()):
            raise BusisegError(f"{file}: its pixels are {name}, which needs the decoder "
                               f"{decoder}; install it (uv add ...) or convert the file to an "
                               "uncompressed DICOM or PNG") from None
        raise BusisegError(f"{file}: its {name} pixels cannot be decoded "
                           f"({first_line(exc, 100)}); convert the file to an uncompressed "
                           "DICOM or PNG") from None


def _to_8bit(pixels: np.ndarray, ds, kind: str) -> tuple[np.ndarray, str]:
    """Palette through its colour table; MONOCHROME1 inverted (0 is white there); more than 8
    stored bits scaled from their own range, v·255 / (2^bits − 1), as a 16-bit PNG's
    round(v / 257) is; YBR already turned to RGB by the decoder (pydicom's default)."""
    notes = []
    if kind == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        notes.append("read through its colour table")
    bits = int(ds.get("BitsStored", 8) or 8)
    if kind.startswith("YBR"):
        notes.append("to RGB")
    if kind == "PALETTE COLOR" and pixels.dtype.itemsize > 1:
        bits = 16  # the colour table's entries are 16-bit whatever the index's depth
    wide = pixels.astype(np.float64)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        wide -= float(wide.min())
        notes.append("signed values shifted to start at 0")
    if bits > 8 or pixels.dtype.itemsize > 1:
        wide = wide * 255.0 / (2.0 ** bits - 1)
        notes.append(f"{bits}-bit values scaled to 8 bits")
    if kind == "MONOCHROME1":
        wide = 255.0 - wide
        notes.append("MONOCHROME1 inverted")
    array = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array, ", ".join(notes)


def pixel_size_mm(path: Path) -> tuple[tuple[float, float] | None, str]:
    """((row, column) size of a pixel in mm, or None, why). From PixelSpacing, else from the
    ultrasound regions (Sequence of Ultrasound Regions) that are 2D tissue images measured in
    cm; None when neither is there, or when those regions disagree (a dual view at two depths),
    since a lesion's size would then depend on which one it lies in."""
    file, _ = split_ref(Path(path))
    if not is_dicom(file):
        return None, "not a DICOM file"
    ds = _read(file)
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        return (float(spacing[0]), float(spacing[1])), "PixelSpacing"
    regions = [r for r in ds.get("SequenceOfUltrasoundRegions", [])
               if int(r.get("PhysicalUnitsXDirection", 0) or 0) == CM_UNITS
               and int(r.get("PhysicalUnitsYDirection", 0) or 0) == CM_UNITS
               and int(r.get("RegionSpatialFormat", TWO_D) or TWO_D) == TWO_D
               and float(r.get("PhysicalDeltaX", 0) or 0) > 0
               and float(r.get("PhysicalDeltaY", 0) or 0) > 0]
    if not regions:
        return None, "no PixelSpacing and no 2D ultrasound region measured in cm"
    sizes = {(round(float(r.PhysicalDeltaY) * 10, 9), round(float(r.PhysicalDeltaX) * 10, 9))
             for r in regions}
    if len(sizes) > 1:
        return None, f"{len(regions)} ultrasound regions with different pixel sizes"
    return sizes.pop(), "ultrasound region"
