"""`busiseg export-dataset --format nnunet` against nnU-Net v2's documented raw dataset format
(documentation/dataset_format.md, manual_data_splits.md).

nnunetv2 is not installed in busiseg's environment, so these tests check the documented format
itself, not nnU-Net's own verify_dataset_integrity.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, busiseg, make_case, set_params, write_png
from PIL import Image

from busiseg.cli import main
from busiseg.data.ingest import IngestOptions, ingest
from busiseg.data.manifest import mask_list, read_manifest, read_manifest_rows, write_manifest_rows
from busiseg.data.split import make_split
from busiseg.params import load_params

RAW = "raw/Dataset_BUSI_with_GT"
OUT = "Dataset501_BUSI"
COUNTS = {"benign": 6, "malignant": 5, "normal": 5}


def make_project(root: Path, folds: int, channels: int = 1) -> Path:
    """A busiseg project as `dvc repro` leaves its data: images of many sizes, a case with two
    masks, an exact duplicate (one dup_group), then manifest and split written by the library
    the ingest and split stages call."""
    raw = root / RAW
    for i, (cls, count) in enumerate(COUNTS.items()):
        for n in range(1, count + 1):
            make_case(raw, cls, n, size=(40 + 6 * n, 32 + 4 * i + 2 * n), seed=10 * i,
                      n_masks=2 if (cls, n) == ("benign", 1) else 1, lesion=cls != "normal")
    for suffix in ("", "_mask"):  # benign (7): the same frame as benign (2)
        shutil.copy(raw / "benign" / f"benign (2){suffix}.png",
                    raw / "benign" / f"benign (7){suffix}.png")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    set_params(root, data={"raw_dir": RAW, "workers": 1},
               preprocess={"channels": channels, "workers": 1},
               split={"train": 0.6, "val": 0.2, "test": 0.2, "folds": folds})
    params = load_params(root / "params.yaml")
    result = ingest(raw, IngestOptions(workers=1, layout=params.data, channels=channels))
    write_manifest_rows(root / "data" / "manifest.csv", result.rows)
    s = params.split
    make_split(read_manifest(root / "data" / "manifest.csv"), s.train, s.val, s.test, s.seed,
               s.folds).to_csv(root / "data" / "split.csv", index=False)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def exported(root: Path) -> dict:
    """The export, with busiseg's own files, each case under its nnU-Net name."""
    out = root / OUT
    by_id = {r["case_id"]: r for r in read_manifest_rows(root / "data" / "manifest.csv")}
    split = {r["case_id"]: r for r in read_csv(root / "data" / "split.csv")}
    cases = read_csv(out / "cases.csv")
    return {"out": out, "cases": {c["name"]: c for c in cases},
            "manifest": {c["name"]: by_id[c["case_id"]] for c in cases},
            "split": {c["name"]: split[c["case_id"]] for c in cases},
            "dataset": json.loads((out / "dataset.json").read_text()),
            "splits": json.loads((out / "splits_final.json").read_text())}


def names_in(folder: Path, suffix: str) -> set[str]:
    files = sorted(p.name for p in folder.iterdir())
    assert all(f.endswith(suffix) for f in files), files
    return {f.removesuffix(suffix) for f in files}


def png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def union_of_masks(raw: Path, row: dict) -> np.ndarray:
    masks = [np.asarray(png(raw / m).convert("L")) > 0 for m in mask_list(row)]
    return np.logical_or.reduce(masks)


