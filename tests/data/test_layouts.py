"""Other dataset layouts (busiseg.data.layouts), their demos, and external validation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_train, tiny_params, write_png
from PIL import Image

from busiseg.data.cache import Reading, preprocess
from busiseg.data.demo_layouts import PARAMS, generate_layout_demo
from busiseg.data.images import close_outline, load_mask_union
from busiseg.data.ingest import IngestError, IngestOptions, ingest
from busiseg.data.layouts import Layout
from busiseg.data.manifest import mask_list
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import evaluate
from busiseg.evaluation.external import evaluate_external
from busiseg.params import LayoutParams, parse_params


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    for name in PARAMS:
        generate_layout_demo(root / name, name, n_benign=6, n_malignant=4, n_normal=3,
                             min_size=64, max_size=96)
    return {name: root / name for name in PARAMS}


@pytest.mark.parametrize("name", list(PARAMS))
def test_each_layout_demo_pairs_every_file(demos, name: str):
    result = ingest(demos[name], IngestOptions(workers=1, layout=Layout(**PARAMS[name])))
    m = result.metrics
    assert m["n_images"] == m["n_masks"] == 13 and m["n_problems"] == 0
    if PARAMS[name]["classes"] == "none":  # lesion or normal, from the mask
        assert (m["n_images_lesion"], m["n_images_normal"]) == (10, 3)
        assert "n_images_benign" in m and m["n_images_benign"] == 0
    else:
        assert (m["n_images_benign"], m["n_images_malignant"], m["n_images_normal"]) == (6, 4, 3)
        assert result.ignored == ["classes.csv"]  # the CSV beside the folders is accounted for


def test_outline_masks_fill_to_the_regions_they_enclose(demos):
    flat = demos["flat"]
    rows = ingest(flat, IngestOptions(workers=1, layout=Layout(**PARAMS["flat"]))).rows
    lesion = next(r for r in rows if r["class"] == "lesion")
    outline = load_mask_union([flat / m for m in mask_list(lesion)])
    filled = load_mask_union([flat / m for m in mask_list(lesion)], outline=True)
    assert filled.sum() > 2 * outline.sum() and (filled | outline).sum() == filled.sum()
    # the same demo read as regions would see only the drawn contour
    region = ingest(flat, IngestOptions(
        workers=1, layout=Layout(**{**PARAMS["flat"], "mask_kind": "region"})))
    preprocess(region.rows, flat, 64, flat.parent / "r.npz", workers=1)
    preprocess(rows, flat, 64, flat.parent / "o.npz", Reading(outline=True), 1)
    assert np.load(flat.parent / "o.npz")["masks"].sum() > np.load(flat.parent / "r.npz")[
        "masks"].sum()


def test_per_case_folders_keep_a_patient_in_one_split_group(demos):
    rows = ingest(demos["per_case"],
                  IngestOptions(workers=1, layout=Layout(**PARAMS["per_case"]))).rows
    by_patient = pd.DataFrame(rows).assign(patient=lambda d: d["case_id"].str.split("/").str[0])
    assert by_patient.groupby("patient")["dup_group"].nunique().max() == 1
    assert by_patient["dup_group"].nunique() == by_patient["patient"].nunique() == 5


def test_name_rules_formats_and_stray_files_in_a_paired_layout(tmp_path: Path):
    root = tmp_path / "set"
    img = np.random.default_rng(0).integers(0, 255, (20, 24), dtype=np.uint8)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 5:10] = 255
    (root / "imgs").mkdir(parents=True)
    for i, suffix in enumerate((".png", ".jpg", ".bmp", ".tif")):
        Image.fromarray(img).save(root / "imgs" / f"scan_{i}{suffix}")
        write_png(root / "gt" / f"{i}_seg.png", mask)
    write_png(root / "gt" / "7_seg.png", mask)  # no image
    write_png(root / "imgs" / "other_1.png", img)  # breaks the image rule
    (root / "notes.txt").write_text("x")  # outside both folders
    lay = Layout(layout="paired", images_dir="imgs", masks_dir="gt", image_name="scan_{id}",
                 mask_name="{id}_seg", classes="none")
    found = {p.kind: p.message for p in pytest.raises(IngestError, ingest, root,
                                                      IngestOptions(workers=1, layout=lay)
                                                      ).value.problems}
    assert set(found) == {"mask_without_image", "unmatched_name", "outside_layout"}
    assert "scan_7" in found["mask_without_image"] and "data.image_name" in found["unmatched_name"]
    kept = ingest(root, IngestOptions(on_problem="skip", workers=1, layout=lay))
    assert sorted(kept.manifest["case_id"]) == ["0", "1", "2", "3"]
    assert kept.metrics["n_images_lesion"] == 4 and kept.metrics["n_problems"] == 3


def test_classes_from_a_csv_name_missing_and_unknown_rows(tmp_path: Path):
    root = tmp_path / "set"
    for i in range(3):
        write_png(root / f"c{i}.png", np.full((8, 8), 100, np.uint8))
        write_png(root / f"c{i}_mask.png", np.full((8, 8), 255, np.uint8))
    (root / "labels.csv").write_text("case_id,class\nc0,Benign\nc1,cyst\n")
    lay = Layout(layout="flat", classes="csv", classes_csv="labels.csv")
    found = {p.kind: p.message for p in pytest.raises(IngestError, ingest, root,
                                                      IngestOptions(workers=1, layout=lay)
                                                      ).value.problems}
    assert set(found) == {"no_class", "unknown_class"}
    assert "'c2'" in found["no_class"] and "'cyst'" in found["unknown_class"]
    ok = ingest(root, IngestOptions(on_problem="skip", workers=1, layout=lay))
    assert ok.manifest.set_index("case_id").loc["c0", "class"] == "benign"
    with pytest.raises(BusisegError, match="classes_csv 'nope.csv' not found"):
        ingest(root, IngestOptions(workers=1, layout=replace(lay, classes_csv="nope.csv")))


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"mask_name": "mask"}}, "data.mask_name needs exactly one {id}"),
    ({"data": {"layout": "busi", "classes": "none"}}, "data.classes"),
    ({"data": {"layout": "flat", "classes": "csv"}}, "data.classes_csv"),
    ({"external": {"x": {"layout": "flat"}}}, "external.x needs at least raw_dir"),
    ({"external": {"x": {"raw_dir": "d", "layuot": "flat"}}}, "did you mean 'external.x.layout'"),
    ({"external": ["d"]}, "'external' must map names"),
    ({"data": {"layout": "paired", "masks_dir": "images"}}, "data.masks_dir must differ"),
    ({"data": {"layout": "flat", "image_name": "{id}", "mask_name": "{id}"}},
     "data.mask_name must differ"),
    ({"data": {"images_dir": "a/b"}}, "data.images_dir must name one folder"),
])
def test_layout_params_are_validated(raw: dict, needle: str):
    with pytest.raises(BusisegError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        parse_params(raw)


def test_external_metrics_equal_evaluate_scoring_the_same_set_as_its_test_split(tmp_path, demos):
    """A model trained on one set, scored on another layout's demo: evaluate_external gives what
    evaluate's own code gives when that set is its test split, with the same threshold and
    pieces; the threshold is the one chosen on the training data's validation split."""
    p = tiny_params(epochs=2)
    run_train(tmp_path, p)
    model = tmp_path / "a" / "model.pt"
    chosen = {"threshold": 0.35, "val_dice": 0.5, "used_tta": 1, "used_largest_cc": 1,
              "used_fill_holes": 0}
    (tmp_path / "eval.json").write_text(json.dumps(chosen))
    ext = LayoutParams(raw_dir=str(demos["flat"]), **{k: v for k, v in PARAMS["flat"].items()})
    q = replace(p, external={"hc": ext})
    got = evaluate_external(q, "hc", model, tmp_path / "eval.json")["metrics"]

    rows = ingest(demos["flat"], IngestOptions(workers=1, layout=ext)).rows
    preprocess(rows, demos["flat"], 32, tmp_path / "c.npz", Reading(outline=True), 1)
    split = pd.DataFrame({"case_id": [r["case_id"] for r in rows],
                          "class": [r["class"] for r in rows], "split": "test"})
    # evaluate needs a val split (its threshold is fixed here); the test rows keep their order
    pd.concat([split, split.iloc[[0]].assign(split="val")]).to_csv(tmp_path / "s.csv",
                                                                  index=False)
    fixed = replace(p, evaluate=replace(p.evaluate, threshold=0.35, tta=True, largest_cc=True))
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)  # original sizes: HD95's unit
    want = evaluate(fixed, model, tmp_path / "c.npz", tmp_path / "s.csv",
                    tmp_path / "m.csv")["metrics"]
    for key in ("dice", "iou", "dice_pooled", "precision", "recall", "normal_empty_rate",
                "dice_ci_low", "dice_ci_high", "n_lesion_images", "n_normal_images", "threshold",
                "used_tta", "used_largest_cc", "used_fill_holes", "hd95", "hd95_ci_low", "nsd",
                "nsd_ci_high"):
        assert got[key] == want[key], key
    assert got["n_test"] == 13 and got["val_dice"] == 0.5 and got["n_problems"] == 0
    assert set(want) - {"n_problems"} <= set(got)  # the test metrics' keys, all of them


