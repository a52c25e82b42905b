from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_BUSI, make_case, write_png
from PIL import Image

from busiseg.errors import BusisegError
from busiseg.ingest import IngestError, ingest


def problems_of(root: Path, **kw) -> list:
    with pytest.raises(IngestError) as info:
        ingest(root, **kw)
    return info.value.problems


def test_pairs_every_mask_exactly(small_busi: Path):
    # (1) and (10) must never be confused; spaces and parentheses are part of the name
    make_case(small_busi, "benign", 10)
    make_case(small_busi, "benign", 11, n_masks=3)
    result = ingest(small_busi)
    m = result.manifest.set_index("case_id")
    assert m.loc["benign (1)", "masks"] == "benign/benign (1)_mask.png|benign/benign (1)_mask_1.png"
    assert m.loc["benign (10)", "masks"] == "benign/benign (10)_mask.png"
    assert m.loc["benign (11)", "n_masks"] == 3
    assert result.metrics["n_images"] == 14
    assert result.metrics["n_masks"] == 14 + 1 + 2
    assert result.metrics["n_multi_mask"] == 2
    assert result.metrics["n_images_benign"] == 6
    assert result.metrics["n_problems"] == 0
    assert list(m.index[:6]) == [f"benign ({n})" for n in (1, 2, 3, 4, 10, 11)]  # natural order
    assert (m["width"] == 40).all() and (m["height"] == 32).all()
    assert m["sha256"].str.len().eq(64).all()


def test_upper_case_extension_is_accepted(small_busi: Path):
    src = small_busi / "malignant" / "malignant (1).png"
    src.rename(src.with_suffix(".PNG"))
    result = ingest(small_busi)
    assert "malignant/malignant (1).PNG" in set(result.manifest["image"])
    assert result.metrics["n_problems"] == 0


def test_os_clutter_is_listed_as_ignored(small_busi: Path):
    (small_busi / "benign" / ".DS_Store").write_bytes(b"\0\1")
    result = ingest(small_busi)
    assert result.ignored == ["benign/.DS_Store"]


@pytest.mark.parametrize("breakage, kind", [
    ("image_without_mask", "image_without_mask"),
    ("mask_without_image", "mask_without_image"),
    ("mask_size", "mask_size"),
    ("truncated", "bad_image"),
    ("zero_byte", "bad_image"),
    ("text_as_png", "bad_image"),
    ("jpeg_as_png", "bad_image"),
    ("sixteen_bit", "bad_image"),
    ("palette", "bad_image"),
    ("grey_mask", "bad_mask"),
    ("palette_mask", "bad_mask"),
    ("non_image_file", "not_png"),
    ("nested", "nested_folder"),
    ("unknown_class", "unknown_class_folder"),
    ("empty_class", "empty_class_folder"),
    ("missing_class", "missing_class_folder"),
    ("top_level_file", "outside_class_folder"),
])
def test_each_problem_is_named_and_skippable(small_busi: Path, breakage: str, kind: str):
    b = small_busi / "benign"
    target = {
        "image_without_mask": lambda: (b / "benign (2)_mask.png").unlink(),
        "mask_without_image": lambda: (b / "benign (2).png").unlink(),
        "mask_size": lambda: write_png(b / "benign (2)_mask.png", np.zeros((10, 10), np.uint8)),
        "truncated": lambda: (b / "benign (2).png").write_bytes(
            (b / "benign (2).png").read_bytes()[:200]),
        "zero_byte": lambda: (b / "benign (2).png").write_bytes(b""),
        "text_as_png": lambda: (b / "benign (2).png").write_text("hello"),
        "jpeg_as_png": lambda: Image.open(b / "benign (2).png").save(b / "benign (2).png", "JPEG"),
        "sixteen_bit": lambda: Image.fromarray(np.full((32, 40), 4000, np.uint16)).save(
            b / "benign (2).png"),
        "palette": lambda: Image.open(b / "benign (2).png").convert("P").save(b / "benign (2).png"),
        "grey_mask": lambda: write_png(b / "benign (2)_mask.png",
                                       np.arange(32 * 40, dtype=np.uint8).reshape(32, 40) % 7),
        "palette_mask": lambda: Image.open(b / "benign (2)_mask.png").convert("P").save(
            b / "benign (2)_mask.png"),
        "non_image_file": lambda: (b / "notes.txt").write_text("x"),
        "nested": lambda: shutil.copy(b / "benign (2).png", (b / "sub").mkdir() or b / "sub"),
        "unknown_class": lambda: make_case(small_busi, "Other", 1),
        "empty_class": lambda: [p.unlink() for p in (small_busi / "normal").iterdir()],
        "missing_class": lambda: shutil.rmtree(small_busi / "normal"),
        "top_level_file": lambda: (small_busi / "README.txt").write_text("x"),
    }
    target[breakage]()
    found = problems_of(small_busi)
    assert kind in {p.kind for p in found}
    msg = next(p.message for p in found if p.kind == kind)
    assert "\n" not in msg and str(small_busi) in msg  # one line naming the file or folder
    assert any(w in msg for w in ("remove", "add", "re-export", "re-download", "convert",
                                  "save", "rename", "move", "BUSI has"))
    # skipping keeps going, drops only what is broken and lists it
    result = ingest(small_busi, on_problem="skip")
    assert result.metrics["n_problems"] == len(found)
    assert result.metrics["n_images"] >= 4


