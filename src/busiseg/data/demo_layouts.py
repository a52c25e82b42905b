"""Synthetic datasets in the other layouts (busiseg.data.layouts), made from the BUSI-layout
demo, so every layout is tested end to end without a download. Each mimics a public dataset's
layout:

- `paired`: BUS-BRA style, `images/bus_0001.jpg` and `masks/mask_0001.png`, classes in
  `classes.csv`;
- `flat`: HC18 style, `001_HC.png` beside `001_HC_Annotation.png`, masks drawn as outlines, no
  classes (lesion or normal from the mask);
- `per_case`: LGG style, one folder per patient holding `P_1.tif` and `P_1_mask.tif`, no classes;
- `per_case_rgb`: the same with three "sequences" stored as the RGB channels of each TIFF, as the
  LGG download stores them: the lesion stands out in one channel only, so the colour carries the
  signal and it is read with `preprocess.channels: 3`.

    uv run python -m busiseg.data.demo_layouts flat data/demo_flat   # prints the params to use
"""

from __future__ import annotations

import csv
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg.data.demo import generate_demo
from busiseg.data.images import load_image, load_mask_union
from busiseg.data.ingest import IngestOptions, ingest
from busiseg.data.manifest import mask_list
from busiseg.params import override_value

PARAMS = {  # the data.* params that read each layout
    "paired": {"layout": "paired", "images_dir": "images", "masks_dir": "masks",
               "image_name": "bus_{id}", "mask_name": "mask_{id}", "classes": "csv",
               "classes_csv": "classes.csv"},
    "flat": {"layout": "flat", "image_name": "{id}_HC", "mask_name": "{id}_HC_Annotation",
             "classes": "none", "mask_kind": "outline"},
    "per_case": {"layout": "per_case", "image_name": "{id}", "mask_name": "{id}_mask",
                 "classes": "none"},
    "per_case_rgb": {"layout": "per_case", "image_name": "{id}", "mask_name": "{id}_mask",
                     "classes": "none"},
}
CHANNELS = {"per_case_rgb": 3}  # preprocess.channels where it is not 1
# per-case layouts keep a patient's three frames in one split: 18 patients, 4 of them normal, so
# the default 80/10/10 split can hold both kinds in each part (9 patients could not)
SIZES = {"per_case": {"n_benign": 24, "n_malignant": 16, "n_normal": 12},
         "per_case_rgb": {"n_benign": 24, "n_malignant": 16, "n_normal": 12}}


def generate_layout_demo(out_dir: str | Path, layout: str, n_benign: int = 12,
                         n_malignant: int = 8, n_normal: int = 6, min_size: int = 96,
                         max_size: int = 160, seed: int = 0) -> dict:
    """Write the demo in `layout` to out_dir (recreated); returns the data.* params to read it."""
    if layout not in PARAMS:
        raise SystemExit(f"error: layout '{layout}' has no demo; choose {', '.join(PARAMS)}")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(tmp, n_benign, n_malignant, n_normal, min_size, max_size, seed)
        raw = Path(tmp) / "Dataset_BUSI_with_GT"
        rows = ingest(raw, IngestOptions(workers=1)).rows
        for i, row in enumerate(rows, start=1):
            gray = load_image(raw / row["image"])
            mask = load_mask_union([raw / m for m in mask_list(row)], gray.shape)
            _write(out, layout, i, row["class"], gray, mask)
    if layout == "paired":
        with open(out / "classes.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["case_id", "class"])
            w.writerows([f"{i:04d}", r["class"]] for i, r in enumerate(rows, start=1))
    return PARAMS[layout]


def _write(out: Path, layout: str, i: int, cls: str, gray: np.ndarray, mask: np.ndarray) -> None:
    binary = Image.fromarray(mask.astype(np.uint8) * 255)
    if layout == "paired":
        (out / "images").mkdir(exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
        Image.fromarray(gray).save(out / "images" / f"bus_{i:04d}.jpg", quality=95)
        binary.save(out / "masks" / f"mask_{i:04d}.png")
    elif layout == "flat":
        Image.fromarray(gray).save(out / f"{i:03d}_HC.png")
        Image.fromarray(_outline(mask).astype(np.uint8) * 255).save(
            out / f"{i:03d}_HC_Annotation.png")
    else:
        patient = f"patient_{(i - 1) // 3 + 1:02d}"  # three frames per patient
        folder = out / patient
        folder.mkdir(exist_ok=True)
        pixels = _sequences(gray, mask) if layout == "per_case_rgb" else gray
        Image.fromarray(pixels).save(folder / f"{patient}_{i}.tif")
        binary.save(folder / f"{patient}_{i}_mask.tif")


def _sequences(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Three co-registered "sequences" as RGB: the frame, its negative, and one where the lesion
    is bright against the rest (as FLAIR shows a glioma), so no grey mix keeps all three."""
    flair = np.where(mask, 200, gray // 3).astype(np.uint8)
    return np.stack([gray, 255 - gray, flair], axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A closed curve one pixel wide just outside the region (4-connected), as HC18 draws its
    ellipses: it encloses the whole region, so even a lesion a pixel or two thin, whose own
    boundary would enclose nothing, reads back as a filled region (the region plus its curve)."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        layouts = ",".join(PARAMS)
        raise SystemExit(f"usage: python -m busiseg.data.demo_layouts {{{layouts}}} OUT_DIR")
    generate_layout_demo(args[1], args[0], **SIZES.get(args[0], {}))
    print(f"wrote {args[1]}; run it with:\n  uv run {shlex.join(exp_run(args[1], args[0]))}")


def exp_run(out_dir: str, layout: str) -> list[str]:
    """The `dvc exp run` command that trains on the demo written to `out_dir`, as printed."""
    overrides = {"data.raw_dir": out_dir, **{f"data.{k}": v for k, v in PARAMS[layout].items()},
                 **({"preprocess.channels": CHANNELS[layout]} if layout in CHANNELS else {})}
    return ["dvc", "exp", "run",
            *(a for k, v in overrides.items() for a in ("-S", f"{k}={override_value(v)}"))]


if __name__ == "__main__":
    main()
