"""Which predictions to trust: the per-image confidence, risk–coverage and its area, the review
flag chosen on held-out images, and the same score and flag from `busiseg predict`."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import run_train, tiny_data, tiny_params, write_png
from PIL import Image

from busiseg.data.cache import load_cache
from busiseg.evaluation.evaluate import evaluate
from busiseg.evaluation.metrics import aurc, aurc_baselines, risk_coverage
from busiseg.inference.confidence import confidence, flag
from busiseg.inference.predict import predict_run
from busiseg.inference.predict_options import Outputs, SourcedSettings
from busiseg.inference.segment import MaskSettings


def test_aurc_rewards_a_score_that_ranks_the_failures_last():
    risk = np.array([0.0, 0.1, 0.9, 1.0])
    good, bad = np.array([4, 3, 2, 1.0]), np.array([1, 2, 3, 4.0])
    assert aurc(risk, good) == pytest.approx(np.mean([0, 0.05, 1.0 / 3, 0.5]))
    assert aurc(risk, bad) > aurc_baselines(risk)["aurc_random"] > aurc(risk, good)
    assert aurc_baselines(risk)["aurc_optimal"] == pytest.approx(aurc(risk, good))
    assert aurc_baselines(risk)["aurc_random"] == pytest.approx(0.5)
    coverage, selective = risk_coverage(risk, good)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0] and selective[-1] == pytest.approx(0.5)


def test_tied_scores_count_as_their_mean_whatever_order_they_are_listed_in():
    risk = np.array([0.0, 1.0, 0.5])
    tied = np.array([1.0, 1.0, 0.0])
    assert aurc(risk, tied) == pytest.approx(aurc(risk[[1, 0, 2]], tied[[1, 0, 2]]))
    assert aurc(risk, tied) == pytest.approx(np.mean([0.5, 0.5, 0.5]))


def test_a_crisp_map_is_trusted_more_than_a_hesitant_one():
    crisp = np.zeros((1, 16, 16))
    crisp[0, 4:10, 4:10] = 0.999
    hesitant = np.where(crisp > 0, 0.55, 0.3)
    empty = np.full((1, 16, 16), 0.01)
    sure = np.array([0.99])
    got = [confidence(m, sure, 0.5, "entropy")[0] for m in (crisp, hesitant, empty)]
    assert got[0] > 0.9 > 0.2 > got[1] and got[2] == 1.0
    assert confidence(crisp, np.array([0.5]), 0.5, "presence")[0] == 0.0  # a coin toss
    assert confidence(crisp, np.array([0.5]), 0.5, "combined")[0] == 0.0
    assert flag(np.array([0.2, 0.8]), 0.5).tolist() == [True, False]
    assert not flag(np.array([0.2, 0.8]), None).any()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("trust")
    run_train(tmp, tiny_params(epochs=3))
    return tmp


def test_review_fraction_zero_flags_nothing_and_adds_no_flag_keys(trained: Path):
    cache, split = tiny_data(trained)
    p = replace(tiny_params(), evaluate=replace(tiny_params().evaluate, bootstrap=50))
    result = evaluate(p, trained / "a" / "model.pt", cache, split)
    m = result["metrics"]
    assert {"aurc", "aurc_random", "aurc_optimal", "aurc_ci_low", "aurc_ci_high"} <= set(m)
    assert m["aurc_optimal"] <= m["aurc"] and m["review_threshold"] is None
    assert not {"dice_kept", "dice_flagged", "flagged_fraction"} & set(m)
    assert result["per_image"]["flagged"].eq(0).all()


def test_the_flag_evaluate_reports_is_the_one_predict_writes(trained: Path, tmp_path: Path):
    cache, split = tiny_data(trained)
    base = tiny_params()
    p = replace(base, evaluate=replace(base.evaluate, bootstrap=50, review_fraction=0.5,
                                       confidence="entropy"))
    result = evaluate(p, trained / "a" / "model.pt", cache, split)
    m, table = result["metrics"], result["per_image"]
    assert {"dice_kept", "dice_flagged", "dice_kept_gain", "dice_kept_ci_low",
            "flagged_fraction"} <= set(m)
    assert m["flagged_fraction"] == pytest.approx(table["flagged"].mean())
    assert table["flagged"].sum() > 0 and (table["confidence"] < m["review_threshold"]).eq(
        table["flagged"].astype(bool)).all()
    kept = table[table["flagged"] == 0]["dice"].mean()
    assert m["dice_kept"] == pytest.approx(kept, abs=1e-5)

    # predict on the same test images (already at the model's size): same score, same flag
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(m))
    c = load_cache(cache)
    paths = []
    for case in table["case_id"]:
        image = c.images[c.indices([case])[0], 0].numpy()
        paths.append(write_png(tmp_path / "in" / f"{case}.png", image))
    out = tmp_path / "out"
    predict_run(trained / "a" / "model.pt", paths, out,
                SourcedSettings.given(MaskSettings.from_eval(eval_json)),
                outputs=Outputs(probabilities=True))
    with open(out / "predictions.csv") as fh:
        rows = {Path(r["image"]).stem: r for r in csv.DictReader(fh)}
    for case, conf, flagged in zip(table["case_id"], table["confidence"], table["flagged"]):
        assert float(rows[case]["confidence"]) == pytest.approx(conf, abs=1e-5)
        assert int(rows[case]["flagged"]) == flagged
        assert float(rows[case]["review_threshold"]) == m["review_threshold"]
    prob = np.asarray(Image.open(out / f"{table['case_id'].iloc[0]}_prob.png"))
    assert prob.dtype == np.uint16 and prob.shape == (32, 32) and prob.max() > 0
