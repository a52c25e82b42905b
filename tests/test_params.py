from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from busiseg.errors import BusisegError
from busiseg.params import Params, load_params, parse_params


def test_repo_params_are_valid_and_match_defaults():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params()
    for section, values in raw.items():  # params.yaml spells out every default, as it reads
        for key in values:
            assert getattr(getattr(defaults, section), key) == getattr(getattr(p, section), key), \
                f"{section}.{key}"


@pytest.mark.parametrize("value, parsed", [
    ("off", None), (False, None), (None, None), ("OFF", None), ("auto", "auto"), (0.3, 0.3),
    (1, 1.0), ("0.25", 0.25)])
def test_every_spelling_of_a_presence_threshold_has_one_parsed_form(value, parsed):
    assert parse_params({"evaluate": {"presence_threshold": value}}).evaluate \
        .presence_threshold == parsed


@pytest.mark.parametrize("raw, needle", [
    ({"evaluate": {"presence_threshold": 1.5}},
     "evaluate.presence_threshold is 1.5; choose off, auto, expected or a number in "
     "[0, 1]"),
    ({"evaluate": {"presence_threshold": "maybe"}},
     "evaluate.presence_threshold is 'maybe'; choose off, auto, expected or a number in "
     "[0, 1]"),
    ({"train": {"epoch": 3}}, "unknown key 'train.epoch'; did you mean 'train.epochs'"),
    ({"trian": {}}, "unknown section 'trian'; did you mean 'train'"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be int, got 'ten'"),
    ({"train": {"epochs": 2.5}}, "train.epochs must be int"),
    ({"train": {"lr": True}}, "train.lr must be float"),
    ({"train": {"epochs": 0}}, "train.epochs must be ≥ 1"),
    ({"split": {"train": 0.7}}, "must sum to 1"),
    ({"preprocess": {"size": 16}}, "preprocess.size must be in 32..2048"),
    ({"data": {"on_problem": "ignore"}}, "data.on_problem is 'ignore'; choose one of: error, skip"),
    ({"augment": {"hflip": 2}}, "augment.hflip is a probability"),
    ({"evaluate": {"threshold": 1.5}}, "evaluate.threshold must be in (0, 1)"),
    ({"train": {"empty_weight": -1}}, "train.empty_weight must be ≥ 0"),
    ({"train": {"empty_topk": 0}}, "train.empty_topk must be in (0, 1]"),
    ({"model": []}, "'model' must be a mapping"),
])
def test_bad_params_give_one_clear_line(raw, needle):
    with pytest.raises(BusisegError) as info:
        parse_params(raw)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_ints_are_accepted_for_floats_and_missing_keys_default():
    p = parse_params({"train": {"lr": 1}})
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    assert p.train.epochs == Params().train.epochs


def test_invalid_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(BusisegError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(BusisegError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("spelling, value", [
    ("1e-4", 1e-4), ("5e-05", 5e-5), ("1.0E-3", 1e-3), (".5", 0.5), ("1E-9", 1e-9),
    ("+2.5e+1", 25.0), ("3", 3.0), ("0.0005", 5e-4), ("1_000.5", 1000.5),
])
def test_every_yaml_spelling_of_a_float_is_read(tmp_path: Path, spelling: str, value: float):
    """DVC writes `-S train.lr=5e-5` as 5e-05, which YAML 1.1 (PyYAML) takes for a string."""
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  lr: {spelling}\n  weight_decay: {spelling}\n  epochs: 3\n")
    p = load_params(path)
    assert p.train.lr == value and isinstance(p.train.lr, float)
    assert p.train.weight_decay == value and p.train.epochs == 3


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lr: 1e-4x\n", "train.lr must be float, got '1e-4x' (str)"),
    ("train:\n  lr: '1e-4'\n", "train.lr must be float, got '1e-4' (str)"),  # quoted: a string
    ("train:\n  epochs: 1e3\n", "train.epochs must be int, got 1000.0 (float)"),
    ("train:\n  lr: -1e-4\n", "train.lr must be > 0"),
])
def test_values_that_are_really_wrong_still_stop_in_one_line(tmp_path: Path, text, needle):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(BusisegError) as info:
        load_params(path)
    assert str(info.value) == f"params.yaml: {needle}"
