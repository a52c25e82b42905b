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
    for section, values in raw.items():  # params.yaml spells out every default
        for key, value in values.items():
            assert getattr(getattr(defaults, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("raw, needle", [
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
