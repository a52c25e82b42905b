"""Other layouts through DVC: train on a paired-layout set, validate externally on the flat
(outline masks) and per-case demos, and add an external set without re-training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import TINY_PARAMS, busiseg, copy_repo, dvc, load_metrics
from PIL import Image

from busiseg.data.cache import load_cache
from busiseg.data.demo_layouts import PARAMS, generate_layout_demo
from busiseg.modeling.model_file import load_model

pytestmark = pytest.mark.slow  # each test runs dvc on a copy of the repo


def test_layouts_and_external_validation_through_dvc(tmp_path, python_env):
    demos = {}
    for name in PARAMS:
        demos[name] = tmp_path / "demos" / name
        generate_layout_demo(demos[name], name, n_benign=10, n_malignant=8, n_normal=6,
                             min_size=64, max_size=96)
    flat = {"raw_dir": str(demos["flat"]), **PARAMS["flat"]}
    params = {**TINY_PARAMS, "data": {"raw_dir": str(demos["paired"]), **PARAMS["paired"]},
              "external": {"hc": flat}}
    repo = copy_repo(tmp_path / "repo", params)
    out = dvc(repo, python_env, "repro").stdout
    assert "Running stage 'external@hc'" in out
    metrics = load_metrics(repo)
    ingest = metrics["ingest.json"]
    assert (ingest["n_images"], ingest["n_images_benign"], ingest["n_images_normal"]) == (24, 10, 6)
    test = metrics["eval.json"]
    hc = json.loads((repo / "metrics" / "external" / "hc.json").read_text())
    assert set(test) - {"val_dice"} <= set(hc) and hc["n_test"] == 24
    assert hc["n_lesion_images"] == 18 and hc["threshold"] == test["threshold"]
    assert (repo / "plots" / "external" / "hc.csv").read_text().count("\n") == 25

    # a second external set: its own stage runs, nothing is re-trained or re-scored
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["external"]["lgg"] = {"raw_dir": str(demos["per_case"]), **PARAMS["per_case"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = dvc(repo, python_env, "repro").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"external@lgg"}
    shown = json.loads(dvc(repo, python_env, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert {"metrics/external/hc.json", "metrics/external/lgg.json"} <= set(files)
    assert files["metrics/external/lgg.json"]["data"]["n_test"] == 24


def test_a_three_channel_set_runs_through_dvc_with_its_colour_kept(tmp_path, python_env):
    """LGG-like: three sequences stored as the RGB channels of TIFFs, per-case folders, read
    with preprocess.channels 3: the cache, the model, evaluate, predict and the ONNX export all
    take three channels, and the colour-mark audit is off and says so."""
    raw = tmp_path / "lgg"
    generate_layout_demo(raw, "per_case_rgb", n_benign=14, n_malignant=10, n_normal=12,
                         min_size=64, max_size=96)  # 12 patients of 3 frames
    params = {**TINY_PARAMS, "data": {"raw_dir": str(raw), **PARAMS["per_case_rgb"]},
              "preprocess": {**TINY_PARAMS["preprocess"], "channels": 3},
              "split": {"train": 0.5, "val": 0.25, "test": 0.25}}
    repo = copy_repo(tmp_path / "repo", params)
    out = dvc(repo, python_env, "repro").stdout
    assert "colour-mark audit off (preprocess.channels 3" in out
    metrics = load_metrics(repo)
    assert "audit_burned_marks" not in metrics["ingest.json"]
    assert metrics["ingest.json"]["audit_converted_images"] == 0  # RGB kept as it is
    cache = load_cache(repo / "data" / "cache.npz")
    assert cache.images.shape[1] == 3
    assert not np.array_equal(cache.images[:, 0].numpy(), cache.images[:, 2].numpy())
    model, blob = load_model(repo / "models" / "model.pt")
    assert blob["model"]["in_channels"] == 3 and blob["preprocess"]["channels"] == 3
    assert metrics["eval.json"]["dice"] is not None

    image = next(raw.glob("patient_01/*[0-9].tif"))
    busiseg(["predict", image, "--out", "pt"], repo)
    busiseg(["export", "--model", "models/model.pt", "--format", "onnx", "--out", "m.onnx"], repo)
    busiseg(["predict", "--model", "m.onnx", image, "--out", "onnx"], repo)

    pt = np.asarray(Image.open(repo / "pt" / f"{image.stem}_mask.png"))
    onnx = np.asarray(Image.open(repo / "onnx" / f"{image.stem}_mask.png"))
    assert pt.shape == onnx.shape == np.asarray(Image.open(image)).shape[:2]
    assert (pt != onnx).mean() < 0.001
