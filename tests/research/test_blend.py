"""research.blend: masks from one cross-validation run and the lesion score from another (or
several seeds averaged), fold by fold, as one ordinary model file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_params

from busiseg.errors import BusisegError
from busiseg.inference.onnx_model import export_onnx, load_onnx
from busiseg.inference.segment import MaskSettings
from busiseg.modeling.archs import FoldEnsemble, split_output
from busiseg.modeling.model_file import load_model, model_kwargs, save_model
from busiseg.modeling.registry import build_model
from busiseg.research.blend import blend


def mean_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """The rule, written out apart from the production code: the members' probabilities
    averaged."""
    return sum(torch.sigmoid(t) for t in logits) / len(logits)


def cv_model(path: Path, seed: int, presence: bool, folds: int = 2, base: int = 4,
             split: dict | None = None, cpu_isa: str = "native") -> Path:
    p = tiny_params()
    p = replace(p, train=replace(p.train, cpu_isa=cpu_isa))
    torch.manual_seed(seed)
    kwargs = {**model_kwargs(p.model, presence=presence), "base": base}
    ensemble = FoldEnsemble([build_model(**kwargs) for _ in range(folds)])
    save_model(path, ensemble.state_dict(), kwargs, p, 32, members=folds, split=split)
    return path


def test_each_fold_takes_its_mask_from_one_run_and_its_score_from_the_other(tmp_path: Path):
    plain = cv_model(tmp_path / "plain.pt", 0, presence=False)
    headed = cv_model(tmp_path / "headed.pt", 1, presence=True)
    blend([plain], [headed], tmp_path / "blend.pt")
    model, blob = load_model(tmp_path / "blend.pt")
    a, b = load_model(plain)[0], load_model(headed)[0]
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        for k in range(2):
            mask, score = model.members[k](x)
            # the mean of one probability is that probability
            assert torch.allclose(torch.sigmoid(mask), mean_probability([a.members[k](x)]),
                                  atol=1e-6)
            assert torch.allclose(torch.sigmoid(score),
                                  mean_probability([split_output(b.members[k](x))[1]]),
                                  atol=1e-6)
        mask, score = split_output(model(x))  # the fold ensemble of blends
        assert torch.allclose(torch.sigmoid(mask), torch.sigmoid(split_output(a(x))[0]),
                              atol=1e-5)
        assert torch.allclose(torch.sigmoid(score), torch.sigmoid(split_output(b(x))[1]),
                              atol=1e-5)
    assert [r["role"] for r in blob["blend"]] == ["masks", "presence"]
    assert blob["model"]["arch"] == "blend" and blob["members"] == 2


def test_seeds_averaged_run_each_part_once_and_export_like_any_model(tmp_path: Path):
    seeds = [cv_model(tmp_path / f"s{s}.pt", s, presence=True) for s in (0, 1)]
    blob = blend(seeds, seeds, tmp_path / "seeds.pt")
    assert [r["role"] for r in blob["blend"]] == ["masks+presence"] * 2
    model = load_model(tmp_path / "seeds.pt")[0]
    runs = [load_model(s)[0] for s in seeds]
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        mask, score = model.members[0](x)
        outs = [split_output(r.members[0](x)) for r in runs]
        assert torch.allclose(torch.sigmoid(mask), mean_probability([o[0] for o in outs]),
                              atol=1e-6)
        assert torch.allclose(torch.sigmoid(score), mean_probability([o[1] for o in outs]),
                              atol=1e-6)
        # a plain average of logits is another rule: the test would see it
        assert not torch.allclose(torch.sigmoid(mask), torch.sigmoid(
            sum(o[0] for o in outs) / len(outs)), atol=1e-6)
    meta = export_onnx(model, blob, MaskSettings(), tmp_path / "seeds.onnx")
    forward, _ = load_onnx(tmp_path / "seeds.onnx")
    with torch.inference_mode():
        got, want = split_output(forward(x)), split_output(model(x))
    assert meta["outputs"] == ["logits", "presence"]
    assert torch.allclose(torch.sigmoid(got[0]), torch.sigmoid(want[0]), atol=1e-4)


def test_runs_that_do_not_fit_together_are_refused_in_one_line(tmp_path: Path):
    two = cv_model(tmp_path / "two.pt", 0, presence=False)
    three = cv_model(tmp_path / "three.pt", 0, presence=True, folds=3)
    with pytest.raises(BusisegError, match="3 fold models against .*two.pt's 2"):
        blend([two], [three], tmp_path / "x.pt")
    p = tiny_params()
    single = tmp_path / "single.pt"
    save_model(single, build_model(**model_kwargs(p.model)).state_dict(), model_kwargs(p.model),
               p, 32)
    with pytest.raises(BusisegError, match="not a cross-validation model"):
        blend([single], [two], tmp_path / "x.pt")
    one = cv_model(tmp_path / "one.pt", 0, presence=False,
                   split={"seed": 0, "folds": 2, "sha256": "a" * 64})
    other = cv_model(tmp_path / "other.pt", 1, presence=True,
                     split={"seed": 1, "folds": 2, "sha256": "b" * 64})
    with pytest.raises(BusisegError, match=r"other.pt: trained on another split \(seed 1, "
                       r"split.csv bbbbbbbbbbbb\) than .*one.pt \(seed 0, split.csv aaaaaaaaaaaa\)"
                       r"; blend runs of one split$"):
        blend([one], [other], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    same = cv_model(tmp_path / "same.pt", 1, presence=True,
                    split={"seed": 0, "folds": 2, "sha256": "a" * 64})
    assert blend([one], [same], tmp_path / "ok.pt")["split"]["sha256"] == "a" * 64
    # every part is checked, not only against the first: here the first recorded none
    with pytest.raises(BusisegError, match=r"other.pt: trained on another split .* than "
                       r".*one.pt"):
        blend([two], [one, other], tmp_path / "x.pt")
    assert blend([two], [one], tmp_path / "mixed.pt")["split"] == {}  # one part unchecked
    # parts pinned to different kernels compute in one process with one set, named
    pinned = cv_model(tmp_path / "pinned.pt", 2, presence=True, cpu_isa="avx2")
    with pytest.raises(BusisegError, match=r"pinned.pt: trained with train.cpu_isa=avx2, "
                       r".*two.pt with native; .*give --cpu-isa"):
        blend([two], [pinned], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    made = blend([two], [pinned], tmp_path / "native.pt", cpu_isa="native")
    assert made["params"]["train"]["cpu_isa"] == "native"


def test_evaluated_out_of_fold_it_has_the_mask_run_s_dice_and_the_score_run_s_scores(
        tmp_path: Path):
    import yaml
    from conftest import fold_data

    from busiseg.evaluation.evaluate import evaluate
    from busiseg.params import load_params
    from busiseg.research.blend import evaluate_blend

    cache, split = fold_data(tmp_path, folds=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"preprocess": {"size": 32}, "model": {"base": 4, "depth": 2},
         "split": {"folds": 2}, "evaluate": {"bootstrap": 0}}))
    plain = cv_model(tmp_path / "plain.pt", 0, presence=False)
    headed = cv_model(tmp_path / "headed.pt", 1, presence=True)
    blend([plain], [headed], tmp_path / "blend.pt")
    m = evaluate_blend(tmp_path / "blend.pt", tmp_path / "result.json", "off",
                       tmp_path / "params.yaml", tmp_path)
    assert m["presence_rule"] == "off" and (tmp_path / "result.json").is_file()
    table = pd.read_csv(tmp_path / "result.cv_per_image.csv")
    assert len(table) == (pd.read_csv(split)["split"] == "cv").sum()
    p = tiny_params()
    results = {f: evaluate(p, f, cache, split) for f in (plain, headed)}
    runs = {f: r["cv_per_image"] for f, r in results.items()}
    blended = evaluate(load_params(tmp_path / "params.yaml"), tmp_path / "blend.pt", cache, split)
    got = blended["cv_per_image"]
    # the masks come from the plain run's weights: the very same masks, pixel for pixel
    assert np.array_equal(blended["cv_pred"], results[plain]["cv_pred"])
    assert np.array_equal(got["dice"].to_numpy(), runs[plain]["dice"].to_numpy())
    assert got["image_score"].to_numpy() == pytest.approx(
        runs[headed]["image_score"].to_numpy(), abs=1e-5)
    assert m["cv_dice"] == pytest.approx(got["dice"][got["class"] != "normal"].mean(), abs=1e-6)
    assert evaluate_blend(tmp_path / "blend.pt", tmp_path / "e.json", "expected",
                          tmp_path / "params.yaml", tmp_path)["presence_rule"] == "expected"
