"""The expected-Dice presence rule (evaluate.presence_threshold: expected): keep a mask iff
p · q̂ > 1 − p, fitted on held-out data, applied the same way by evaluate (out of fold, fold by
fold), the packaged model, predict and ONNX."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import crafted_loaded, fold_data, tiny_params
from torch import nn

from busiseg.errors import BusisegError
from busiseg.evaluation import presence
from busiseg.evaluation.choose import HeldOut, choose, provenance
from busiseg.evaluation.evaluate import evaluate_folds
from busiseg.evaluation.metrics import specificity_at_sensitivity
from busiseg.inference.confidence import calibrate
from busiseg.inference.segment import Feed, MaskSettings
from busiseg.params import parse_params
from busiseg.research.decisions import _expected_keep


def test_the_rule_keeps_a_mask_exactly_where_its_expected_dice_beats_emptying_it():
    knots = ((0.2, 0.1), (0.8, 0.9))  # q̂ rises from 0.1 to 0.9, flat outside the knots
    s = MaskSettings(presence_temperature=1.0, presence_expected_dice=knots)
    scores = np.array([0.6, 0.6, 0.3, 0.95, 0.55, 0.55])
    trust = np.array([0.1, 0.8, 1.0, 0.05, 0.5, 0.6])
    q = np.array([0.1, 0.9, 0.9, 0.1, 0.5, 0.1 + 0.8 * 0.4 / 0.6])  # by hand, at each trust
    # p·q̂ against 1 − p: .06 < .4, .54 > .4, .27 < .7, .095 > .05, .275 < .45, .348 < .45
    assert s.keep(scores, trust).tolist() == [False, True, False, True, False, False]
    assert np.array_equal(s.keep(scores, trust), scores * q > 1 - scores)
    masks = s.masks(np.full((6, 4, 4), 0.9), scores, trust)
    assert masks.reshape(6, -1).all(axis=1).tolist() == s.keep(scores, trust).tolist()
    assert s.presence_rule == "expected" and MaskSettings().presence_rule == "off"
    assert MaskSettings(presence_threshold=0.3).presence_rule == "threshold"
    # the temperature calibrates p before the rule reads it
    cooled = replace(s, presence_temperature=0.25)
    kept = cooled.masks(np.full((6, 4, 4), 0.9), scores, trust).reshape(6, -1).all(axis=1)
    assert np.array_equal(kept, calibrate(scores, 0.25) * q > 1 - calibrate(scores, 0.25))
    assert not np.array_equal(kept, s.keep(scores, trust))  # the temperature moved a decision


def test_the_curve_is_isotonic_rounded_and_off_without_both_kinds_of_image():
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 8, 8), bool)
    truth[:30, 2:6, 2:6] = True  # 30 lesion images, 10 normal
    masks = truth.copy()
    masks[:15, 2:6, 4:8] = True  # the less confident half drew a worse mask
    trust = np.r_[rng.uniform(0, 0.5, 15), rng.uniform(0.5, 1, 15), rng.uniform(0, 1, 10)]
    knots = np.array(presence.fit_expected_dice(masks, truth, trust))
    assert np.all(np.diff(knots[:, 0]) > 0) and np.all(np.diff(knots[:, 1]) >= 0)
    assert knots[0, 1] == pytest.approx(2 * 16 / (16 + 24)) and knots[-1, 1] == 1.0
    assert np.array_equal(knots, np.round(knots, 6))
    assert presence.fit_expected_dice(masks[:30], truth[:30], trust[:30]) is None  # no normal
    assert presence.fit_expected_dice(masks[30:], truth[30:], trust[30:]) is None  # no lesion


def _held_out(n: int = 48, seed: int = 0) -> HeldOut:
    """Lesion images whose crisp masks are good and hesitant ones poor, normals with blobs of
    either kind, and lesion scores that overlap between the two classes."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 16, 16), bool)
    probs = np.full((n, 16, 16), 0.01)
    lesion = np.arange(n) % 3 != 0
    for i in range(n):
        crisp = rng.random() < 0.5
        if lesion[i]:
            truth[i, 4:12, 4:12] = True
        at = slice(4, 12) if crisp else slice(8, 16)  # a hesitant mask is also misplaced
        probs[i, at, 4:12] = 0.98 if crisp else 0.55
    scores = np.clip(np.where(lesion, 0.75, 0.4) + rng.normal(0, 0.15, n), 0.01, 0.99)
    return HeldOut({False: probs}, {False: scores}, truth)


