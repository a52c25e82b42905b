"""Reading image and mask files.

One place decides how a file becomes a grey image or a binary lesion mask, and how an image is
resized for a model, so ingest (which checks every file), preprocess (which caches them) and
predict (which reads new images) agree exactly.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg.data import dicom
from busiseg.errors import BusisegError, first_line
from busiseg.runtime.progress import bar

IMAGE_MODES = ("L", "RGB", "RGBA", "LA")
MASK_MODES = ("1", "L", "RGB", "RGBA", "LA")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")

# a burned-in mark: pixels whose colour channels differ by ≥ MARK_SPREAD (grey ultrasound has
# none), at least MARK_PIXELS of them, so stray chroma noise from a re-encoded copy is not one
MARK_SPREAD = 48
MARK_PIXELS = 20

MAX_PIXELS = 64_000_000  # a 8k×8k ultrasound frame is already absurd; refuse bombs


def open_image(path: Path) -> Image.Image:
    """Open and fully decode (PNG, JPEG, BMP, TIFF, ..., DICOM and a DICOM file's frames), so
    truncated or corrupt files fail here and not mid-training; a file named .png must be a PNG.
    A DICOM file is read by pydicom, never by PIL, which takes some for the TIFF their preamble
    may hold and ignores the DICOM around it."""
    path = Path(path)
    file, frame = dicom.split_ref(path)
    if frame is not None or dicom.is_dicom(path):
        if not file.is_file():
            raise BusisegError(f"{file}: no such file; check the path")
        if file.stat().st_size == 0:
            raise BusisegError(f"{file}: empty (0-byte) file; re-download or remove it")
        return dicom.read_frame(path)
    try:
        if path.stat().st_size == 0:
            raise BusisegError(f"{path}: empty (0-byte) file; re-download or remove it")
        with warnings.catch_warnings():  # PIL's own bomb warning: the check below says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise BusisegError(f"{path}: {img.width}x{img.height} pixels is more than any "
                               f"ultrasound frame ({MAX_PIXELS:,} at most); resize or remove it")
        img.load()
    except BusisegError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unreadable file
        raise BusisegError(f"{path}: not a readable image ({first_line(exc, 120)}); "
                           "re-download or remove it") from None
    if img.format != "PNG" and path.suffix.lower() == ".png":
        raise BusisegError(f"{path}: is a {img.format} file with a .png name; "
                           "convert it to PNG or remove it")
    return img


def image_to_gray(img: Image.Image, path: Path) -> np.ndarray:
    """The image as 8-bit grey, by the rules of `to_gray`."""
    return to_gray(img, path)[0]


COLOUR_SHARE = 0.05  # an RGB image with this share of coloured pixels is colour, not grey


def to_gray(img: Image.Image, path: Path) -> tuple[np.ndarray, str | None]:
    """(8-bit grey pixels, what was done to get them). Ultrasound is single-channel; every other
    storage is converted by one stated rule, or refused with the fix:

    - 8-bit grey: as is;
    - RGB whose channels agree (BUSI's grey frames stored as RGB; a few coloured marks aside):
      luma, which is the grey value; colour RGB (≥ 5 % coloured pixels): luma, and said;
    - an alpha channel: ignored (the image taken as opaque), and said when some pixel is not;
    - palette: through its RGB colours, then as RGB;
    - 1-bit: black and white as 0 and 255;
    - 16-bit, or 32-bit integers within 0–65535: round(v / 257), so 0 and 65535 stay black and
      white; 32-bit integers outside that range, and floats: their own range [min, max]
      stretched to 0–255, except floats within [0, 1], scaled by 255;
    - CMYK, YCbCr, HSV: to RGB by PIL's conversion, then luma;
    - DICOM: each frame decoded by pydicom to 8-bit grey or RGB first (dicom.read_frame: palette
      through its colour table, YBR to RGB, MONOCHROME1 inverted, more than 8 bits scaled from
      their stored range), then by these rules;
    - anything else (LAB, multi-frame oddities): refused."""
    gray, note = _to_gray(img, path)
    read = img.info.get("conversion")  # what reading a DICOM frame did (dicom.read_frame)
    return gray, "; ".join(n for n in (read, note) if n) or None


def _to_gray(img: Image.Image, path: Path) -> tuple[np.ndarray, str | None]:
    mode, name = img.mode, _mode_name(img.mode)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8), None
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8), f"{name} image read as 0 and 255"
    if mode in SIXTEEN_BIT or mode == "F":
        wide = np.asarray(img, dtype=np.float64)
        low, high = (float(wide.min()), float(wide.max())) if wide.size else (0.0, 0.0)
        if mode != "F" and low >= 0 and high <= 65535:
            gray = np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8)
            return gray, f"{name} image converted to 8-bit grey as round(v / 257)"
        if mode == "F" and low >= 0 and high <= 1:
            return np.rint(wide * 255).astype(np.uint8), f"{name} image in [0, 1] scaled by 255"
        span = high - low if high > low else 1.0
        gray = np.clip(np.rint((wide - low) / span * 255), 0, 255).astype(np.uint8)
        return gray, (f"{name} image stretched from its own range [{low:g}, {high:g}] to "
                      "0-255")
    img, notes = _stored_colour(img, path)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        coloured = float(((rgb.max(axis=-1) - rgb.min(axis=-1)) >= MARK_SPREAD).mean())
        if coloured >= COLOUR_SHARE:
            notes.append(f"colour image ({coloured:.0%} coloured pixels) reduced to grey luma")
        elif notes:
            notes.append("then to grey luma")
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    return gray, "; ".join(notes) if notes else None


def mask_to_bool(img: Image.Image, path: Path, notes: list[str] | None = None) -> np.ndarray:
    """Lesion = any non-zero colour channel (alpha only masks out), whatever the storage mode.
    A mask with more than two values (anti-aliased edges, JPEG noise, colour-coded labels) is
    binarised instead: lesion where its brightest channel reaches half the mask's own maximum
    (≥ 128 for a 0–255 mask; labels 0/1/2 all count) and alpha is not zero. Palette and 16-bit
    masks are read through RGB / their integer values. `notes` is told of each of these."""
    notes = [] if notes is None else notes
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette (P) mask read through its RGB colours")
    if img.mode in SIXTEEN_BIT:
        level = np.asarray(img, dtype=np.int64)
        notes.append(f"{_mode_name(img.mode)} mask read as integers")
        valid = np.ones(level.shape, dtype=bool)
    elif img.mode not in MASK_MODES:
        raise BusisegError(f"{path}: mask mode {_mode_name(img.mode)} is not supported; "
                           "save masks as 1-bit, 8-bit grayscale or RGB PNG")
    elif img.getcolors(maxcolors=2) is not None:  # C-speed; None when there are more than two
        return _two_valued(img)
    else:
        arr = np.asarray(img).astype(np.int64)
        has_alpha = img.mode in ("RGBA", "LA")
        colour = arr[..., :-1] if has_alpha else arr
        level = colour if colour.ndim == 2 else colour.max(axis=-1)
        valid = arr[..., -1] > 0 if has_alpha else np.ones(level.shape, dtype=bool)
    values = np.unique(level[valid])
    if len(values) <= 2:
        return (level > 0) & valid
    top = int(values.max())
    notes.append(f"mask with {len(values)} values binarised: lesion where its brightest "
                 f"channel ≥ half its maximum ({(top + 1) // 2} of {top})")
    return (2 * level >= top) & valid


def _two_valued(img: Image.Image) -> np.ndarray:
    colours = img.getcolors(maxcolors=2)
    arr = np.asarray(img)
    values = [np.atleast_1d(np.asarray(c, dtype=np.int64)) for _, c in colours]
    lesion_values = [v for v in values if _is_lesion(v, img.mode)]
    if not lesion_values:
        return np.zeros(arr.shape[:2], dtype=bool)
    if len(lesion_values) == len(values):
        return np.ones(arr.shape[:2], dtype=bool)
    lesion, other = lesion_values[0], next(v for v in values if not _is_lesion(v, img.mode))
    channel = int(np.flatnonzero(lesion != other)[0])  # one channel tells the two colours apart
    plane = arr if arr.ndim == 2 else arr[..., channel]
    return plane == (bool(lesion[channel]) if img.mode == "1" else lesion[channel])


def _is_lesion(value: np.ndarray, mode: str) -> bool:
    has_alpha = mode in ("RGBA", "LA")
    colour = value[:-1] if has_alpha else value
    return bool(colour.max() > 0 and (not has_alpha or value[-1] > 0))


def _mode_name(mode: str) -> str:
    names = {"P": "palette (P)", "I;16": "16-bit (I;16)", "I;16B": "16-bit (I;16B)",
             "I;16L": "16-bit (I;16L)", "I": "32-bit integer (I)", "F": "float (F)",
             "1": "1-bit (1)", "CMYK": "CMYK", "YCbCr": "YCbCr", "HSV": "HSV", "LAB": "LAB"}
    return names.get(mode, mode)


def load_image(path: Path, mask_marks: bool = False, channels: int = 1) -> np.ndarray:
    """8-bit grey (H×W); with `mask_marks` (data.burned_marks: mask), burned-in colour marks
    painted over with the mean of the unmarked pixels around them. With `channels` 3, 8-bit
    colour (H×W×3, `to_rgb`)."""
    img = open_image(path)
    if channels == 3:
        return to_rgb(img, path)[0]
    gray = image_to_gray(img, path)
    marks = burned_marks(img) if mask_marks else None
    return gray if marks is None else paint_over(gray, marks)


def _stored_colour(img: Image.Image, path: Path) -> tuple[Image.Image, list[str]]:
    """The rules `to_gray` and `to_rgb` share: palette through its RGB colours; CMYK, YCbCr and
    HSV to RGB by PIL's conversion; an alpha channel ignored (said when some pixel is not
    opaque); any mode still not L, LA, RGB or RGBA refused. Returns the image and the notes."""
    name, notes = _mode_name(img.mode), []
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append(f"{name} image read through its RGB colours")
    elif img.mode in ("CMYK", "YCbCr", "HSV"):
        img = img.convert("RGB")
        notes.append(f"{name} image converted to RGB")
    if img.mode not in IMAGE_MODES:
        raise BusisegError(f"{path}: image mode {name} is not supported; save it as 8-bit "
                           "grayscale or RGB PNG")
    if img.mode in ("RGBA", "LA") and int(np.asarray(img.getchannel("A")).min()) < 255:
        notes.append("alpha channel ignored (image taken as opaque)")
    return img, notes


def to_rgb(img: Image.Image, path: Path) -> tuple[np.ndarray, str | None]:
    """(8-bit H×W×3 pixels, what was done) for preprocess.channels 3: RGB as is; palette, CMYK,
    YCbCr and HSV through PIL's conversion to RGB; an alpha channel ignored (said when some
    pixel is not opaque); every grey storage converted by `to_gray`'s rule, then repeated into
    the three channels."""
    if img.mode in ("P", "CMYK", "YCbCr", "HSV", "RGB", "RGBA"):
        read = img.info.get("conversion")
        img, notes = _stored_colour(img, path)
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
            notes = [read, *notes] if read else notes
            return rgb, "; ".join(notes) if notes else None
    gray, note = to_gray(img, path)
    notes = [note] if note else []
    notes.append("grey image repeated into 3 channels")
    return np.repeat(gray[..., None], 3, axis=-1), "; ".join(notes)


def burned_marks(img: Image.Image) -> np.ndarray | None:
    """The coloured pixels of a grey ultrasound frame (calipers, arrows, text) when there are
    enough of them to be a mark (≥ MARK_PIXELS); None otherwise, or for an image stored without
    colour. The one rule the audit counts and `mask_marks` paints over."""
    if img.mode not in ("RGB", "RGBA", "P"):
        return None
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    marks = (rgb.max(axis=-1) - rgb.min(axis=-1)) >= MARK_SPREAD
    return marks if marks.sum() >= MARK_PIXELS else None


def paint_over(gray: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Marked pixels take the mean of the unmarked ones in a window that widens until it holds
    some, so a thick caliper line is filled from its edges."""
    from scipy.ndimage import uniform_filter

    out = gray.astype(np.float64)
    todo = marks.copy()
    keep = (~marks).astype(np.float64)
    size = 5
    while todo.any() and size <= 2 * max(gray.shape) + 1:
        total = uniform_filter(out * keep, size, mode="nearest")
        weight = uniform_filter(keep, size, mode="nearest")
        done = todo & (weight > 1e-6)
        out[done] = total[done] / weight[done]
        todo &= ~done
        size = 2 * size + 1
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


