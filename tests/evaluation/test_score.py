"""busiseg score: predicted masks from any tool, matched to true masks by name and scored by the
code evaluate scores the test split with."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_case, run_train, tiny_data, tiny_params, write_png
from PIL import Image

from busiseg import busiseg_version
from busiseg.cli import main
from busiseg.data.classes import ALL_CLASSES
from busiseg.data.images import load_mask_union
from busiseg.data.ingest import _natural_key
from busiseg.evaluation.evaluate import evaluate
from busiseg.evaluation.score import IMAGE_BESIDE_MASKS, IMAGE_IN_CLASS
from busiseg.inference.predict import OWN_OUTPUT, OWN_SUFFIXES


def mask(shape: tuple[int, int], box: tuple[slice, slice] | None = None) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    if box is not None:
        m[box] = True
    return m


def save(path: Path, m: np.ndarray, style: str = "255") -> Path:
    """A boolean mask as a tool would write it: 0/255 grey, 0/1 labels (nnU-Net) or RGB."""
    if style == "01":
        return write_png(path, m.astype(np.uint8))
    if style == "rgb":
        return write_png(path, m.astype(np.uint8) * 255, "RGB")
    return write_png(path, m.astype(np.uint8) * 255)


def score(*args: str | Path) -> int:
    return main(["score", *map(str, args)])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def ignored(match: dict, key: str) -> dict[str, str]:
    return {i["path"]: i["reason"] for i in match[key]}


def image(path: Path, shape: tuple[int, int] = (10, 10), seed: int = 0) -> Path:
    """An ultrasound-like grey image: speckle over the whole range, a mask by no rule."""
    return write_png(path, np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["case_id"]: r for r in csv.DictReader(fh)}


# truth and prediction of four cases of different sizes: a half-found lesion, a perfect one, a
# normal image left empty and one given a two-pixel false positive
HAND = {
    "a": (mask((10, 10), np.s_[0:4, 0:4]), mask((10, 10), np.s_[0:4, 0:2])),
    "b": (mask((12, 16), np.s_[3:9, 2:10]), mask((12, 16), np.s_[3:9, 2:10])),
    "n": (mask((8, 8)), mask((8, 8))),
    "m": (mask((10, 20)), mask((10, 20), np.s_[5, 5:7])),
}


def test_hand_made_masks_score_to_their_known_dice(tmp_path: Path, capsys):
    for cid, (true, pred) in HAND.items():
        save(tmp_path / "truth" / f"{cid}_mask.png", true)  # 0/255, busiseg's naming
        save(tmp_path / "pred" / f"{cid}.png", pred, "01")  # 0/1 labels, nnU-Net's naming
    assert score("--pred", tmp_path / "pred", "--truth", tmp_path / "truth", "--out",
                 tmp_path / "out", "--bootstrap", 100) == 0
    report = read_json(tmp_path / "out" / "scores.json")
    m = report["metrics"]
    assert m["dice"] == round((2 / 3 + 1) / 2, 6) and m["iou"] == 0.75
    assert m["dice_pooled"] == round(2 * 56 / (2 * 56 + 8), 6)  # tp 8 + 48, fn 8
    assert m["dice_all"] == round((2 / 3 + 1 + 1 + 0) / 4, 6)
    assert m["normal_empty_rate"] == 0.5 and m["detect_specificity"] == 0.5
    assert m["detect_sensitivity"] == 1.0
    assert m["normal_fp_area"] == round((0 / 64 + 2 / 200) / 2, 6)  # each image's own size
    assert m["n_lesion_images"] == 2 and m["n_normal_images"] == 2
    assert m["dice_benign"] is None and "detect_auroc" not in m  # no classes, no scores
    assert m["dice_ci_low"] <= m["dice"] <= m["dice_ci_high"]
    assert m["dice_all_ci_low"] <= m["dice_all"] <= m["dice_all_ci_high"]
    assert {"hd95", "nsd", "hd95_ci_low", "nsd_ci_high", "iou_all_ci_low",
            "detect_specificity_ci_high"} <= set(m)
    assert "detect_auroc_ci_low" not in m
    rows = read_rows(tmp_path / "out" / "scores.csv")
    assert list(rows) == ["a", "b", "m", "n"]  # lesion, then normal: ingest's order
    assert {k: rows[k]["class"] for k in rows} == {"a": "lesion", "b": "lesion",
                                                   "m": "normal", "n": "normal"}
    assert float(rows["a"]["dice"]) == round(2 / 3, 6) and float(rows["a"]["iou"]) == 0.5
    assert float(rows["b"]["hd95"]) == 0 and float(rows["b"]["nsd"]) == 1
    assert float(rows["a"]["hd95"]) > 0 and float(rows["m"]["nsd"]) == 0
    assert float(rows["m"]["pred_area"]) == 0.01 and float(rows["b"]["lesion_area"]) == 0.25
    assert report["matching"]["missing"] == [] and report["matching"]["unmatched"] == []
    assert report["command"].startswith("busiseg score --pred ")
    assert report["busiseg"] == busiseg_version() and "busiseg_version" not in report
    assert report["truth_layout"] == "flat"
    out = capsys.readouterr().out
    assert "4 matched, 0 missing, 0 unmatched" in out and "Dice 0.833333 [" in out


def test_missing_and_unmatched_files_are_named(tmp_path: Path, capsys):
    lesion = mask((8, 8), np.s_[2:5, 2:5])
    for cid in ("case 1", "case 2", "case 10"):
        save(tmp_path / "truth" / f"{cid}_mask.png", lesion)
    pred = tmp_path / "pred"
    save(pred / "case 1_mask.png", lesion)
    save(pred / "stray_mask.png", lesion)
    for suffix in OWN_SUFFIXES:  # predict's extras, not predictions
        save(pred / f"case 1{suffix}.png", lesion, "rgb")
    (pred / "predictions.csv").write_text("image,mask\n")
    assert score("--pred", pred, "--truth", tmp_path / "truth", "--bootstrap", 0) == 0
    report = read_json(pred / "scores.json")  # --out defaults to the prediction folder
    match = report["matching"]
    assert match["missing"] == ["case 2", "case 10"] and match["unmatched"] == ["stray_mask.png"]
    assert (match["n_matched"], match["n_missing"], match["n_unmatched"]) == (1, 2, 1)
    skipped = ignored(match, "ignored_pred")
    assert {f"case 1{suffix}.png": OWN_OUTPUT for suffix in OWN_SUFFIXES}.items() <= (
        skipped.items())
    assert "image file" in skipped["predictions.csv"]
    # each missing case scored as an empty mask, a miss: Dice 1, 0, 0 over the lesion images
    assert report["metrics"]["dice"] == round(1 / 3, 6)
    assert report["metrics"]["dice_ci_low"] is None
    assert report["metrics"]["detect_sensitivity"] == round(1 / 3, 6)
    assert report["metrics"]["long_axis_mae_px"] == round(2 * np.hypot(3, 3) / 3, 6)
    rows = read_rows(pred / "scores.csv")
    assert {k: rows[k]["predicted"] for k in rows} == {"case 1": "1", "case 2": "0",
                                                       "case 10": "0"}
    assert float(rows["case 2"]["dice"]) == 0 and float(rows["case 2"]["long_axis_px"]) == 0
    assert "--missing empty" in report["command"]
    err = capsys.readouterr().err
    assert "without a prediction (missing), scored as empty masks: case 2, case 10" in err
    assert "without a truth (unmatched): stray_mask.png" in err
    # --missing error stops in one line naming them, and writes nothing
    (pred / "scores.json").unlink()
    assert score("--pred", pred, "--truth", tmp_path / "truth", "--missing", "error") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 truth case(s) have no prediction: case 2, case 10" in err
    assert "--missing empty" in err and not (pred / "scores.json").exists()


def test_zero_one_zero_255_and_rgb_masks_are_read_alike(tmp_path: Path):
    true = mask((16, 12), np.s_[3:11, 2:9])
    pred = mask((16, 12), np.s_[5:14, 4:10])
    save(tmp_path / "truth" / "x_mask.png", true)
    found = {}
    for style in ("01", "255", "rgb"):
        save(tmp_path / style / "x_mask.png", pred, style)
        assert score("--pred", tmp_path / style, "--truth", tmp_path / "truth",
                     "--bootstrap", 10) == 0
        found[style] = (read_json(tmp_path / style / "scores.json")["metrics"],
                        (tmp_path / style / "scores.csv").read_text())
    assert found["01"] == found["255"] == found["rgb"]
    tp = int((true & pred).sum())
    assert found["01"][0]["dice"] == round(2 * tp / (true.sum() + pred.sum()), 6)


def test_a_busi_tree_gives_classes_and_merges_further_masks(tmp_path: Path):
    truth = tmp_path / "Dataset_BUSI_with_GT"
    _, two = make_case(truth, "benign", 1, n_masks=2)
    _, one = make_case(truth, "malignant", 1)
    _, empty = make_case(truth, "normal", 1, lesion=False, mask_mode="RGB")
    read = [np.asarray(Image.open(p).convert("L")) > 0 for p in (*two, *one, *empty)]
    union = read[0] | read[1]
    assert read[1].any() and (read[1] & ~read[0]).any()  # a second lesion of its own
    pred = tmp_path / "pred"
    save(pred / "benign (1)_mask.png", read[0])  # the first mask only
    save(pred / "malignant (1)_mask.png", read[2])
    save(pred / "normal (1)_mask.png", read[3])
    assert score("--pred", pred, "--truth", truth, "--bootstrap", 10) == 0
    report = read_json(pred / "scores.json")
    rows = read_rows(pred / "scores.csv")
    assert list(rows) == ["benign (1)", "malignant (1)", "normal (1)"]
    assert [r["class"] for r in rows.values()] == ["benign", "malignant", "normal"]
    want = 2 * read[0].sum() / (read[0].sum() + union.sum())  # scored against the union
    assert float(rows["benign (1)"]["dice"]) == round(float(want), 6) < 1
    m = report["metrics"]
    assert m["dice_benign"] == round(float(want), 6) and m["dice_malignant"] == 1.0
    assert m["normal_empty_rate"] == 1.0 and report["truth_layout"] == "busi"
    assert {"benign/benign (1).png": IMAGE_IN_CLASS, "normal/normal (1).png": IMAGE_IN_CLASS
            }.items() <= ignored(report["matching"], "ignored_truth").items()  # the images


def test_images_beside_masks_are_never_scored(tmp_path: Path, capsys):
    """A flat truth folder BUSI-like (images beside their masks, and an image whose mask is
    absent) and a `busiseg predict DIR --out DIR` folder where one image (b) failed: no plain
    name there is a mask, so b is missing and c no case, whatever their pixels."""
    lesion = mask((10, 10), np.s_[2:6, 2:6])
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for n, cid in enumerate("abc"):
        image(truth / f"{cid}.png", seed=n)
        image(pred / f"{cid}.png", seed=n)
    image(pred / "b.jpg", seed=1)  # two images of one name are no duplicate masks
    save(truth / "a_mask.png", lesion)
    save(truth / "b_mask.png", lesion)
    save(pred / "a_mask.png", lesion)
    save(pred / "a_overlay.png", lesion, "rgb")
    assert score("--pred", pred, "--truth", truth, "--bootstrap", 0) == 0
    report = read_json(pred / "scores.json")
    match = report["matching"]
    assert (match["n_truth"], match["n_pred"], match["n_matched"]) == (2, 1, 1)
    assert match["missing"] == ["b"] and match["unmatched"] == []
    assert ignored(match, "ignored_pred") == {"a.png": IMAGE_BESIDE_MASKS,
                                              "a_overlay.png": OWN_OUTPUT,
                                              "b.jpg": IMAGE_BESIDE_MASKS,
                                              "b.png": IMAGE_BESIDE_MASKS,
                                              "c.png": IMAGE_BESIDE_MASKS}
    assert ignored(match, "ignored_truth") == dict.fromkeys(["a.png", "b.png", "c.png"],
                                                            IMAGE_BESIDE_MASKS)
    assert report["notes"] == [] and report["metrics"]["dice"] == 0.5  # b missing: a miss
    assert {k: r["predicted"] for k, r in read_rows(pred / "scores.csv").items()} == {
        "a": "1", "b": "0"}
    err = capsys.readouterr().err
    assert "ignored 5 file(s) in --pred" in err and "4 " + IMAGE_BESIDE_MASKS in err
    assert "ignored 3 file(s) in --truth" in err and "binarised" not in err


def test_a_mask_of_more_than_two_values_is_read_by_ingests_rule_and_said(tmp_path: Path,
                                                                         capsys):
    """Anti-aliased edges: binarised exactly as ingest reads the mask (lesion ≥ half the
    maximum), and named on stderr, since an image named as a mask would be binarised too."""
    soft = np.zeros((12, 12), dtype=np.uint8)
    soft[3:9, 3:9] = 255
    soft[2, 3:9] = soft[9, 3:9] = 128  # on the line: half of 255 rounds up to lesion
    soft[3:9, 2] = 127  # just below half: background
    soft[3:9, 9] = 40
    truth = write_png(tmp_path / "truth" / "x_mask.png", soft)
    want = load_mask_union([truth])
    assert want.sum() == 36 + 12
    save(tmp_path / "pred" / "x_mask.png", want)
    assert score("--pred", tmp_path / "pred", "--truth", tmp_path / "truth",
                 "--bootstrap", 0) == 0
    report = read_json(tmp_path / "pred" / "scores.json")
    assert report["metrics"]["dice"] == 1.0
    assert len(report["notes"]) == 1 and report["notes"][0].startswith(f"{truth}: mask with 5 "
                                                                       "values binarised")
    err = capsys.readouterr().err
    assert f"1 mask(s) had more than two values and were binarised as ingest binarises them, " \
           f"e.g. {truth}" in err


@pytest.mark.parametrize("case", ["size", "nothing_matches", "out_is_file", "no_truth"])
def test_each_problem_is_one_line(tmp_path: Path, capsys, case: str):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    save(truth / "a_mask.png", mask((10, 10), np.s_[2:5, 2:5]))
    save(pred / ("b.png" if case == "nothing_matches" else "a.png"),
         mask((20, 10) if case == "size" else (10, 10)))
    args = ["--pred", pred, "--truth", truth if case != "no_truth" else tmp_path / "nope"]
    if case == "out_is_file":
        (tmp_path / "taken").write_text("")
        args += ["--out", tmp_path / "taken"]
    assert score(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    expect = {"size": [str(pred / "a.png"), str(truth / "a_mask.png"), "10x20", "10x10"],
              "nothing_matches": ["--pred", "none of its 1 mask(s)"],
              "out_is_file": ["--out", "is a file"],
              "no_truth": ["--truth", "does not exist"]}[case]
    assert all(word in err for word in expect), err
    assert not (pred / "scores.json").exists()


# ---- evaluate's own test predictions, written out and scored: the same figures --------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict, object]:
    """The real evaluate on a tiny model, with every non-val case as test, in the order ingest
    and split give the pipeline (class, then natural name), and a manifest whose sizes make the
    cache's pixels the original ones, so the boundary figures are in the masks' pixels too."""
    tmp = tmp_path_factory.mktemp("score")
    p = tiny_params(epochs=3)
    run_train(tmp, p)
    cache, split = tiny_data(tmp)
    rows = pd.read_csv(split, dtype={"case_id": str}, keep_default_na=False)
    rows["split"] = np.where(rows["split"] == "val", "val", "test")
    order = sorted(range(len(rows)), key=lambda i: (ALL_CLASSES.index(rows["class"][i]),
                                                    _natural_key(rows["case_id"][i])))
    rows.iloc[order].to_csv(tmp / "split_all.csv", index=False)
    pd.DataFrame({"case_id": rows["case_id"], "class": rows["class"], "width": 32,
                  "height": 32}).to_csv(tmp / "manifest.csv", index=False)
    # half a pixel: only outline pixels on the other outline agree, so NSD is not all ones
    p = replace(p, evaluate=replace(p.evaluate, bootstrap=200, bootstrap_seed=3,
                                    surface_tolerance=0.5))
    result = evaluate(p, tmp / "a" / "model.pt", cache, tmp / "split_all.csv",
                      manifest_path=tmp / "manifest.csv")
    return tmp, result, p


def test_evaluates_test_predictions_written_to_disk_score_to_evaluates_figures(evaluated):
    tmp, result, p = evaluated
    te_rows = result["test_rows"]
    assert te_rows["class"].nunique() == 3  # benign, malignant and normal images all scored
    for k, (cid, cls) in enumerate(zip(te_rows["case_id"], te_rows["class"])):
        save(tmp / "truth" / cls / f"{cid}_mask.png", result["test_true"][k])
        save(tmp / "pred" / f"{cid}.png", result["test_pred"][k], "01")
    assert score("--pred", tmp / "pred", "--truth", tmp / "truth", "--out", tmp / "out",
                 "--bootstrap", p.evaluate.bootstrap, "--bootstrap-seed",
                 p.evaluate.bootstrap_seed, "--surface-tolerance",
                 p.evaluate.surface_tolerance) == 0
    want, got = result["metrics"], read_json(tmp / "out" / "scores.json")["metrics"]
    must = {"dice", "iou", "dice_pooled", "iou_pooled", "precision", "recall", "dice_benign",
            "dice_malignant", "iou_benign", "iou_malignant", "normal_empty_rate",
            "normal_fp_area", "dice_all", "iou_all", "detect_sensitivity", "detect_specificity",
            "n_lesion_images", "n_normal_images", "dice_ci_low", "dice_ci_high",
            "dice_all_ci_low", "dice_all_ci_high", "iou_all_ci_low", "iou_all_ci_high",
            "detect_sensitivity_ci_low", "detect_sensitivity_ci_high",
            "detect_specificity_ci_low", "detect_specificity_ci_high", "hd95", "nsd",
            "hd95_ci_low", "hd95_ci_high", "nsd_ci_low", "nsd_ci_high"}
    shared = set(want) & set(got)
    assert must <= shared, must - shared
    assert {k: got[k] for k in sorted(shared)} == {k: want[k] for k in sorted(shared)}
    # figures and intervals that could have differed
    assert want["dice_ci_low"] < want["dice_ci_high"] and want["hd95_ci_low"] < want["hd95_ci_high"]
    assert 0 < want["nsd_ci_low"] < want["nsd_ci_high"] < 1
    table = pd.read_csv(tmp / "out" / "scores.csv", dtype={"case_id": str})
    per_image = result["per_image"]
    assert table["case_id"].tolist() == per_image["case_id"].tolist()
    for col in ("class", "dice", "iou", "lesion_area", "pred_area", "hd95", "nsd"):
        assert table[col].tolist() == per_image[col].tolist(), col


def test_at_an_original_size_other_than_the_cache_s_score_still_agrees_with_evaluate(evaluated):
    """Originals twice as tall as the cache and as wide (row pixels 2, column pixels 1 in cache
    units): masks written at the original size, each cache pixel a 2×1 block, must give
    evaluate's Dice-family figures exactly, and HD95 within one original pixel of evaluate's
    (the blocks' outline sits up to half a pixel either side of the scaled one)."""
    tmp, first, p = evaluated
    sized = tmp / "sized"
    rows = first["test_rows"]
    pd.read_csv(tmp / "manifest.csv", dtype={"case_id": str}).assign(width=32, height=64).to_csv(
        tmp / "manifest_64x32.csv", index=False)
    p = replace(p, evaluate=replace(p.evaluate, surface_tolerance=1.0))
    result = evaluate(p, tmp / "a" / "model.pt", tmp / "cache.npz", tmp / "split_all.csv",
                      manifest_path=tmp / "manifest_64x32.csv")
    for k, (cid, cls) in enumerate(zip(rows["case_id"], rows["class"])):
        save(sized / "truth" / cls / f"{cid}_mask.png",
             np.repeat(result["test_true"][k], 2, axis=0))
        save(sized / "pred" / f"{cid}.png", np.repeat(result["test_pred"][k], 2, axis=0))
    assert score("--pred", sized / "pred", "--truth", sized / "truth", "--out", sized / "out",
                 "--bootstrap", p.evaluate.bootstrap, "--bootstrap-seed",
                 p.evaluate.bootstrap_seed, "--surface-tolerance", 1.0) == 0
    want, got = result["metrics"], read_json(sized / "out" / "scores.json")["metrics"]
    for key in ("dice", "iou", "dice_pooled", "dice_all", "iou_all", "normal_fp_area",
                "detect_sensitivity", "detect_specificity", "dice_ci_low", "dice_ci_high"):
        assert got[key] == want[key], key
    table = pd.read_csv(sized / "out" / "scores.csv", dtype={"case_id": str})
    per_image = result["per_image"]
    assert table["dice"].tolist() == per_image["dice"].tolist()
    lesion = (per_image["lesion_area"] > 0).to_numpy()
    assert np.abs(table["hd95"] - per_image["hd95"]).to_numpy()[lesion].max() <= 1.0
    assert abs(got["hd95"] - want["hd95"]) <= 1.0
    assert want["hd95"] > first["metrics"]["hd95"]  # in original pixels, not the cache's
