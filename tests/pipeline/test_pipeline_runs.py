"""The pipeline under `dvc exp run` and an interrupted `dvc repro`, on this module's own copy of
the built tiny run (its changes never meet test_pipeline.py's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import STAGES, TIMING_KEYS, dvc, load_metrics, set_params, without_timing

pytestmark = pytest.mark.slow  # each test runs dvc on a copy of the repo


def test_killed_training_resumes_to_the_same_result(pipeline, python_env):
    repo, _, _ = pipeline
    original = (repo / "params.yaml").read_text()
    # enough epochs that Ctrl-C after epoch 1 surely lands inside the training loop (a tiny
    # epoch takes a tenth of a second; with 3 the run could finish before the signal arrives)
    epochs = 12
    params = yaml.safe_load(original)
    params["train"]["epochs"] = epochs
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        dvc(repo, python_env, "repro", "-s", "train")  # the uninterrupted reference
        reference = without_timing(load_metrics(repo))["train.json"]
        reference_digest = torch.load(repo / "models" / "model.pt", weights_only=True)["digest"]
        reference_live = live_files(repo)
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", "train"],
                                cwd=repo, env=python_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                # a shell's background job inherits SIGINT as ignored: undo that
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"epoch   1/{epochs}"):
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
                break
        proc.wait(timeout=120)
        assert proc.returncode != 0, "".join(seen)
        assert "resuming" not in "".join(seen)  # the finished run's checkpoint was not resumed
        assert not (repo / "models" / "model.pt").exists()
        # --no-run-cache: otherwise DVC restores the earlier identical run instead of training
        resumed = dvc(repo, python_env, "repro", "--no-run-cache", "-s", "train").stdout
        match = re.search(rf"resuming from epoch (\d+) of {epochs}", resumed)
        assert match and 1 <= int(match.group(1)) < epochs, resumed
        assert json.loads((repo / "metrics" / "train.json").read_text()) | {
            k: None for k in TIMING_KEYS} == reference | {k: None for k in TIMING_KEYS}
        assert torch.load(repo / "models" / "model.pt", weights_only=True)["digest"] \
            == reference_digest
        # DVCLive's curves and summary of the resumed run equal the uninterrupted run's
        assert live_files(repo) == reference_live and len(reference_live) == 6
    finally:
        (repo / "params.yaml").write_text(original)


def live_files(repo) -> dict:
    live = repo / "dvclive" / "train"
    return {str(f.relative_to(live)): f.read_text() for f in sorted(live.rglob("*"))
            if f.is_file()}


def test_one_exp_run_with_folds_a_classifier_and_seed_members_travels_to_predict(
        pipeline, python_env, tmp_path):
    """`-S split.folds=2` turns the committed single-split run into a 2-fold cross-validation
    (re-running split onwards only); with it, classify.kind segmentation beside two seeds a
    fold: classify trains its members and never train's, evaluate reports the folds' figures
    and malignancy out of fold and on test, and the packaged model alone, in an empty folder,
    predicts evaluate's test masks, p_lesion and p_malignant, as .pt and as its ONNX export;
    an evaluate param then re-runs evaluate and what reads it, and re-trains no fold."""
    import shutil

    import numpy as np
    import pandas as pd
    from conftest import busiseg
    from PIL import Image

    from busiseg.data.cache import load_cache

    repo, _, _ = pipeline
    folds, seeds = 2, 2
    try:
        out = dvc(repo, python_env, "exp", "run", "-S", f"split.folds={folds}",
                  "-S", f"train.seeds={seeds}",
                  "-S", "classify.kind=segmentation", "-S", "classify.epochs=1",
                  "-S", "classify.member_workers=1", "-S", "classify.decoder_channels=[16,8,8,8,8]",
                  "-S", "evaluate.presence_threshold=auto").stdout
        assert {s for s in STAGES if f"Running stage '{s}'" in out} == {
            "split", "train", "classify", "evaluate", "package", "plot"}
        metrics = load_metrics(repo)
        assert metrics["train.json"]["seeds"] == seeds and metrics["train.json"]["folds"] == folds
        assert metrics["classify.json"]["kind"] == "segmentation"
        assert metrics["classify.json"]["members"] == folds
        ev = metrics["eval.json"]
        assert ev["folds"] == folds
        for key in ("cv_malignant_auroc", "cv_malignant_ece", "malignant_threshold",
                    "cv_dice_all", "cv_detect_auroc", "cv_dice", "cv_iou", "cv_dice_pooled",
                    "cv_dice_benign", "cv_normal_empty_rate", "dice_single_mean",
                    "dice_ensemble_gain", "dice_ci_low", "cv_dice_ci_high",
                    "dice_ensemble_gain_ci_low", *(f"dice_single_{k}" for k in range(folds))):
            assert key in ev, key
        split = metrics["split.json"]
        assert split["n_cv"] == sum(split[f"n_fold_{k}"] for k in range(folds))
        assert split["n_groups_across_folds"] == 0
        assert torch.load(repo / "models" / "model.pt", weights_only=True)["members"] == folds
        for k in range(folds):
            for seed in range(seeds):
                live = repo / "dvclive" / "train" / f"fold_{k}_seed_{seed}" / "metrics.json"
                assert live.is_file(), live
        for name in ("curves.png", "dice_distribution.png", "worst.png", "worst_cv.png"):
            assert (repo / "plots" / "figures" / name).stat().st_size > 1000, name
        show = dvc(repo, python_env, "exp", "show", "--csv").stdout
        assert "split.folds" in show and "cv_dice" in show and "dice_ensemble_gain" in show
        # a classify.* change re-runs classify and what reads it, never train
        ran = (repo / "params.yaml").read_text()
        set_params(repo, classify={"epochs": 2})
        dry = dvc(repo, python_env, "repro", "--dry").stdout
        assert "Running stage 'classify'" in dry and "Running stage 'train'" not in dry
        (repo / "params.yaml").write_text(ran)

        alone = tmp_path / "alone"
        (alone / "images").mkdir(parents=True)
        shutil.copy(repo / "models" / "busiseg-model" / "model.pt", alone / "model.pt")
        scored = torch.load(repo / "data" / "predictions.pt", weights_only=True)
        cache = load_cache(repo / "data" / "cache.npz")
        names = {}
        for i in (int(i) for i in scored["test_idx"]):
            names[cache.case_ids[i]] = f"case{i}"
            Image.fromarray(cache.images[i, 0].numpy()).save(alone / "images" / f"case{i}.png")
        table = pd.read_csv(repo / "plots" / "evaluate" / "per_image.csv",
                            dtype={"case_id": str}).set_index("case_id")
        busiseg(["export", "--model", "model.pt", "--out", "model.onnx"], alone)
        for model in ("model.pt", "model.onnx"):
            out = alone / f"by-{model}"
            busiseg(["predict", "--model", model, "--out", out, "images"], alone)
            got = pd.read_csv(out / "predictions.csv")
            got["name"] = got["image"].map(lambda p: p.split("/")[-1].removesuffix(".png"))
            got = got.set_index("name")
            for case, name in names.items():
                for key in ("p_lesion", "p_malignant"):
                    assert abs(got.loc[name, key] - table.loc[case, key]) <= 1e-5, (model, key)
                mask = np.asarray(Image.open(out / f"{name}_mask.png")) > 0
                i = cache.case_ids.index(case)
                want = np.asarray(scored["pred"][list(scored["test_idx"]).index(i)]) > 0
                want = want.reshape(mask.shape)
                # ONNX Runtime's 1e-4 may move the odd pixel at the threshold, never more
                assert (mask != want).mean() <= (0 if model == "model.pt" else 1e-3), model

        # an evaluate param re-runs evaluate and what reads it, and re-trains no fold; the
        # packaged model carries the new choice over the same weights
        digest = torch.load(repo / "models" / "model.pt", weights_only=True)["digest"]
        set_params(repo, evaluate={"threshold": 0.4, "batch_size": 3, "device": "cpu",
                                   "tta": True})
        out = dvc(repo, python_env, "repro").stdout
        ran = {s for s in STAGES if f"Running stage '{s}'" in out}
        assert "evaluate" in ran and ran <= {"evaluate", "package", "plot"}  # plot: masks changed?
        assert load_metrics(repo)["eval.json"]["threshold"] == 0.4
        assert load_metrics(repo)["eval.json"]["used_tta"] == 1
        assert torch.load(repo / "models" / "model.pt", weights_only=True)["digest"] == digest
        packaged = torch.load(repo / "models" / "busiseg-model" / "model.pt", weights_only=True)
        assert packaged["digest"] == digest
        assert (packaged["settings"]["threshold"], packaged["settings"]["tta"]) == (0.4, True)
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        dvc(repo, python_env, "checkout", "-f")
