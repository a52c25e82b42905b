from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_BUSI, make_case, write_png
from PIL import Image

from busiseg.data.ingest import IngestError, IngestOptions, ingest
from busiseg.errors import BusisegError


def problems_of(root: Path, **kw) -> list:
    with pytest.raises(IngestError) as info:
        ingest(root, IngestOptions(**kw))
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
    result = ingest(small_busi, IngestOptions(on_problem="skip"))
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
        ingest(root, IngestOptions(on_problem="skip"))


def test_exact_and_near_duplicates_are_grouped(small_busi: Path):
    b = small_busi / "benign"
    # exact: same pixels re-encoded as RGB; near: same frame with a little noise
    Image.open(b / "benign (1).png").convert("RGB").save(b / "benign (7).png")
    shutil.copy(b / "benign (1)_mask.png", b / "benign (7)_mask.png")
    arr = np.asarray(Image.open(b / "benign (3).png")).astype(np.int16)
    noisy = np.clip(arr + np.random.default_rng(0).integers(-2, 3, arr.shape), 0, 255)
    write_png(b / "benign (8).png", noisy.astype(np.uint8))
    shutil.copy(b / "benign (3)_mask.png", b / "benign (8)_mask.png")
    result = ingest(small_busi, IngestOptions(near_dup_hamming=4))
    groups = {tuple(g["cases"]): g["kind"] for g in result.duplicate_groups}
    assert groups[("benign (1)", "benign (7)")] == "exact"
    assert ("benign (3)", "benign (8)") in groups
    assert result.metrics["n_duplicate_groups"] == len(result.duplicate_groups) >= 2
    m = result.manifest.set_index("case_id")
    assert m.loc["benign (1)", "dup_group"] == m.loc["benign (7)", "dup_group"]
    off = ingest(small_busi, IngestOptions(near_dup_hamming=-1))
    assert [g["cases"] for g in off.duplicate_groups] == [["benign (1)", "benign (7)"]]


def test_report_is_json_serialisable(small_busi: Path):
    from busiseg.data.ingest import report_dict

    (small_busi / "benign" / "benign (2)_mask.png").unlink()
    result = ingest(small_busi, IngestOptions(on_problem="skip"))
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
    audit = ("audit_label_mismatch", "audit_cross_class_duplicates", "audit_burned_marks",
             "audit_converted_images", "audit_binarised_masks", "audit_skipped")
    assert tuple(m[k] for k in audit) == (0, 18, 12, 0, 0, 0)


# ------------------------------------------------------------------------------- the data audit


def audit_of(root: Path, near_dup_hamming: int = 6, **policy):
    from busiseg.data.audit import AuditPolicy

    return ingest(root, IngestOptions(near_dup_hamming=near_dup_hamming,
                                      audit=AuditPolicy(**policy)))


def break_labels(root: Path) -> None:
    """A benign image whose mask is empty and a normal image whose mask marks a lesion."""
    write_png(root / "benign" / "benign (2)_mask.png", np.zeros((32, 40), np.uint8))
    mask = np.zeros((32, 40), np.uint8)
    mask[10:20, 10:20] = 255
    write_png(root / "normal" / "normal (3)_mask.png", mask)


def test_label_mismatch_both_ways_is_found_and_kept_by_default(small_busi: Path):
    break_labels(small_busi)
    result = audit_of(small_busi)
    found = {f.case_id: f for f in result.findings if f.kind == "label_mismatch"}
    assert set(found) == {"benign (2)", "normal (3)"}
    assert "no lesion" in found["benign (2)"].detail
    assert "100 lesion pixels" in found["normal (3)"].detail
    assert result.metrics["audit_label_mismatch"] == 2 and result.metrics["n_images"] == 12
    assert result.metrics["audit_skipped"] == 0
    assert {f.action for f in found.values()} == {"kept"}


def test_label_mismatch_skip_drops_and_error_names_the_file_and_param(small_busi: Path):
    break_labels(small_busi)
    skipped = audit_of(small_busi, label_mismatch="skip")
    assert skipped.metrics["n_images"] == 10 and skipped.metrics["audit_skipped"] == 2
    assert {"benign (2)", "normal (3)"}.isdisjoint(skipped.manifest["case_id"])
    assert {f.action for f in skipped.findings if f.kind == "label_mismatch"} == {"skipped"}
    with pytest.raises(IngestError) as info:
        audit_of(small_busi, label_mismatch="error")
    lines = str(info.value).splitlines()
    assert any("benign (2).png" in line and "data.label_mismatch" in line for line in lines)