def test_choose_fits_the_rule_on_held_out_data_and_it_beats_no_gate():
    held = _held_out()
    e = tiny_params().evaluate
    s = choose(replace(e, presence_threshold="expected"), held).settings
    assert s.presence_threshold is None and s.presence_expected_dice is not None
    off = choose(e, held).settings
    assert (s.threshold, s.presence_temperature) == (off.threshold, off.presence_temperature)
    prob, scores = held.probs[False], held.scores[False]
    kept = s.masks(prob, scores).reshape(len(prob), -1).any(axis=1)
    drawn = off.masks(prob, scores).reshape(len(prob), -1).any(axis=1)
    assert kept.sum() < drawn.sum()  # it empties some masks...
    assert presence.dice_all(s.masks(prob, scores), held.truth) > presence.dice_all(
        off.masks(prob, scores), held.truth)  # ...and Dice over all images gains
    sources = provenance(replace(e, presence_threshold="expected"), s, "out of fold, 48 images")
    assert "p·q̂ > 1 − p" in sources["presence_expected_dice"]
    assert "not used" in provenance(e, off, "x")["presence_expected_dice"]


def test_eval_json_the_package_and_an_export_carry_the_rule(tmp_path: Path):
    import json

    s = MaskSettings(presence_temperature=0.7, presence_expected_dice=((0.1, 0.2), (0.9, 0.8)))
    (tmp_path / "eval.json").write_text(json.dumps({
        "threshold": 0.5, "used_tta": 0, "used_largest_cc": 0, "used_fill_holes": 0,
        **{k: v for k, v in s.eval_keys().items() if not k.startswith("used_")}}))
    assert json.loads((tmp_path / "eval.json").read_text())["presence_rule"] == "expected"
    assert MaskSettings.from_eval(tmp_path / "eval.json") == s
    meta = json.loads(json.dumps(s.as_dict()))  # the ONNX metadata and the packaged settings
    assert MaskSettings.from_dict(meta) == s
    with pytest.raises(BusisegError, match="expected-Dice curve"):
        MaskSettings.from_dict({**meta, "presence_expected_dice": [[0.9, 0.2], [0.1, 0.8]]}
                                   ).checked("m.onnx")


def test_predict_refuses_expected_on_the_command_line_and_a_number_replaces_the_rule():
    from busiseg.cli import _overrides

    class Args:
        presence_threshold = "expected"

    with pytest.raises(BusisegError, match="fitted by the evaluate stage"):
        _overrides(Args())
    Args.presence_threshold = "0.4"
    assert _overrides(Args()) == {"presence_threshold": 0.4, "presence_expected_dice": None}
    assert parse_params({"evaluate": {"presence_threshold": "expected"}}
                        ).evaluate.presence_threshold == "expected"


