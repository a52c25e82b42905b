"""The pipeline through its real entry points: dvc repro, dvc exp run, and the stage scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import (
    STAGES,
    TINY_PARAMS,
    dvc,
    load_metrics,
    run,
    set_params,
    stale_stages,
    without_timing,
)


def test_repro_writes_every_output(pipeline):
    repo, first, metrics = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert set(metrics) == {"ingest.json", "split.json", "train.json", "eval.json"}
    ingest = metrics["ingest.json"]
    assert ingest["n_images"] == 24 and ingest["n_problems"] == 0
    for key in ("n_masks", "n_multi_mask", "n_images_benign", "n_images_malignant",
                "n_images_normal", "n_duplicate_groups"):
        assert key in ingest
    for key in ("n_train", "n_val", "n_test"):
        assert metrics["split.json"][key] > 0
    for key in ("best_epoch", "best_val_dice", "best_val_iou", "epochs_run", "seconds",
                "images_per_s"):
        assert key in metrics["train.json"]
    for key in ("dice", "iou", "dice_pooled", "iou_pooled", "precision", "recall", "dice_benign",
                "dice_malignant", "normal_empty_rate", "normal_fp_area", "threshold"):
        assert key in metrics["eval.json"]
    for name in ("curves.png", "montage.png", "worst.png"):
        assert (repo / "plots" / "figures" / name).stat().st_size > 1000
    assert (repo / "plots" / "evaluate" / "per_image.csv").read_text().startswith(
        "case_id,class,dice,iou,lesion_area,pred_area")
    assert (repo / "models" / "model.pt").is_file()


def test_params_invalidate_only_the_stages_that_read_them(pipeline, python_env):
    """DVC re-runs a stage's dependents only when its outputs change, so the dry run names the
    first stage a change reaches; nothing upstream of it may appear."""
    repo, _, _ = pipeline
    assert stale_stages(repo, python_env) == set()
    original = (repo / "params.yaml").read_text()
    try:
        set_params(repo, train={"epochs": 7})
        assert stale_stages(repo, python_env) == {"train"}
        (repo / "params.yaml").write_text(original)
        set_params(repo, preprocess={"size": 96})
        assert stale_stages(repo, python_env) == {"preprocess"}
        (repo / "params.yaml").write_text(original)
        set_params(repo, evaluate={"tta": True})
        assert stale_stages(repo, python_env) == {"evaluate"}
        (repo / "params.yaml").write_text(original)
        set_params(repo, split={"seed": 5})
        assert stale_stages(repo, python_env) == {"split"}
    finally:
        (repo / "params.yaml").write_text(original)


def _cache_size(repo: Path) -> int:
    with np.load(repo / "data" / "cache.npz") as z:
        return int(z["images"].shape[-1])


def test_a_size_sweep_is_never_served_another_size_from_the_run_cache(pipeline, python_env):
    """DVC leaves every key named `size` out of its run-cache key (treeverse/dvc#10296): with the
    size only in params, going back and forth between two sizes restored the first size's cache
    for the second, silently, and everything downstream trained on it."""
    repo, _, _ = pipeline
    size = TINY_PARAMS["preprocess"]["size"]
    try:
        for want in (size // 2, size, size // 2):  # each size is in the run cache the 2nd time
            set_params(repo, preprocess={"size": want})
            dvc(repo, python_env, "repro", "preprocess")
            assert _cache_size(repo) == want
    finally:  # back to the committed run for the tests after this one
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        dvc(repo, python_env, "checkout", "-f")
    assert _cache_size(repo) == size
    # the command-line size exists for DVC only: one that disagrees with params.yaml is refused
    bad = run([sys.executable, "stages/preprocess.py", "--size", "48"], repo, python_env,
              check=False)
    assert bad.returncode == 1 and _cache_size(repo) == size
    assert bad.stderr.strip().splitlines() == [
        f"error: stages/preprocess.py got '--size 48' but params.yaml has preprocess.size {size}; "
        "run `dvc repro`"]


def test_two_clean_runs_give_identical_metrics(pipeline, python_env):
    repo, _, metrics = pipeline
    again = dvc(repo, python_env, "repro", "-f")
    assert "Running stage 'train'" in again.stdout  # really re-ran, not restored from a cache
    assert without_timing(load_metrics(repo)) == without_timing(metrics)