def test_external_needs_evaluate_and_a_known_name(tmp_path: Path, demos):
    p = tiny_params(epochs=1)
    with pytest.raises(BusisegError, match="no external.hc"):
        evaluate_external(p, "hc", tmp_path / "m.pt", tmp_path / "eval.json")
    q = replace(p, external={"hc": LayoutParams(raw_dir=str(demos["flat"]))})
    with pytest.raises(BusisegError, match="run the evaluate stage first"):
        evaluate_external(q, "hc", tmp_path / "m.pt", tmp_path / "eval.json")


def test_ignore_patterns_account_for_metadata_files(tmp_path: Path):
    root = tmp_path / "kaggle_3m"
    for patient in ("P1", "P2"):
        write_png(root / patient / f"{patient}_1.png", np.full((8, 8), 90, np.uint8))
        write_png(root / patient / f"{patient}_1_mask.png", np.zeros((8, 8), np.uint8))
    (root / "data.csv").write_text("x")
    (root / "README.md").write_text("x")
    lay = Layout(layout="per_case", classes="none")
    with pytest.raises(IngestError, match="outside the case folders"):
        ingest(root, IngestOptions(workers=1, layout=lay))
    result = ingest(root, IngestOptions(workers=1, layout=replace(lay, ignore="*.csv, README*")))
    assert result.ignored == ["README.md", "data.csv"] and result.metrics["n_images"] == 2
    assert result.metrics["n_images_normal"] == 2


