"""Experiments travel between machines through a git remote and a DVC remote: machine A runs
and pushes one, machine B pulls it, sees it in `dvc exp show`, restores its model and predicts.
A bare git repository and a local-folder DVC remote stand in for GitHub and S3."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from conftest import TINY_PARAMS, built_pipeline, copy_built, copy_repo, dvc, run, write_png

pytestmark = pytest.mark.slow  # each test runs dvc on a copy of the repo

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]


def test_an_experiment_pushed_from_one_clone_is_pulled_and_used_in_another(
        tmp_path, tmp_path_factory, python_env):
    origin, storage = tmp_path / "origin.git", tmp_path / "dvc-storage"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, python_env)
    a = copy_built(built_pipeline(tmp_path_factory, python_env), tmp_path / "a")
    dvc(a, python_env, "remote", "add", "-d", "storage", str(storage))
    run(GIT + ["commit", "-qam", "remote"], a, python_env)
    run(GIT + ["remote", "add", "origin", str(origin)], a, python_env)
    run(GIT + ["push", "-q", "origin", "HEAD:main"], a, python_env)

    dvc(a, python_env, "exp", "run", "-n", "tiny", "-S", "train.epochs=2")
    one_line_error(dvc(a, python_env, "exp", "push", "nowhere", "tiny", check=False))
    dvc(a, python_env, "exp", "push", "origin", "tiny")  # git refs, and the outputs to storage
    trained = json.loads((a / "metrics" / "eval.json").read_text())

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
    out = run(predict, b, python_env)
    assert (tmp_path / "pred" / "new_mask.png").is_file(), out.stdout



def test_a_missing_or_unreachable_remote_fails_in_one_line(tmp_path, python_env):
    repo = copy_repo(tmp_path / "r", TINY_PARAMS)
    dvc(repo, python_env, "repro", "split")  # something to push
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
