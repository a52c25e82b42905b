"""The pipeline with split.folds: one flag turns it on and evaluate params re-train no fold (a
module of its own, so that a pytest worker runs it beside the other pipeline modules). Resuming
in the fold a kill interrupted is tested on the library (test_cross_validation.py); that DVC
keeps models/checkpoints/ across a kill, by test_pipeline_runs.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import STAGES, TINY_PARAMS, copy_repo, dvc, run, set_params

FOLDS = 3


@pytest.fixture(scope="module")
def cv_pipeline(tmp_path_factory, python_env):
    """The tiny pipeline turned into a 3-fold cross-validation by one `-S` flag."""
    repo = copy_repo(tmp_path_factory.mktemp("cvrepo"), TINY_PARAMS)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    first = dvc(repo, python_env, "exp", "run", "-S", f"split.folds={FOLDS}")
    run(git + ["add", "-A"], repo, python_env)
    run(git + ["commit", "-qm", "cv run"], repo, python_env)
    return repo, first


def digest(repo) -> str:
    return torch.load(repo / "models" / "model.pt", weights_only=True)["digest"]


def test_one_flag_runs_k_fold_cross_validation_end_to_end(cv_pipeline, python_env):
    repo, first = cv_pipeline
    assert all(f"Running stage '{s}'" in first.stdout for s in STAGES)
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert ev["folds"] == FOLDS
    for key in ("cv_dice", "cv_iou", "cv_dice_pooled", "cv_dice_benign", "cv_normal_empty_rate",
                "dice_single_mean", "dice_ensemble_gain", "dice_ci_low", "cv_dice_ci_high",
                "dice_ensemble_gain_ci_low", *(f"dice_single_{k}" for k in range(FOLDS))):
        assert key in ev, key
    split = json.loads((repo / "metrics" / "split.json").read_text())
    assert split["n_cv"] == sum(split[f"n_fold_{k}"] for k in range(FOLDS))
    assert split["n_groups_across_folds"] == 0
    blob = torch.load(repo / "models" / "model.pt", weights_only=True)
    assert blob["members"] == FOLDS
    for k in range(FOLDS):
        assert (repo / "dvclive" / "train" / f"fold_{k}" / "metrics.json").is_file()
    for name in ("curves.png", "dice_distribution.png", "montage.png", "worst.png",
                 "worst_cv.png"):
        assert (repo / "plots" / "figures" / name).stat().st_size > 1000, name
    show = dvc(repo, python_env, "exp", "show", "--csv").stdout
    assert "split.folds" in show and "cv_dice" in show and "dice_ensemble_gain" in show


def test_an_evaluate_param_retrains_no_fold(cv_pipeline, python_env):
    repo, _ = cv_pipeline
    before = digest(repo)
    try:
        set_params(repo, evaluate={"tune_threshold": True, "tta": True, "select_on_val": True})
        out = dvc(repo, python_env, "repro").stdout
        ran = {s for s in STAGES if f"Running stage '{s}'" in out}
        assert "evaluate" in ran and ran <= {"evaluate", "plot"}
        assert digest(repo) == before
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        dvc(repo, python_env, "checkout", "-f")
