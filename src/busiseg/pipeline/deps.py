"""Which project files a stage's code is: the import closure of its script within busiseg.

`dvc repro` re-runs a stage when one of its deps changes, so a module that a stage runs but does
not list would leave its results stale after an edit, silently. The code deps in dvc.yaml are
therefore derived from the imports, never written by hand: `check` names any stage whose deps
differ from its closure (a test runs it), and

    uv run python -m busiseg.pipeline.deps --write

rewrites them. The closure is static: every `import busiseg…` anywhere in a file, functions
included, plus the package `__init__.py` files that importing runs. Training checkpoints hash the
same closure (busiseg.training.checkpoint), so a resumed run never continues another code's
weights.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "busiseg"
SRC = Path(__file__).resolve().parents[1]  # src/busiseg
CODE_PREFIXES = ("stages/", "src/busiseg/")  # the deps in dvc.yaml that are code


def module_path(name: str, src: Path = SRC) -> Path | None:
    """busiseg.a.b -> src/busiseg/a/b.py or src/busiseg/a/b/__init__.py (None: not a module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = src.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, src: Path = SRC) -> set[str]:
    """The busiseg modules a file imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, src) if path.is_relative_to(src) else ""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package
                package = here.split(".") if is_package else here.split(".")[:-1]
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] == PACKAGE}


def closure(paths: Iterable[Path], src: Path = SRC) -> list[Path]:
    """The files `paths` run when imported or executed: themselves, every busiseg module they
    import, transitively, and the package __init__ files on the way."""
    seen: set[Path] = set()
    todo = [Path(p) for p in paths]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path, src):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                found = module_path(".".join(parts[:i]), src)
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(seen)


@cache
def module_closure(name: str) -> tuple[Path, ...]:
    """The files importing busiseg module `name` runs (from this installation's sources)."""
    path = module_path(name)
    if path is None:
        raise ValueError(f"{name} is not a busiseg module")
    return tuple(closure([path]))


def stage_scripts(dvc_yaml: dict) -> dict[str, str]:
    """Stage name -> the script its cmd runs (`python stages/X.py ...`)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        words = str(body["cmd"]).split()
        scripts = [w for w in words if w.endswith(".py")]
        if len(scripts) != 1:
            raise ValueError(f"dvc.yaml: stage {name}'s cmd runs no single .py script")
        out[name] = scripts[0]
    return out


def code_deps(repo: Path, script: str) -> list[str]:
    """What a stage's deps must list as code: its script's closure, relative to the repo."""
    src = repo / "src" / PACKAGE
    library = [p.relative_to(repo).as_posix() for p in closure([repo / script], src)]
    return [script, *(p for p in library if p != script)]


def listed_code(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    return [d for d in body.get("deps", []) if isinstance(d, str) and d.startswith(CODE_PREFIXES)]


def check(repo: Path) -> list[str]:
    """One line per stage whose code deps differ from its import closure; [] when all agree."""
    import yaml

    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    problems = []
    for name, script in stage_scripts(spec).items():
        want = set(code_deps(repo, script))
        have = set(listed_code(spec["stages"][name]))
        for path in sorted(want - have):
            problems.append(f"dvc.yaml: stage {name} runs {path} but does not list it in its "
                            "deps; run `uv run python -m busiseg.pipeline.deps --write`")
        for path in sorted(have - want):
            problems.append(f"dvc.yaml: stage {name} lists {path}, which its code does not "
                            "import; run `uv run python -m busiseg.pipeline.deps --write`")
    return problems


def write(repo: Path) -> list[str]:
    """Rewrite every stage's code deps as its closure (other deps and comments kept); returns
    the stages changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = repo / "dvc.yaml"
    spec = yaml.load(path.read_text())
    changed = []
    for name, script in stage_scripts(spec).items():
        body = spec["stages"][name].get("do", spec["stages"][name])
        deps = body["deps"]
        want = code_deps(repo, script)
        if listed_code(spec["stages"][name]) == want:
            continue
        others = [d for d in deps if not (isinstance(d, str) and d.startswith(CODE_PREFIXES))]
        deps.clear()
        deps.extend(want + others)
        changed.append(name)
    if changed:
        with open(path, "w") as fh:
            yaml.dump(spec, fh)
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repo = Path.cwd()
    if args == ["--write"]:
        changed = write(repo)
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed
              else "dvc.yaml: every stage's code deps already equal its import closure")
        return 0
    if args:
        print("usage: python -m busiseg.pipeline.deps [--write]", file=sys.stderr)
        return 2
    problems = check(repo)
    print("\n".join(problems) or "dvc.yaml: every stage's code deps equal its import closure")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
