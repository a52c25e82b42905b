"""Bad input through the stage scripts as DVC runs them: one line per problem, no traceback, and no
stale output left that a later run could mistake for a good one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, make_case, write_png


def workdir(tmp_path: Path, raw: Path, **data) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "metrics").mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(raw_dir=str(raw), **data)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    # stale outputs of an earlier, good run
    for f in ("data/manifest.csv", "data/ingest_report.json", "metrics/ingest.json"):
        (work / f).write_text("stale")
    return work


def ingest_stage(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / "ingest.py")], cwd=work,
                          capture_output=True, text=True)


BREAKAGES = {
    "truncated png": lambda b: (b / "benign (2).png").write_bytes(
        (b / "benign (2).png").read_bytes()[:100]),
    "zero-byte file": lambda b: (b / "benign (2).png").write_bytes(b""),
    "text with .png name": lambda b: (b / "benign (2).png").write_text("not an image"),
    "image without mask": lambda b: (b / "benign (2)_mask.png").unlink(),
    "mask without image": lambda b: (b / "benign (2).png").unlink(),
    "mask of another size": lambda b: write_png(b / "benign (2)_mask.png",
                                                np.zeros((9, 9), np.uint8)),
    "nested folder": lambda b: (b / "extra").mkdir() or (b / "extra" / "x.png").write_bytes(b""),
    "unknown class folder": lambda b: make_case(b.parent, "cysts", 1),
    "non-image file": lambda b: (b / "notes.docx").write_bytes(b"PK"),
}


SKIP_CHECKED = {"truncated png", "mask without image", "unknown class folder"}
PROBLEMS = {"unknown class folder": 2}  # its image and its mask; every other breakage: one file


@pytest.mark.parametrize("what", sorted(BREAKAGES))
def test_ingest_stage_fails_cleanly_and_can_skip(small_busi: Path, tmp_path: Path, what: str):
    BREAKAGES[what](small_busi / "benign")
    work = workdir(tmp_path, small_busi)
    proc = ingest_stage(work)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == PROBLEMS.get(what, 1) + 1, proc.stderr  # a line per problem, a summary
    assert lines[0].startswith("error: ") and str(small_busi) in lines[0]
    assert all(str(small_busi) in line for line in lines[:-1])
    assert "data.on_problem: skip" in lines[-1]
    for f in ("data/manifest.csv", "data/ingest_report.json", "metrics/ingest.json"):
        assert not (work / f).exists(), f"stale {f} left behind"
    if what not in SKIP_CHECKED:  # skipping is unit-tested for every kind in test_ingest.py
        return
    # the same data with on_problem: skip runs and lists every problem in the report
    shutil.rmtree(work)
    work = workdir(tmp_path, small_busi, on_problem="skip")
    proc = ingest_stage(work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "data" / "ingest_report.json").read_text())
    metrics = json.loads((work / "metrics" / "ingest.json").read_text())
    assert metrics["n_problems"] == len(report["problems"]) == len(lines) - 1
    assert "skipped:" in proc.stdout


@pytest.mark.parametrize("raw, needle", [("does/not/exist", "does not exist"),
                                         ("empty", "is empty")])
def test_ingest_stage_bad_raw_dir(tmp_path: Path, raw: str, needle: str):
    (tmp_path / "empty").mkdir()
    work = workdir(tmp_path, tmp_path / raw)
    proc = ingest_stage(work)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert needle in proc.stderr and "data.raw_dir" in proc.stderr


def test_stage_with_bad_params_file(tmp_path: Path, small_busi: Path):
    work = workdir(tmp_path, small_busi)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["near_dup_hamming"] = "six"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = ingest_stage(work)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: params.yaml: data.near_dup_hamming must be int, "
                                   "got 'six' (str)")