def test_a_bad_classes_csv_is_one_line(tmp_path: Path):
    root = tmp_path / "set"
    write_png(root / "c0.png", np.full((8, 8), 100, np.uint8))
    write_png(root / "c0_mask.png", np.full((8, 8), 255, np.uint8))
    lay = Layout(layout="flat", classes="csv", classes_csv="labels.csv")
    (root / "labels.csv").write_text("case_id,class\nc0,benign\n,malignant\nc0,malignant\n")
    with pytest.raises(BusisegError, match="line 4 gives case 'c0' class 'malignant'"):
        ingest(root, IngestOptions(workers=1, layout=lay))
    (root / "labels.csv").write_bytes(b"case_id,class\nc0,b\xe9nign\n")
    with pytest.raises(BusisegError, match="not a readable UTF-8 CSV"):
        ingest(root, IngestOptions(workers=1, layout=lay))
    (root / "labels.csv").write_text("case_id,class\n,benign\nc0,normal\n")  # blank id: no row
    assert ingest(root, IngestOptions(workers=1, layout=lay)).rows[0]["class"] == "normal"


def test_a_missing_partner_folder_still_names_every_file(tmp_path: Path):
    root = tmp_path / "set"
    write_png(root / "images" / "a.png", np.zeros((8, 8), np.uint8))
    problems = pytest.raises(IngestError, ingest, root, IngestOptions(
        workers=1, layout=Layout(layout="paired", classes="none"))).value.problems
    assert {(p.file, p.kind) for p in problems} == {(".", "missing_folder"),
                                                     ("images/a.png", "unpaired_folder")}