ASPECT_TOLERANCE = 0.01  # data.mask_resize resample: mask and image aspect ratios agree to 1 %


def fit_mask(mask: np.ndarray, shape: tuple[int, int], path: Path,
             resample: bool = False) -> tuple[np.ndarray, str | None]:
    """(the mask at the image's size, what was done). A mask at another size is refused, or with
    `resample` (data.mask_resize) resized when its aspect ratio is the image's to within 1 %:
    a mask exported at the scan's full resolution beside a downsized image is the same outline,
    while another aspect ratio means another picture."""
    if mask.shape == shape:
        return mask, None
    (mh, mw), (h, w) = mask.shape, shape
    found = f"{path}: mask is {mw}x{mh} but its image is {w}x{h}"
    if not resample:
        raise BusisegError(f"{found}; re-export the mask at the image size, or set "
                           "data.mask_resize: resample")
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise BusisegError(f"{found}, another aspect ratio ({mw / mh:.3f} against "
                           f"{w / h:.3f}); re-export the mask at the image size")
    return resize_mask(mask, shape), (f"mask resampled from {mw}x{mh} to the image's {w}x{h} "
                                      "(area-weighted, lesion where ≥ half)")


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The one resize rule for masks: area-weighted (antialiased bilinear of 0/255), then lesion
    where the result is at least half, so a mask stays binary at any size."""
    img = Image.fromarray(mask.astype(np.uint8) * np.uint8(255))
    resized = img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8) >= 128


def load_mask_union(paths: list[Path], shape: tuple[int, int] | None = None,
                    outline: bool = False, resample: bool = False) -> np.ndarray:
    """Union of all masks of one image: BUSI stores separate lesions as _mask_1, _mask_2, ...
    With `outline` (data.mask_kind: outline) each mask is a closed contour, filled first; with
    `resample` (data.mask_resize) a mask at another size is fitted to `shape` (`fit_mask`)."""
    union = None
    for p in paths:
        m = mask_to_bool(open_image(p), p)
        if outline:
            m = fill_outline(m)
        if shape is not None:
            m = fit_mask(m, shape, p, resample)[0]
        union = m if union is None else (union | m)
    if union is None:
        raise BusisegError("internal: a case without masks reached load_mask_union")
    return union


def outline(masks: np.ndarray) -> np.ndarray:
    """The pixels of a mask (H×W, or each of N×H×W) with a 4-neighbour outside it, beyond the
    image's edge counting as outside, so a mask cut by the border has an outline there too: the
    one-pixel contour MONAI and Metrics Reloaded measure boundary distances from, and the line
    predict draws on its overlays."""
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    cross = ndimage.generate_binary_structure(2, 1)
    if masks.ndim == 3:  # no neighbours across images
        cross = np.stack([np.zeros_like(cross), cross, np.zeros_like(cross)])
    return masks & ~ndimage.binary_erosion(masks, structure=cross)


def fill_outline(mask: np.ndarray) -> np.ndarray:
    """A contour drawn on black (HC18's annotations) -> the region it encloses (`close_outline`)."""
    return close_outline(mask)[0]


def close_outline(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """(region, how) of the contours drawn on black, each curve (8-connected piece) on its own:
    ``closed`` when every curve encloses a region by itself; ``edge`` when some curve runs out
    of the frame and encloses one only together with the image edge (HC18's heads cut by the
    frame), closed along the edge; ``empty`` when nothing is drawn (an image without a lesion);
    ``nothing`` (the curves alone are returned) when some curve encloses no more than a sliver
    either way (`sliver`): an open or scribbled outline, never silently taken as a region."""
    from scipy import ndimage

    curve = np.asarray(mask, dtype=bool)
    if not curve.any():
        return curve, "empty"  # no outline drawn: an image without a lesion
    pieces, n = ndimage.label(curve, structure=np.ones((3, 3), bool))
    region, hows = np.zeros_like(curve), set()
    for k in range(1, n + 1):
        filled, how = _close_one(pieces == k)
        region |= filled
        hows.add(how)
    if "nothing" in hows:
        return curve, "nothing"
    return region, "edge" if "edge" in hows else "closed"


def _close_one(curve: np.ndarray) -> tuple[np.ndarray, str]:
    """One connected curve. Closing along the edge: cut by the frame, the curve splits the rest
    of the image into pieces; the inside is the piece holding the curve's centroid, which for a
    convex outline (an ellipse, most lesions) always lies inside, since the convex hull of any
    arc of a convex curve lies within the region it bounds."""
    from scipy import ndimage

    n_curve = int(curve.sum())
    filled = ndimage.binary_fill_holes(curve)
    if not sliver(int(filled.sum()) - n_curve, n_curve):
        return filled, "closed"
    pieces, n = ndimage.label(~curve)  # 4-connected: an 8-connected 1-px curve separates them
    if n >= 2:
        cy, cx = (int(round(v)) for v in ndimage.center_of_mass(curve))
        if curve[cy, cx]:  # on the curve itself: take the nearest pixel off it
            _, (iy, ix) = ndimage.distance_transform_edt(curve, return_indices=True)
            cy, cx = int(iy[cy, cx]), int(ix[cy, cx])
        inside = pieces == pieces[cy, cx]
        # the piece must be cut off by the curve, not be the open rest of the image
        if not sliver(int(inside.sum()), n_curve) and int(inside.sum()) < 0.9 * curve.size:
            return inside | curve, "edge"
    return curve, "nothing"


def sliver(interior: int, curve: int) -> bool:
    """Fewer enclosed pixels than a quarter of the curve's: a stroke or a broken curve, not an
    outline (the smallest lesion outlines drawn 1 px wide enclose about half their length)."""
    return interior * 4 < curve


def resize_image(gray: np.ndarray, size: int) -> np.ndarray:
    """The one resize rule for images fed to a model (training cache and new images alike):
    antialiased bilinear to size×size, uint8."""
    img = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)


def process_map(fn: Callable, items: Iterable, workers: int = 0, min_items: int = 64,
                chunksize: int = 8, desc: str = "", progress: bool = False) -> list:
    """Decoding PNGs is CPU-bound: spread it over processes (fork, so nothing is re-imported);
    with `progress`, a bar counts the items done."""
    items = list(items)
    workers = workers or os.cpu_count() or 1
    shown = bar(len(items), desc, progress and len(items) > 1)
    out = []
    if workers <= 1 or len(items) < min_items:
        for item in items:
            out.append(fn(item))
            if shown:
                shown.update(1)
    else:
        forking = "fork" in multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork") if forking else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for result in pool.map(fn, items, chunksize=chunksize):
                out.append(result)
                if shown:
                    shown.update(1)
    if shown:
        shown.close()
    return out
