"""Presets: named sets of parameter overrides, so one documented command reproduces a result row.

A preset is nothing but `-S key=value` flags for `dvc exp run`; it is checked against the real
parameter schema so a typo fails here, not forty minutes into a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from busiseg.errors import BusisegError
from busiseg.params import override_value, parse_params, read_yaml

PRESETS = Path(__file__).with_name("presets.yaml")
# what changes a run's weights besides its recipe: a recorded preset pins both to what its record
# ran with (the fold placement sets the threads when they are not pinned; docs/reproducibility.md)
PINS = ("train.threads", "train.cpu_isa", "classify.threads", "classify.member_workers",
        "classify.cpu_isa")


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    overrides: dict[str, object]


def apply_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A copy of a params mapping with dotted `section.key` overrides applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise BusisegError(f"'{dotted}' is not a parameter; use section.key, e.g. train.epochs")
        out.setdefault(section, {})[key] = value
    return out


def load_presets(path: str | Path | None = None,
                 params_path: str | Path = "params.yaml") -> dict[str, Preset]:
    path = Path(path or PRESETS)
    if not path.is_file():
        raise BusisegError(f"{path}: presets file not found")
    raw = read_yaml(path.read_text()) or {}
    base = read_yaml(Path(params_path).read_text()) or {}
    presets = {}
    for name, entry in raw.items():
        if str(name).startswith("."):  # a template that presets merge (YAML anchors), not a preset
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("set"), dict):
            raise BusisegError(f"{path}: preset '{name}' needs a 'set:' mapping of overrides")
        overrides = dict(entry["set"])
        try:
            parse_params(apply_overrides(base, overrides))
        except BusisegError as exc:
            raise BusisegError(f"{path}: preset '{name}': {exc}") from None
        presets[name] = Preset(name, str(entry.get("about", "")), overrides)
    return presets


def exp_command(preset: Preset, seed: int, raw_dir: str,
                train_seed: int | None = None) -> list[str]:
    """The exact `dvc exp run` command for one seed of a preset. The split and the training share
    the seed unless `train_seed` is given: then one split is trained from several initialisations,
    which measures training noise apart from the split."""
    t = seed if train_seed is None else train_seed
    overrides = {"data.raw_dir": raw_dir, **preset.overrides, "split.seed": seed, "train.seed": t}
    name = f"{preset.name}-s{seed}" + ("" if train_seed is None else f"-t{train_seed}")
    cmd = ["dvc", "exp", "run", "-n", name]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={override_value(value)}"]
    return cmd