def test_label_masks_binarise_relative_to_their_own_maximum(tmp_path: Path):
    from busiseg.data.images import mask_to_bool

    labels = np.zeros((8, 8), np.uint8)
    labels[2:4, 2:4], labels[5:7, 5:7] = 1, 2  # a label map: 0 background, 1 and 2 lesions
    notes: list[str] = []
    got = mask_to_bool(Image.fromarray(labels), tmp_path / "m.png", notes)
    assert got.sum() == 8 and "3 values" in notes[0] and "1 of 2" in notes[0]


def test_external_problems_name_the_external_params(tmp_path: Path, demos):
    (demos["flat"] / "notes.txt").write_text("x")
    try:
        ext = LayoutParams(raw_dir=str(demos["flat"]), **PARAMS["flat"])
        q = replace(tiny_params(), external={"hc": ext})
        (tmp_path / "eval.json").write_text(json.dumps(
            {"threshold": 0.5, "val_dice": 0.5, "used_tta": 0, "used_largest_cc": 0,
             "used_fill_holes": 0}))
        run_train(tmp_path, tiny_params(epochs=1))
        with pytest.raises(IngestError) as info:
            evaluate_external(q, "hc", tmp_path / "a" / "model.pt", tmp_path / "eval.json")
        text = str(info.value)
        assert "external.hc.ignore" in text and "external.hc.on_problem" in text
        assert "data." not in text.replace(str(demos["flat"]), "")
    finally:
        (demos["flat"] / "notes.txt").unlink()


