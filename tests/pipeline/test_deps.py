"""dvc.yaml's code deps are each stage's import closure, and the package's folders import one
way: edits re-run exactly the stages that run the edited file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

from busiseg.pipeline import deps

SRC = REPO / "src" / "busiseg"
# lowest first: a folder may import the ones before it, never one after it
LAYERS = ("runtime", "pipeline", "data", "modeling", "inference", "evaluation", "training",
          "research")


def copy_code(dest: Path) -> Path:
    for part in ("stages", "src"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    return dest


def test_every_stage_lists_exactly_the_code_it_runs():
    assert deps.check(REPO) == []
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    train = deps.listed_code(spec["stages"]["train"])
    for module in ("data/cache.py", "evaluation/metrics.py", "training/losses.py"):
        assert f"src/busiseg/{module}" in train
    evaluate = deps.listed_code(spec["stages"]["evaluate"])
    assert "src/busiseg/modeling/registry.py" in evaluate  # models rebuilt from the model file
    assert "src/busiseg/training/train.py" not in evaluate


def test_a_missing_or_surplus_dep_is_named_with_its_stage_and_the_fix(tmp_path: Path):
    repo = copy_code(tmp_path)
    text = (repo / "dvc.yaml").read_text()
    (repo / "dvc.yaml").write_text(text.replace("      - src/busiseg/evaluation/metrics.py\n",
                                                "", 1))
    problems = deps.check(repo)
    assert problems == ["dvc.yaml: stage train runs src/busiseg/evaluation/metrics.py but does "
                        "not list it in its deps; run `uv run python -m busiseg.pipeline.deps "
                        "--write`"]
    assert deps.write(repo) == ["train"]
    assert deps.check(repo) == []
    rewritten = (repo / "dvc.yaml").read_text()
    assert "# one stage per external dataset" in rewritten  # comments survive the rewrite
    assert yaml.safe_load(rewritten) == yaml.safe_load(text)


def test_an_import_inside_a_function_counts(tmp_path: Path):
    repo = copy_code(tmp_path)
    split = repo / "src" / "busiseg" / "data" / "split.py"
    split.write_text(split.read_text() + "\n\ndef later():\n"
                     "    from busiseg.modeling import blocks  # noqa: F401\n")
    problems = deps.check(repo)
    assert any("stage split runs src/busiseg/modeling/blocks.py" in p for p in problems)
    assert any("stage split runs src/busiseg/modeling/__init__.py" in p for p in problems)
    assert not any("stage ingest" in p for p in problems)


def test_the_deps_command_fails_when_dvc_yaml_drifts(tmp_path: Path):
    repo = copy_code(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "busiseg.pipeline.deps"], cwd=repo,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace(
        "      - src/busiseg/data/split.py\n", ""))
    bad = subprocess.run([sys.executable, "-m", "busiseg.pipeline.deps"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "stage split runs src/busiseg/data/split.py" in bad.stdout


def folder_of(path: Path) -> str | None:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_folders_import_one_way():
    """No folder imports a folder above it (LAYERS), so none imports one that imports it;
    inference in particular needs the model alone, never training or evaluation code."""
    folders = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())
    assert sorted(LAYERS) == folders, "a new folder needs its place in LAYERS"
    wrong = []
    for path in SRC.rglob("*.py"):
        here = folder_of(path)
        for name in deps.imported_modules(path):
            target = deps.module_path(name)
            there = folder_of(target) if target else None
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                wrong.append(f"{path.relative_to(SRC)} imports {name}")
            if here is None and there and path.name not in ("cli.py",):
                wrong.append(f"{path.relative_to(SRC)} (top level) imports {name}")
    assert wrong == []


def test_importing_the_package_changes_no_global_state():
    """Importing any module sets nothing process-wide (PIL's limits, matplotlib's backend,
    torch's threads): a library that predict or a notebook imports must not."""
    probe = """
import importlib, pkgutil, sys
from PIL import Image
import torch
before = (Image.MAX_IMAGE_PIXELS, torch.get_num_threads())
import busiseg
for m in pkgutil.walk_packages(busiseg.__path__, "busiseg."):
    if not m.name.startswith("busiseg.research"):
        importlib.import_module(m.name)
after = (Image.MAX_IMAGE_PIXELS, torch.get_num_threads())
print(before == after, "matplotlib.pyplot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]
