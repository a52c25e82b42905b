"""Each stage's file paths are written in its script and in dvc.yaml; this test ties the two
copies: every path a script names is one its stage declares, and every output a stage declares
is one its script writes. A renamed file then fails here, not as a stage DVC cannot find."""

from __future__ import annotations

import ast

import pytest
import yaml
from conftest import REPO

ROOTS = ("data/", "metrics/", "plots/", "models/", "dvclive/")


def literals(script) -> set[str]:
    """The workspace paths a script spells out; an f-string's {field} reads as DVC's ${key}."""
    found, tree = set(), ast.parse(script.read_text())
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if id(node) in parts:  # a piece of an f-string, read with it
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "${key}"
                           for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if text.startswith(ROOTS):
            found.add(text)
    return found


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


def declared(stage: dict, kinds=("deps", "outs", "metrics", "plots")) -> set[str]:
    out = set()
    for kind in kinds:
        for entry in stage.get(kind) or []:
            path = entry if isinstance(entry, str) else next(iter(entry))
            if path.startswith(ROOTS):
                out.add(path)
    return out


def covered(path: str, by: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in by)


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stage_script_and_dvc_yaml_name_the_same_files(name):
    stage = stages()[name]
    script = REPO / stage["cmd"].split()[1]
    named = literals(script)
    assert named, f"{script} names no workspace path"
    stray = sorted(p for p in named if not covered(p, declared(stage)))
    assert not stray, f"{script} uses {stray}, which dvc.yaml's {name} stage does not declare"
    unwritten = sorted(p for p in declared(stage, ("outs", "metrics", "plots"))
                       if not covered(p, named))
    assert not unwritten, f"dvc.yaml's {name} stage declares {unwritten}, which {script} " \
                          "never names"
