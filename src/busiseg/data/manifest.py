"""The manifest (data/manifest.csv): one row per image, with its masks and duplicate group.

The data stages read and write it with the csv module: importing pandas costs seconds on a 2-core
machine, more than decoding all of BUSI; stages that already need pandas use `read_manifest`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from busiseg.errors import BusisegError
from busiseg.files import atomic_path

MASK_SEP = "|"  # between the mask files of one image in the masks column


def read_manifest_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise BusisegError(f"{path}: manifest not found; run the ingest stage first (dvc repro)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_manifest_rows(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: str | Path):
    """The manifest as a pandas DataFrame, for stages that already need pandas."""
    import pandas as pd

    if not Path(path).is_file():
        raise BusisegError(f"{path}: manifest not found; run the ingest stage first (dvc repro)")
    return pd.read_csv(path, dtype={"case_id": str, "class": str}, keep_default_na=False)


def mask_list(row) -> list[str]:
    return [m for m in str(row["masks"]).split(MASK_SEP) if m]