def test_error_lists_every_problem_in_one_line_each(small_busi: Path):
    (small_busi / "benign" / "benign (2)_mask.png").unlink()
    (small_busi / "malignant" / "malignant (3).png").unlink()
    with pytest.raises(IngestError) as info:
        ingest(small_busi)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert "benign (2).png" in lines[0] and "malignant (3)_mask.png" in lines[1]
    assert "data.on_problem" in lines[2]


@pytest.mark.parametrize("setup, needle", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "is empty"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is not a folder"),
])
def test_raw_dir_problems(tmp_path: Path, setup, needle: str):
    with pytest.raises(BusisegError, match=needle) as info:
        ingest(setup(tmp_path))
    assert "data.raw_dir" in str(info.value)


def test_dataset_without_usable_pairs(tmp_path: Path):
    root = tmp_path / "ds"
    (root / "benign").mkdir(parents=True)
    (root / "benign" / "x.txt").write_text("x")
    with pytest.raises(BusisegError, match="no usable image/mask pairs"):
        ingest(root, on_problem="skip")


def test_exact_and_near_duplicates_are_grouped(small_busi: Path):
    b = small_busi / "benign"
    # exact: same pixels re-encoded as RGB; near: same frame with a little noise
    Image.open(b / "benign (1).png").convert("RGB").save(b / "benign (7).png")
    shutil.copy(b / "benign (1)_mask.png", b / "benign (7)_mask.png")
    arr = np.asarray(Image.open(b / "benign (3).png")).astype(np.int16)
    noisy = np.clip(arr + np.random.default_rng(0).integers(-2, 3, arr.shape), 0, 255)
    write_png(b / "benign (8).png", noisy.astype(np.uint8))
    shutil.copy(b / "benign (3)_mask.png", b / "benign (8)_mask.png")
    result = ingest(small_busi, near_dup_hamming=4)
    groups = {tuple(g["cases"]): g["kind"] for g in result.duplicate_groups}
    assert groups[("benign (1)", "benign (7)")] == "exact"
    assert ("benign (3)", "benign (8)") in groups
    assert result.metrics["n_duplicate_groups"] == len(result.duplicate_groups) >= 2
    m = result.manifest.set_index("case_id")
    assert m.loc["benign (1)", "dup_group"] == m.loc["benign (7)", "dup_group"]
    off = ingest(small_busi, near_dup_hamming=-1)
    assert [g["cases"] for g in off.duplicate_groups] == [["benign (1)", "benign (7)"]]


def test_report_is_json_serialisable(small_busi: Path):
    from busiseg.ingest import report_dict

    (small_busi / "benign" / "benign (2)_mask.png").unlink()
    result = ingest(small_busi, on_problem="skip")
    report = json.loads(json.dumps(report_dict(result, str(small_busi))))
    assert report["problems"][0]["file"] == "benign/benign (2).png"
    assert report["problems"][0]["action"] == "skipped"


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_BUSI.is_dir(), reason="real BUSI not present in ../shared/data")
def test_real_busi_counts():
    m = ingest(REAL_BUSI).metrics
    assert (m["n_images"], m["n_images_benign"], m["n_images_malignant"], m["n_images_normal"]) \
        == (780, 437, 210, 133)
    assert (m["n_masks"], m["n_multi_mask"], m["n_problems"]) == (798, 17, 0)
    assert m["n_duplicate_groups"] > 0
