"""Every command the project prints for a user runs as printed: the demo layouts' and the
presets' `dvc exp run` lines go through DVC's override grammar (Hydra's), which refuses `{`, `(`
and `\\` unquoted, and then through ingest, preprocess and split."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from conftest import TINY_PARAMS, copy_repo, dvc, load_metrics

from busiseg.data.demo_layouts import PARAMS

pytestmark = pytest.mark.slow  # dvc on a copy of the repo


def printed(cmd: list[str], cwd, env) -> list[str]:
    """The `uv run dvc exp run …` line a command prints, as the argv `uv run` would execute."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    line = next(ln.strip() for ln in out.stdout.splitlines() if "dvc exp run" in ln)
    argv = shlex.split(line)
    assert argv[:5] == ["uv", "run", "dvc", "exp", "run"], line
    return argv[2:]


def run_to_split(repo, env, argv: list[str]):
    """The printed command up to the split stage (`dvc exp run split …`): what a quoting or
    split-size mistake stops."""
    return dvc(repo, env, *argv[1:3], "split", *argv[3:], check=False)


def test_every_demo_layouts_printed_command_runs(tmp_path, python_env):
    repo = copy_repo(tmp_path / "repo", TINY_PARAMS)
    for layout in PARAMS:
        # each as a new user runs it: on the committed params, not the last experiment's
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, check=True)
        argv = printed([sys.executable, "-m", "busiseg.data.demo_layouts", layout,
                        f"demos/{layout}"], repo, python_env)
        done = run_to_split(repo, python_env, argv)
        assert done.returncode == 0, f"{layout}: {done.stderr[-800:]}"
        split = load_metrics(repo)["split.json"]
        assert split["n_test"] > 0 and split["n_val"] > 0, layout


def test_a_preset_whose_values_need_quoting_runs_as_shown(tmp_path, python_env):
    """hc18-lite0 sets data.image_name '{id}HC' and data.patient_id '^(\\d+)_'."""
    repo = copy_repo(tmp_path / "repo", TINY_PARAMS)
    subprocess.run([sys.executable, "-m", "busiseg.data.demo_layouts", "flat", "hc"], cwd=repo,
                   env=python_env, check=True, capture_output=True)
    # the flat demo is named as HC18 is (001_HC.png, 001_HC_Annotation.png): ids 001_, 002_, …
    argv = printed([sys.executable, "-m", "busiseg.research.protocol", "show", "hc18-lite0",
                    "--seeds", "0", "--raw-dir", "hc"], repo, python_env)
    assert "data.image_name='{id}HC'" in argv and r"data.patient_id='^(\d+)_'" in argv
    done = run_to_split(repo, python_env, argv)
    assert done.returncode == 0, done.stderr[-800:]
    assert load_metrics(repo)["ingest.json"]["n_images"] == 26