def test_duplicates_across_classes_are_named_and_skippable(small_busi: Path):
    b, m = small_busi / "benign", small_busi / "malignant"
    shutil.copy(b / "benign (3).png", m / "malignant (9).png")
    shutil.copy(m / "malignant (1)_mask.png", m / "malignant (9)_mask.png")
    shutil.copy(b / "benign (4).png", b / "benign (9).png")  # within one class: no label doubt
    shutil.copy(b / "benign (4)_mask.png", b / "benign (9)_mask.png")
    # exact copies only: the fixture's same-numbered cases share their speckle (near duplicates)
    result = audit_of(small_busi, near_dup_hamming=-1)
    found = {f.case_id: f.detail for f in result.findings if f.kind == "cross_class_duplicate"}
    assert set(found) == {"benign (3)", "malignant (9)"}
    assert "spanning benign and malignant: also malignant (9) (malignant)" in found["benign (3)"]
    assert result.metrics["audit_cross_class_duplicates"] == 2
    skipped = audit_of(small_busi, near_dup_hamming=-1, cross_class_duplicates="skip")
    assert {"benign (3)", "malignant (9)"}.isdisjoint(skipped.manifest["case_id"])
    assert skipped.metrics["n_images"] == 12 and skipped.metrics["n_duplicate_groups"] == 1
    with pytest.raises(IngestError, match="data.cross_class_duplicates"):
        audit_of(small_busi, near_dup_hamming=-1, cross_class_duplicates="error")


