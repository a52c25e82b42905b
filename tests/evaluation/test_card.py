"""The model card and the provenance of each setting: what they state follows what was done."""

from __future__ import annotations

import shlex

import yaml
from conftest import REPO

from busiseg.evaluation.card import SECTIONS, model_card, reproduce_command
from busiseg.evaluation.choose import provenance
from busiseg.inference.segment import MaskSettings
from busiseg.params import parse_params


def test_the_card_command_covers_exactly_the_sections_the_package_stage_declares():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["package"]
    assert tuple(stage["params"]) == SECTIONS
    p = parse_params({"plot": {"n_worst": 3}, "data": {"raw_dir": "/home/me/x/Dataset_BUSI_with_GT",
                                                        "image_name": "{id}HC"},
                      "train": {"epochs": 7}})
    args = shlex.split(reproduce_command(p))
    assert args[:5] == ["uv", "run", "dvc", "exp", "run"]
    flags = args[6::2]
    assert "data.raw_dir=PATH/TO/Dataset_BUSI_with_GT" in flags  # not this machine's path
    assert "data.image_name='{id}HC'" in flags and "train.epochs=7" in flags
    assert not any(f.startswith("plot.") for f in flags)
    assert reproduce_command(parse_params({})) == "uv run dvc repro"


def test_the_threshold_s_source_is_what_was_chosen_not_what_was_asked():
    e = parse_params({"evaluate": {"tune_threshold": True, "select_on_val": True}}).evaluate
    tuned = provenance(e, MaskSettings(0.3, tuned_threshold=True), "out of fold, 9 images")
    kept = provenance(e, MaskSettings(0.5, tuned_threshold=False), "out of fold, 9 images")
    assert tuned["threshold"].startswith("chosen on held-out data (out of fold, 9 images)")
    assert kept["threshold"].startswith("evaluate.threshold: tuning it lost")
    assert provenance(parse_params({}).evaluate, MaskSettings(), "val")["threshold"] == \
        "evaluate.threshold"


def _metrics(n_images: int, classes: dict) -> dict:
    ingest = {"n_images": n_images, "n_masks": n_images, **{f"n_images_{c}": n
                                                             for c, n in classes.items()}}
    ev = {"dice": 0.5, "dice_ci_low": 0.4, "dice_ci_high": 0.6}
    return {"ingest": ingest, "split": {"n_test": 3}, "train": {"device": "cpu"}, "eval": ev}


def test_only_busi_gets_busi_s_hospital_and_paper():
    blob = {"model": {"arch": "unet"}, "preprocess": {"size": 64}, "settings": {}}
    busi = parse_params({"data": {"raw_dir": "/d/Dataset_BUSI_with_GT"}})
    card = model_card(busi, blob, _metrics(780, {"benign": 437, "malignant": 210,
                                                  "normal": 133}), {})
    assert "Baheya" in card and "Data in Brief" in card and "437 benign" in card
    other = parse_params({"data": {"raw_dir": "/d/hc18", "layout": "flat", "classes": "none",
                                   "image_name": "{id}HC", "mask_name": "{id}HC_Annotation"}})
    card = model_card(other, blob, _metrics(400, {"lesion": 400}), {})
    assert "Baheya" not in card and "Data in Brief" not in card and "BUSI (" not in card
    assert "400 lesion" in card and "0 benign" not in card and "`hc18`" in card
    assert "| 0.5 [0.4, 0.6] |" in card