def _ellipse_outline(shape, cy, cx, ry, rx) -> tuple[np.ndarray, np.ndarray]:
    """(1-px outline, filled region) of an ellipse, both clipped to the frame."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    from scipy.ndimage import binary_erosion

    return inside & ~binary_erosion(inside, border_value=1), inside


@pytest.mark.parametrize("centre", [(60, 50), (95, 50), (60, 10), (110, 110)])
def test_an_outline_cut_by_the_frame_is_closed_along_the_edge(centre):
    outline, truth = _ellipse_outline((120, 120), *centre, 30, 40)
    region, how = close_outline(outline)
    assert how == ("closed" if centre == (60, 50) else "edge")
    iou = (region & truth).sum() / (region | truth).sum()
    assert iou > 0.99


def test_an_outline_that_encloses_nothing_is_a_named_problem(tmp_path: Path):
    raw = tmp_path / "hc"
    gray = np.full((80, 100), 90, np.uint8)
    cut, _ = _ellipse_outline((80, 100), 75, 50, 20, 30)  # closed by the bottom edge
    arc = np.zeros((80, 100), bool)
    arc[40, 10:60] = True  # a stroke: no region on either side
    for name, mask in (("001_", cut), ("002_", arc), ("003_", _ellipse_outline((80, 100), 40, 50,
                                                                                15, 20)[0])):
        write_png(raw / f"{name}HC.png", gray)
        write_png(raw / f"{name}HC_Annotation.png", mask.astype(np.uint8) * 255)
    layout = Layout(layout="flat", image_name="{id}HC", mask_name="{id}HC_Annotation",
                    classes="none", mask_kind="outline")
    with pytest.raises(IngestError, match="002_HC_Annotation.png: the outline encloses no region"):
        ingest(raw, IngestOptions(workers=1, layout=layout))
    result = ingest(raw, IngestOptions(on_problem="skip", workers=1, layout=layout))
    m = result.metrics
    assert m["n_images"] == 2 and m["audit_open_outlines"] == 1 and m["n_problems"] == 1
    assert {r["case_id"] for r in result.rows} == {"001_", "003_"}
    assert all(r["class"] == "lesion" for r in result.rows)  # both filled, none left empty


HC18 = Path(__file__).resolve().parents[3] / "shared" / "data" / "HC18" / "training_set"


@pytest.mark.skipif(not HC18.is_dir(), reason="HC18 not present in ../shared/data")
def test_every_real_hc18_head_comes_out_filled(tmp_path: Path):
    layout = Layout(layout="flat", image_name="{id}HC", mask_name="{id}HC_Annotation",
                    classes="none", mask_kind="outline")
    result = ingest(HC18, IngestOptions(workers=2, layout=layout))
    m = result.metrics
    assert m["n_problems"] == 0 and m["n_images"] == m["n_images_lesion"] == len(result.rows)
    assert m["audit_open_outlines"] >= 1  # 186_: the frame cuts the head
    preprocess(result.rows, HC18, 64, tmp_path / "c.npz", Reading(outline=True), 2)
    masks = np.load(tmp_path / "c.npz")["masks"]
    from scipy.ndimage import binary_erosion

    interior = [binary_erosion(m[0]).sum() / max(1, m[0].sum()) for m in masks > 0]
    assert min(interior) > 0.7  # every head a filled region at the cache size, none a bare curve


def test_a_patient_rule_keeps_one_pregnancys_scans_in_one_split_group(tmp_path: Path):
    raw = tmp_path / "hc"
    rng = np.random.default_rng(0)
    outline = _ellipse_outline((64, 64), 32, 32, 12, 16)[0].astype(np.uint8) * 255
    for name in ("010_", "010_2", "010_3", "011_", "012_"):
        write_png(raw / f"{name}HC.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        write_png(raw / f"{name}HC_Annotation.png", outline)
    layout = Layout(layout="flat", image_name="{id}HC", mask_name="{id}HC_Annotation",
                    classes="none", mask_kind="outline", patient_id=r"^(\d+)_")
    rows = pd.DataFrame(ingest(raw, IngestOptions(workers=1, layout=layout)).rows).set_index(
        "case_id")
    group = rows["dup_group"]
    assert group["010_"] == group["010_2"] == group["010_3"]
    assert len({group["010_"], group["011_"], group["012_"]}) == 3


@pytest.mark.parametrize("rule, needle", [("^(\\d+", "not a regular expression"),
                                          ("^\\d+_", "needs a \\(group\\)")])
def test_a_bad_patient_rule_is_one_line(rule: str, needle: str):
    with pytest.raises(BusisegError, match=f"data.patient_id.*{needle}"):
        parse_params({"data": {"layout": "flat", "patient_id": rule}})


def test_a_closed_outline_and_one_cut_by_the_frame_in_one_mask_are_both_filled():
    inner, inner_truth = _ellipse_outline((120, 120), 40, 40, 15, 20)
    cut, cut_truth = _ellipse_outline((120, 120), 110, 90, 20, 25)
    region, how = close_outline(inner | cut)
    assert how == "edge"
    truth = inner_truth | cut_truth
    assert (region & truth).sum() / (region | truth).sum() > 0.99


def test_a_patient_rule_joins_but_never_splits_a_per_case_folder(tmp_path: Path):
    raw = tmp_path / "pc"
    rng = np.random.default_rng(0)
    mask = _ellipse_outline((64, 64), 32, 32, 12, 16)[1].astype(np.uint8) * 255
    for folder, name in (("p1", "a_1"), ("p1", "b_1"), ("p2", "c_1"), ("p3", "a_2")):
        write_png(raw / folder / f"{name}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        write_png(raw / folder / f"{name}_mask.png", mask)
    layout = Layout(layout="per_case", image_name="{id}", mask_name="{id}_mask",
                    classes="none", patient_id=r"^[^/]+/([a-z])_")
    group = pd.DataFrame(ingest(raw, IngestOptions(workers=1, layout=layout)).rows).set_index(
        "case_id")["dup_group"]
    assert group["p1/a_1"] == group["p1/b_1"] == group["p3/a_2"]  # folder p1, and id a
    assert group["p2/c_1"] != group["p1/a_1"]