class Dark(nn.Module):
    """A fold model that calls dark pixels lesion, each fold with its own bias, so lesion
    scores and outlines differ between images and folds."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.bias = bias
        self.config = {"arch": "crafted"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * (self.bias - x)


def test_out_of_fold_each_fold_is_decided_by_a_rule_fitted_on_the_other_folds(tmp_path: Path):
    """evaluate's out-of-fold decisions equal research.decisions' own re-fit (sklearn's isotonic
    fit, a separate implementation) on the gate-off table, fold by fold."""
    cache, split = fold_data(tmp_path, folds=3)
    members = [Dark(b) for b in (-0.1, 0.0, 0.1)]  # the noise of normals is drawn too
    p = tiny_params()
    p = replace(p, evaluate=replace(p.evaluate, bootstrap=0))
    off = evaluate_folds(p, crafted_loaded(members, cache, split))
    p = replace(p, evaluate=replace(p.evaluate, presence_threshold="expected"))
    expected = evaluate_folds(p, crafted_loaded(members, cache, split))
    table: pd.DataFrame = off["cv_per_image"]
    kept = np.zeros(len(table), bool)
    for k in table["fold"].unique():
        mine = (table["fold"] == k).to_numpy()
        kept[mine] = _expected_keep(table[~mine], table[mine])
    drawn = off["cv_pred"].reshape(len(table), -1).any(axis=1)
    assert drawn.any() and (drawn & ~kept).any()  # the rule empties some drawn masks here
    got = expected["cv_pred"].reshape(len(table), -1).any(axis=1)
    assert np.array_equal(got, drawn & kept)
    m = expected["metrics"]
    assert m["presence_rule"] == "expected" and m["presence_threshold"] is None
    assert len(m["presence_expected_dice"]["confidence"]) >= 1


def test_specificity_at_sensitivity_is_the_best_cut_that_finds_enough_lesions():
    labels = np.array([1] * 20 + [0] * 10, bool)
    scores = np.r_[np.linspace(0.5, 1.0, 20), np.linspace(0.0, 0.9, 10)]
    # 95 % of 20 lesions is 19: the cut is the 19th highest lesion score, 0.5263…; the
    # normals below it: 0.0, 0.1, …, 0.5 are 6 of 10
    assert specificity_at_sensitivity(labels, scores) == pytest.approx(0.6)
    brute = max((scores[~labels] < t).mean() for t in np.unique(scores)
                 if (scores[labels] >= t).mean() >= 0.95)
    assert specificity_at_sensitivity(labels, scores) == brute
    assert np.isnan(specificity_at_sensitivity(labels[:20], scores[:20]))


class Soft(nn.Module):
    """A blurred disc whose outline's entropy depends on the resolution it is drawn at."""

    config = {"arch": "crafted"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
        return (6 * (0.5 - (yy ** 2 + xx ** 2).sqrt())).expand(x.shape[0], 1, h, w).clone()


def test_predict_reads_the_confidence_at_the_training_size_as_evaluate_does():
    from busiseg.inference.confidence import confidence
    from busiseg.inference.segment import predict_probabilities, segment_with_score

    image = np.full((96, 128), 100, np.uint8)
    small = torch.from_numpy(np.full((1, 1, 32, 32), 100, np.uint8))
    prob, score = predict_probabilities(Soft(), small, Feed(0.5, 0.25, batch_size=1))
    plain = MaskSettings(threshold=0.5, presence_temperature=1.0)
    at_32 = float(plain.confidences(prob[:, 0].numpy(), score.numpy().astype(float))[0])
    full = segment_with_score(Soft(), image, 32, 0.5, 0.25, plain).probability
    at_full = float(confidence(full[None], calibrate(score.numpy(), 1.0), 0.5)[0])
    assert abs(at_32 - at_full) > 1e-3  # the resolutions disagree on this outline
    # q̂ 1 on the training size's side of a cut between the two, 0 on the other side
    cut = (at_32 + at_full) / 2
    q = (0.0, 1.0) if at_32 > at_full else (1.0, 0.0)
    s = replace(plain, presence_temperature=0.05,
                presence_expected_dice=((cut - 1e-4, q[0]), (cut + 1e-4, q[1])))
    scores = score.numpy().astype(float)
    p = calibrate(scores, s.presence_temperature)
    assert s.keep(p, np.array([at_32]))[0] and not s.keep(p, np.array([at_full]))[0]
    got = segment_with_score(Soft(), image, 32, 0.5, 0.25, s)
    assert got.mask.any() and got.confidence == pytest.approx(at_32)


def test_only_an_export_under_the_rule_is_format_3(tmp_path: Path):
    from busiseg.inference.onnx_model import export_onnx, load_onnx
    from busiseg.modeling.registry import build_model

    model = build_model("unet", base=4, depth=2).eval()
    blob = {"model": model.config, "digest": "0" * 64,
            "preprocess": {"size": 32, "input_mean": 0.5, "input_std": 0.25}}
    rule = MaskSettings(presence_temperature=0.8, presence_expected_dice=((0.1, 0.3), (0.7, 0.9)))
    for settings, version in ((MaskSettings(presence_threshold=0.4), 2), (rule, 3)):
        path = tmp_path / f"v{version}.onnx"
        assert export_onnx(model, blob, settings, path)["version"] == version
        meta = load_onnx(path)[1]
        assert MaskSettings.from_dict(meta) == settings
