"""The pipeline under `dvc exp run` and an interrupted `dvc repro` (its own module, so that a
second pytest worker runs it beside tests/test_pipeline.py)."""

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


def test_an_evaluate_param_reruns_only_evaluate_and_what_reads_it(pipeline, python_env):
    repo, _, _ = pipeline
    digest = torch.load(repo / "models" / "model.pt", weights_only=True)["digest"]
    try:
        set_params(repo, evaluate={"threshold": 0.4, "batch_size": 3, "device": "cpu",
                                   "tta": True})
        out = dvc(repo, python_env, "repro").stdout
        ran = {s for s in STAGES if f"Running stage '{s}'" in out}
        assert "evaluate" in ran and ran <= {"evaluate", "package", "plot"}  # plot: masks changed?
        assert load_metrics(repo)["eval.json"]["threshold"] == 0.4
        assert load_metrics(repo)["eval.json"]["used_tta"] == 1
        assert torch.load(repo / "models" / "model.pt", weights_only=True)["digest"] == digest
        # the packaged model carries the new choice over the same weights
        packaged = torch.load(repo / "models" / "busiseg-model" / "model.pt", weights_only=True)
        assert packaged["digest"] == digest
        assert (packaged["settings"]["threshold"], packaged["settings"]["tta"]) == (0.4, True)
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        dvc(repo, python_env, "checkout", "-f")


def test_exp_run_reruns_only_model_stages_and_reads_small_floats(pipeline, python_env):
    """DVC writes -S train.lr=5e-5 into params.yaml as `5e-05`, which YAML 1.1 reads as a string:
    the run must take it (and 1e-06) as the floats they are, and record them."""
    repo, _, _ = pipeline
    out = dvc(repo, python_env, "exp", "run", "-S", "train.epochs=1", "-S", "train.lr=5e-5",
              "-S", "train.weight_decay=1e-6").stdout
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"train", "evaluate", "package", "plot"}
    written = (repo / "params.yaml").read_text()
    assert re.search(r"lr: 5e-0?5\b", written), written  # the spelling that used to be refused
    trained = torch.load(repo / "models" / "model.pt", weights_only=True)["params"]["train"]
    assert (trained["lr"], trained["weight_decay"]) == (5e-5, 1e-6)
    show = dvc(repo, python_env, "exp", "show", "--csv").stdout
    assert "train.epochs" in show and "dice" in show
    header, *rows = [r.split(",") for r in show.strip().splitlines()]
    lr = [float(r[header.index("train.lr")]) for r in rows if r[header.index("train.lr")]]
    assert 5e-5 in lr
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    dvc(repo, python_env, "checkout", "-f")


def test_killed_training_resumes_to_the_same_result(pipeline, python_env):
    repo, _, _ = pipeline
    original = (repo / "params.yaml").read_text()
    # enough epochs that Ctrl-C after epoch 1 surely lands inside the training loop (tiny epochs
    # take milliseconds; with 3 the run could finish before the signal arrives)
    epochs = 40
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