def check_layout(root: Path, e: dict, mode: str) -> None:
    """dataset_format.md: CASE_0000.png beside CASE.png of the same geometry, labels
    consecutive from background 0; the test cases kept out of imagesTr/labelsTr."""
    out, split = e["out"], e["split"]
    train = {n for n, s in split.items() if s["split"] != "test"}
    test = set(split) - train
    assert train and test
    assert names_in(out / "imagesTr", "_0000.png") == names_in(out / "labelsTr", ".png") == train
    assert names_in(out / "imagesTs", "_0000.png") == names_in(out / "labelsTs", ".png") == test
    for name, row in e["manifest"].items():
        tr = "Tr" if name in train else "Ts"
        image = png(out / f"images{tr}" / f"{name}_0000.png")
        label = png(out / f"labels{tr}" / f"{name}.png")
        source = png(root / RAW / row["image"])
        size = (int(row["width"]), int(row["height"]))
        assert image.size == label.size == size == source.size
        assert (image.format, image.mode, label.format, label.mode) == ("PNG", mode, "PNG", "L")
        source = source.convert(mode)
        np.testing.assert_array_equal(np.asarray(image), np.asarray(source))
        values = np.asarray(label)
        assert set(np.unique(values)) <= {0, 1}
        np.testing.assert_array_equal(values == 1, union_of_masks(root / RAW, row))
    assert e["dataset"]["numTraining"] == len(train)
    assert e["dataset"]["file_ending"] == ".png"
    assert e["dataset"]["labels"] == {"background": 0, "lesion": 1}
    assert e["dataset"]["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    assert e["dataset"]["name"] == OUT and e["dataset"]["description"]


def check_cases_csv(e: dict) -> None:
    names = list(e["cases"])
    assert len(set(names)) == len(names) and all(n.replace("_", "").isalnum() for n in names)
    assert names == sorted(names)  # manifest order
    for name, c in e["cases"].items():
        s = e["split"][name]
        assert (c["class"], c["split"], c["fold"], c["dup_group"]) == (
            s["class"], s["split"], s["fold"], s["dup_group"])


def check_groups_apart(e: dict) -> None:
    group = {n: c["dup_group"] for n, c in e["cases"].items()}
    dup = {group[n] for n, c in e["cases"].items() if c["case_id"] in ("benign (2)", "benign (7)")}
    assert len(dup) == 1  # the duplicate pair is one group, which the checks below keep whole
    for entry in e["splits"]:
        assert not {group[n] for n in entry["train"]} & {group[n] for n in entry["val"]}


def test_k_fold_export_matches_the_layout_and_busiseg_folds(tmp_path: Path):
    root = make_project(tmp_path, folds=3)
    line = busiseg(["export-dataset", "--format", "nnunet", "--out", OUT], root)
    e = exported(root)
    check_layout(root, e, "L")
    check_cases_csv(e)
    assert e["dataset"]["channel_names"] == {"0": "ultrasound"}
    multi = next(n for n, r in e["manifest"].items() if r["case_id"] == "benign (1)")
    masks = [np.asarray(png(root / RAW / m)) > 0 for m in mask_list(e["manifest"][multi])]
    where = "Tr" if e["split"][multi]["split"] != "test" else "Ts"
    label = np.asarray(png(e["out"] / f"labels{where}" / f"{multi}.png"))
    assert len(masks) == 2 and label.sum() == (masks[0] | masks[1]).sum() > max(
        m.sum() for m in masks)

    fold = {n: int(s["fold"]) for n, s in e["split"].items() if s["split"] != "test"}
    assert len(e["splits"]) == 3 and set(fold.values()) == {0, 1, 2}
    for k, entry in enumerate(e["splits"]):
        assert entry["val"] == sorted(n for n, f in fold.items() if f == k)
        assert entry["train"] == sorted(n for n, f in fold.items() if f != k)
    vals = [n for entry in e["splits"] for n in entry["val"]]
    assert sorted(vals) == sorted(fold)  # every training case validated exactly once
    check_groups_apart(e)
    n_test = sum(s["split"] == "test" for s in e["split"].values())
    assert line.strip() == (f"export-dataset: {len(fold)} training cases (3 folds in "
                            f"splits_final.json), {n_test} test cases -> {OUT} (nnU-Net v2 raw "
                            "dataset)")


def test_train_val_export_in_colour(tmp_path: Path):
    root = make_project(tmp_path, folds=0, channels=3)
    (root / OUT).mkdir()  # an empty folder is as good as none
    busiseg(["export-dataset", "--out", OUT], root)
    e = exported(root)
    check_layout(root, e, "RGB")
    check_cases_csv(e)
    assert e["dataset"]["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    split = {n: s["split"] for n, s in e["split"].items()}
    assert e["splits"] == [{"train": sorted(n for n, s in split.items() if s == "train"),
                            "val": sorted(n for n, s in split.items() if s == "val")}]
    check_groups_apart(e)


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


def one_line_error(args: list[str], cwd: Path, *parts: str) -> None:
    code, out, err = run_cli(args, cwd)
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(p in err for p in parts), err


def test_refusals_are_one_line(tmp_path: Path):
    root = make_project(tmp_path / "project", folds=0)
    args = ["export-dataset", "--format", "nnunet", "--out", OUT]
    busiseg(args, root)
    one_line_error(args, root, f"--out {OUT}: holds an earlier export",
                   "remove it or choose another folder")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine")
    one_line_error(args[:-1] + ["other"], root, "--out other: is not empty")
    assert [p.name for p in (root / "other").iterdir()] == ["notes.txt"]

    write_png(root / RAW / "benign" / "benign (3).png", np.zeros((20, 30), np.uint8))
    one_line_error(args[:-1] + ["fresh"], root, "benign (3).png: is 30x20 but the manifest",
                   "(data/manifest.csv)", "run dvc repro")
    (root / "data" / "split.csv").unlink()
    one_line_error(args[:-1] + ["fresh"], root, "data/split.csv", "dvc repro")
    (root / "data" / "manifest.csv").unlink()
    one_line_error(args[:-1] + ["fresh"], root, "data/manifest.csv", "dvc repro")
    assert not (root / "fresh").exists()
    assert sorted(p.name for p in root.iterdir()) == [OUT, "data", "other", "params.yaml", "raw"]


@pytest.mark.parametrize("fmt", ["onnx", "csv"])
def test_only_nnunet_is_a_format(fmt: str, tmp_path: Path):
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(["export-dataset", "--format", fmt, "--out", str(tmp_path / "x")])
