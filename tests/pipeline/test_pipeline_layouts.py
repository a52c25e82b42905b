"""Other layouts through DVC: train on a paired-layout set, validate externally on the flat
(outline masks) and per-case demos, and add an external set without re-training."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_PARAMS, copy_repo, dvc, load_metrics

from busiseg.data.demo_layouts import PARAMS, generate_layout_demo

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