def test_coloured_marks_burned_into_a_grey_image_are_found(small_busi: Path):
    from busiseg.data.images import MARK_PIXELS

    path = small_busi / "malignant" / "malignant (2).png"
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    rgb[2:4, 2:2 + MARK_PIXELS // 2] = (255, 255, 0)  # a yellow caliper tick
    Image.fromarray(rgb).save(path)
    result = audit_of(small_busi)
    marks = [f for f in result.findings if f.kind == "burned_marks"]
    assert [f.case_id for f in marks] == ["malignant (2)"]
    assert f"{MARK_PIXELS} coloured pixels" in marks[0].detail
    assert audit_of(small_busi, burned_marks="skip").metrics["n_images_malignant"] == 3
    with pytest.raises(IngestError, match="data.burned_marks"):
        audit_of(small_busi, burned_marks="error")
    # one pixel short of the rule, or the same frame in grey: no finding
    rgb[2, 2] = rgb[2, 3] = (120, 120, 120)
    Image.fromarray(rgb).save(path)
    assert audit_of(small_busi).metrics["audit_burned_marks"] == 0


def test_mask_with_many_values_is_binarised_with_a_warning(small_busi: Path):
    from busiseg.data.images import load_mask_union

    path = small_busi / "benign" / "benign (2)_mask.png"
    soft = np.zeros((32, 40), np.uint8)
    soft[8:24, 10:30] = 255
    soft[8:24, 10] = 127  # anti-aliased edge: below half scale, background
    soft[8:24, 29] = 128  # at half scale: lesion
    write_png(path, soft)
    result = audit_of(small_busi)
    notes = [f for f in result.findings if f.kind == "binarised"]
    assert [f.file for f in notes] == ["benign/benign (2)_mask.png"]
    assert "4 values" in notes[0].detail and "128" in notes[0].detail
    assert result.metrics["audit_binarised_masks"] == 1 and result.metrics["n_problems"] == 0
    assert (load_mask_union([path]) == (soft >= 128)).all()


def test_sixteen_bit_and_palette_images_are_converted_and_stated(small_busi: Path):
    from busiseg.data.images import load_image

    b = small_busi / "benign"
    wide = (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)
    Image.fromarray(wide).save(b / "benign (2).png")
    grey = load_image(b / "benign (3).png")
    Image.fromarray(grey).convert("P").save(b / "benign (3).png")
    result = audit_of(small_busi)
    notes = {f.case_id: f.detail for f in result.findings if f.kind == "converted"}
    assert set(notes) == {"benign (2)", "benign (3)"}
    assert "v / 257" in notes["benign (2)"] and "palette" in notes["benign (3)"]
    assert result.metrics["audit_converted_images"] == 2 and result.metrics["n_problems"] == 0
    assert (load_image(b / "benign (2).png") == np.rint(wide / 257).astype(np.uint8)).all()
    assert (load_image(b / "benign (3).png") == grey).all()  # a grey palette keeps its values


def _modes() -> dict[str, tuple[Image.Image, str | None]]:
    """Every storage a downloaded image may come in -> (the image, words its note must hold)."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    colour = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[0, 0] = 0
    return {
        "L": (Image.fromarray(grey), None),
        "RGB grey": (Image.fromarray(np.stack([grey] * 3, -1)), None),
        "RGB colour": (Image.fromarray(colour), "colour image"),
        "LA": (Image.fromarray(np.stack([grey, alpha], -1), "LA"), "alpha channel ignored"),
        "RGBA opaque": (Image.fromarray(np.stack([grey] * 3 + [alpha * 0 + 255], -1)), None),
        "1": (Image.fromarray(grey > 127), "read as 0 and 255"),
        "P": (Image.fromarray(grey).convert("P"), "palette"),
        "I;16": (Image.fromarray(grey.astype(np.uint16) * 257), "v / 257"),
        "I small": (Image.fromarray(grey.astype(np.int32) * 257), "v / 257"),
        "I wide": (Image.fromarray(grey.astype(np.int32) * 1000 - 5000), "own range"),
        "F unit": (Image.fromarray(grey.astype(np.float32) / 255), "scaled by 255"),
        "F wide": (Image.fromarray(grey.astype(np.float32) * 3.5 - 100), "own range"),
        "CMYK": (Image.fromarray(np.stack([grey] * 3, -1)).convert("CMYK"), "CMYK"),
        "YCbCr": (Image.fromarray(np.stack([grey] * 3, -1)).convert("YCbCr"), "YCbCr"),
        "HSV": (Image.fromarray(np.stack([grey] * 3, -1)).convert("HSV"), "HSV"),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_every_image_mode_is_converted_by_a_stated_rule(name: str):
    from busiseg.data.images import to_gray

    img, words = _modes()[name]
    gray, note = to_gray(img, Path(f"{name}.png"))
    assert gray.dtype == np.uint8 and gray.shape == (24, 32)
    assert (note is None) if words is None else (words in note)
    if name not in ("RGB colour", "1", "CMYK", "YCbCr", "HSV"):  # value-preserving rules
        want = np.asarray(_modes()["L"][0])
        assert np.abs(gray.astype(int) - want).max() <= 1, name


def test_an_image_mode_without_a_rule_is_one_line():
    from busiseg.data.images import to_gray

    lab = Image.new("LAB", (8, 8))
    with pytest.raises(BusisegError, match=r"x.png: image mode LAB is not supported; save it"):
        to_gray(lab, Path("x.png"))


def test_audit_report_lists_every_finding(small_busi: Path):
    from busiseg.data.ingest import report_dict

    break_labels(small_busi)
    result = audit_of(small_busi, near_dup_hamming=-1, label_mismatch="skip")
    report = json.loads(json.dumps(report_dict(result, str(small_busi))))
    assert {(f["case_id"], f["kind"], f["action"]) for f in report["audit"]} == {
        ("benign (2)", "label_mismatch", "skipped"), ("normal (3)", "label_mismatch", "skipped")}


def test_burned_marks_can_be_painted_over_instead(small_busi: Path):
    from busiseg.data.images import MARK_PIXELS, load_image

    path = small_busi / "malignant" / "malignant (2).png"
    grey = load_image(path)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[2:4, 2:2 + MARK_PIXELS // 2] = (255, 255, 0)
    Image.fromarray(rgb).save(path)
    result = audit_of(small_busi, burned_marks="mask")
    marks = [f for f in result.findings if f.kind == "burned_marks"]
    assert [f.action for f in marks] == ["masked"] and result.metrics["n_images_malignant"] == 4
    painted = load_image(path, mask_marks=True)
    outside = np.ones(grey.shape, bool)
    outside[2:4, 2:2 + MARK_PIXELS // 2] = False
    assert (painted[outside] == grey[outside]).all()  # nothing else changes
    # the painted pixels look like their surroundings, not like the bright mark
    assert abs(int(painted[2:4, 2:12].mean()) - int(grey[:8, :16].mean())) < 25
    assert load_image(path)[2, 2] > painted[2, 2]


def test_class_folders_are_read_in_any_case_by_the_one_scanner(small_busi: Path):
    """BUSI's layout and the others share one scanner, so they agree: Benign/ is benign/."""
    from busiseg.data.layouts import scan
    from busiseg.params import LayoutParams

    (small_busi / "benign").rename(small_busi / "Benign")
    result = ingest(small_busi)
    assert result.metrics["n_images_benign"] == 4 and result.metrics["n_problems"] == 0
    assert {r["class"] for r in result.rows} == {"benign", "malignant", "normal"}
    found, problems, _ = scan(small_busi, LayoutParams(layout="flat", classes="folders",
                                                       mask_name="{id}_mask"))
    assert problems == [] and sum(f.cls == "benign" for f in found) == 4


@pytest.mark.parametrize("name", list(_modes()))
def test_three_channel_reading_keeps_colour_and_repeats_grey(name: str):
    from busiseg.data.images import to_rgb

    img, _ = _modes()[name]
    rgb, note = to_rgb(img, Path(f"{name}.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 32, 3)
    if name == "RGB colour":
        assert note is None and (rgb == np.asarray(img)).all()  # colour as it is
    elif img.mode in ("L", "1", "I;16", "I", "F", "LA"):
        assert "repeated into 3 channels" in note
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_colour_marks_are_not_audited_when_colour_is_the_signal(small_busi: Path):
    from busiseg.params import parse_params

    b = small_busi / "benign"
    colour = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(colour).save(b / "benign (2).png")
    grey = ingest(small_busi, IngestOptions(workers=1)).metrics
    assert grey["audit_burned_marks"] == 1 and grey["audit_converted_images"] == 1
    kept = ingest(small_busi, IngestOptions(workers=1, channels=3))
    assert "audit_burned_marks" not in kept.metrics  # not checked, so not reported as 0
    assert not any(f.kind == "burned_marks" for f in kept.findings)
    with pytest.raises(BusisegError, match="data.burned_marks.*preprocess.channels 3"):
        parse_params({"preprocess": {"channels": 3}, "data": {"burned_marks": "mask"}})
