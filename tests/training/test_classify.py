"""The image classifier beside the mask model: its members train fold by fold (× seeds), out of
fold each image is scored by the members of its own fold alone, its p_lesion becomes the lesion
score evaluate gates with, and its p_malignant is scored among benign and malignant lesions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Box, crafted_loaded, fold_data
from torch import nn

from busiseg.evaluation.evaluate import evaluate_folds
from busiseg.evaluation.figures import FigureSettings
from busiseg.evaluation.malignancy import malignancy_figures, youden_threshold
from busiseg.inference.classify import Classifier
from busiseg.inference.segment import Feed
from busiseg.modeling.classifier import build_members, read_classifier
from busiseg.params import parse_params
from busiseg.training.classify import classify_loss, labels, train_classifier


def test_members_train_per_fold_and_seed_and_read_back(tmp_path):
    cache, split = fold_data(tmp_path, folds=2)
    p = parse_params({"split": {"folds": 2}, "preprocess": {"size": 32},
                      "classify": {"kind": "encoder", "seeds": 2, "epochs": 1, "batch_size": 6,
                                   "threads": 1}})
    summary = train_classifier(p, cache, split, tmp_path / "classifier.pt")
    blob = read_classifier(tmp_path / "classifier.pt")
    assert summary["members"] == 4 and summary["malignancy_trained"]
    assert [(m["fold"], m["seed"]) for m in blob["members"]] == [
        (k, s) for k in range(2) for s in (0, 1)]
    assert blob["size"] == 32 and blob["split"]["folds"] == 2 and blob["malignancy"]
    members = build_members(blob)
    x = torch.zeros(2, 1, 32, 32)
    assert members[0](x).shape == (2, 2)
    # two seeds of one fold are two models
    assert not torch.equal(members[0].head.weight, members[1].head.weight)


def test_members_side_by_side_stop_at_the_first_failure_and_a_killed_one_is_one_line(tmp_path):
    """Two members at once: when one fails, the other (blocked reading a split that never comes,
    a named pipe) is stopped, and the failure is what is raised; when a member's process is
    killed, the run ends in one line and the other is stopped too. A guard opens the pipe
    after two minutes, so a member left running would show, not hang the suite."""
    import os
    import signal
    import threading

    import psutil

    from busiseg.errors import BusisegError
    from busiseg.training.classify import Job, side_by_side

    cache, _ = fold_data(tmp_path, folds=2)
    p = parse_params({"split": {"folds": 2}, "preprocess": {"size": 32},
                      "classify": {"kind": "encoder", "epochs": 1, "threads": 1}})
    pipe = tmp_path / "never.csv"
    os.mkfifo(pipe)
    blocked = Job(p, cache, pipe, 0, 0, 1)
    failing = Job(p, tmp_path / "missing.npz", pipe, 1, 0, 1)
    guard_fired = []

    def guard() -> None:  # a member left blocked would keep the pool waiting for ever
        guard_fired.append(True)
        with open(pipe, "w") as fh:
            fh.write("case_id,split,fold,class\n")

    def members() -> list:
        return [c for c in psutil.Process().children()
                if "spawn_main" in " ".join(c.cmdline())]

    def kill_one_blocked() -> None:
        while len(members()) < 2:
            threading.Event().wait(0.2)
        threading.Event().wait(5)  # both started and blocked on the pipe
        members()[0].send_signal(signal.SIGKILL)

    for jobs, setup, message in (([blocked, failing], None, "missing.npz"),
                                 ([blocked, blocked], kill_one_blocked, "was killed")):
        timer = threading.Timer(120, guard)
        timer.start()
        if setup is not None:
            threading.Thread(target=setup, daemon=True).start()
        try:
            with pytest.raises(BusisegError, match=message) as caught:
                side_by_side(jobs, 2)
        finally:
            timer.cancel()
        assert not guard_fired, "a member was left running"
        assert "\n" not in str(caught.value)
        assert not members()


def test_segmentation_kind_learns_masks_and_side_by_side_members_equal_members_in_turn(
        tmp_path):
    """Kind segmentation answers with the same two logits (its masks only teach it), and a
    member trained in a process of its own computes exactly what it computes in turn with the
    same one thread: classify.member_workers changes the time, never the weights."""
    cache, split = fold_data(tmp_path, folds=2)
    base = {"kind": "segmentation", "epochs": 1, "batch_size": 6, "threads": 1,
            "decoder_channels": [16, 8, 8, 8, 8]}
    runs = {}
    for workers in (1, 2):
        p = parse_params({"split": {"folds": 2}, "preprocess": {"size": 32},
                          "classify": {**base, "member_workers": workers}})
        summary = train_classifier(p, cache, split, tmp_path / f"c{workers}.pt")
        assert summary["member_workers"] == workers and summary["members"] == 2
        runs[workers] = read_classifier(tmp_path / f"c{workers}.pt")
    blob = runs[2]
    assert blob["kind"] == "segmentation" and blob["config"]["decoder_channels"] == [16, 8, 8, 8, 8]
    for a, b in zip(runs[1]["members"], runs[2]["members"]):
        assert a["loss"] == b["loss"]
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    member = build_members(blob)[0]
    x = torch.rand(2, 1, 32, 32)
    logits, masks = member.with_masks(x)
    assert member(x).shape == (2, 2) and masks.shape == (2, 1, 32, 32)
    assert torch.equal(member(x), logits)  # the logits skip the decoder, and equal its pass
    # the mask term is in the loss: a member trained without it learns other weights
    p = parse_params({"split": {"folds": 2}, "preprocess": {"size": 32},
                      "classify": {**base, "kind": "encoder", "member_workers": 1}})
    train_classifier(p, cache, split, tmp_path / "enc.pt")
    enc = read_classifier(tmp_path / "enc.pt")
    assert enc["kind"] == "encoder" and enc["members"][0]["loss"] != blob["members"][0]["loss"]


def test_classify_params_refuse_bad_widths_and_workers():
    from busiseg.errors import BusisegError

    with pytest.raises(BusisegError, match="classify.decoder_channels"):
        parse_params({"classify": {"decoder_channels": [8, 8]}})
    with pytest.raises(BusisegError, match="classify.member_workers"):
        parse_params({"classify": {"member_workers": -1}})


def test_the_loss_learns_malignancy_only_where_it_is_known():
    masks = torch.zeros(4, 1, 4, 4)
    masks[:3, 0, 1, 1] = 1
    target = labels(["malignant", "benign", "lesion", "normal"], masks)
    assert target.lesion.tolist() == [1, 1, 1, 0]
    assert target.malignant[:2].tolist() == [1, 0] and torch.isnan(target.malignant[2:]).all()
    logits = torch.tensor([[2.0, 50.0], [2.0, -50.0], [2.0, 99.0], [-2.0, -99.0]])
    presence_only = classify_loss(logits, target.lesion, target.malignant, 0.0)
    assert classify_loss(logits, target.lesion, target.malignant, 1.0) == pytest.approx(
        presence_only.item(), abs=1e-6)  # the known two are right; the others are not read
    wrong = logits.clone()
    wrong[0, 1] = -50.0
    assert classify_loss(wrong, target.lesion, target.malignant, 1.0) > presence_only + 10


class Constant(nn.Module):
    """A crafted classifier member: the same two logits for every image."""

    def __init__(self, lesion: float, malignant: float) -> None:
        super().__init__()
        self.logits = torch.tensor([lesion, malignant])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), 2)


def test_out_of_fold_each_image_meets_its_own_folds_classifier_and_test_all(tmp_path):
    cache, split = fold_data(tmp_path)
    p = parse_params({"split": {"folds": 3}, "evaluate": {"bootstrap": 50,
                                                          "presence_threshold": "auto"}})
    m = crafted_loaded([Box(k + 8, slice(4, 20)) for k in range(3)], cache, split)
    logits = [(-1.0, -2.0), (0.0, 0.5), (1.0, 2.0)]  # member k's lesion logit says its fold
    m.classifier = Classifier([Constant(*v) for v in logits], [0, 1, 2], Feed(0.5, 0.25), 32,
                              True)
    result = evaluate_folds(p, m)
    cv = result["cv_per_image"]
    want = 1 / (1 + np.exp(-np.array([logits[f][0] for f in cv["fold"]])))
    assert np.allclose(cv["p_lesion"], want, atol=1e-6)
    assert np.allclose(cv["image_score"], want, atol=1e-6)  # the score the gate reads
    test_p = 1 / (1 + np.exp(-np.mean([v[0] for v in logits])))  # every member's mean logit
    assert np.allclose(result["per_image"]["p_lesion"], test_p, atol=1e-6)
    metrics = result["metrics"]
    for key in ("cv_malignant_auroc", "cv_malignant_auroc_ci_low", "cv_malignant_sensitivity",
                "cv_malignant_specificity_ci_high", "cv_malignant_ece", "malignant_threshold",
                "malignant_temperature"):
        assert key in metrics, key
    assert set(result["test_rows"]["class"]) == {"benign", "normal"}  # no malignant on test:
    assert "malignant_auroc" not in metrics  # no test figure rather than a made-up one
    # the folds' constant p_malignant ranks no image within a fold: chance at best
    assert metrics["cv_malignant_auroc"] <= 0.75


def test_malignancy_figures_on_known_probabilities():
    prob = np.array([0.1, 0.2, 0.8, 0.9, 0.6, 0.3])
    classes = ["benign", "benign", "malignant", "malignant", "normal", "lesion"]
    known = np.array([0.1, 0.2, 0.8, 0.9])
    assert youden_threshold(known, np.array([0, 0, 1, 1])) == pytest.approx(0.5)
    out = malignancy_figures(FigureSettings(100), prob, classes, 0.5)
    assert out["malignant_auroc"] == 1.0 and out["malignant_sensitivity"] == 1.0
    assert out["malignant_specificity"] == 1.0 and (out["n_malignant"], out["n_benign"]) == (2, 2)
    assert out["malignant_ece"] == pytest.approx(0.15)  # |0.15-0|, |0.85-1| over two bins
    # the cut misses one malignant
    shifted = malignancy_figures(FigureSettings(0), prob, classes, 0.85)
    assert shifted["malignant_sensitivity"] == 0.5 and shifted["malignant_auroc"] == 1.0
    assert malignancy_figures(FigureSettings(0), prob, ["normal"] * 6, 0.5) == {}


def test_p_malignant_is_calibrated_where_its_cut_is_chosen_and_ranks_as_before():
    """Over-confident p_malignant (right 80 % of the time at 0.99): each fold is calibrated by
    the temperature the other folds chose, which brings its ECE down and leaves the ranking
    (AUROC) and the decisions (sensitivity, specificity) as they were."""
    from busiseg.evaluation.malignancy import malignancy_figures, malignancy_keys

    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 400)
    right = rng.random(400) < 0.8
    said = np.where(right, label, 1 - label)
    prob = np.where(said == 1, 0.99, 0.01) + rng.uniform(-5e-4, 5e-4, 400)
    classes = ["malignant" if v else "benign" for v in label]
    fold = np.arange(400) % 4
    keys, held, test = malignancy_keys(FigureSettings(50), prob, classes, fold, prob[:40],
                                       classes[:40])
    raw_cuts = np.zeros(400)  # Youden's cut on the other folds' raw values, fold by fold
    for k in range(4):
        raw_cuts[fold == k] = youden_threshold(prob[fold != k], label[fold != k])
    raw = malignancy_figures(FigureSettings(50), prob, classes, raw_cuts, "cv_")
    assert keys["malignant_temperature"] > 2  # over-confident: softened
    assert keys["cv_malignant_ece"] < raw["cv_malignant_ece"] / 3
    assert keys["cv_malignant_ece"] < 0.05
    assert keys["cv_malignant_auroc"] == pytest.approx(raw["cv_malignant_auroc"], abs=1e-9)
    for k in ("sensitivity", "specificity"):
        assert keys[f"cv_malignant_{k}"] == pytest.approx(raw[f"cv_malignant_{k}"], abs=1e-9)
    for k in range(4):  # within a fold one temperature: the order of its images is kept
        assert np.array_equal(np.argsort(held[fold == k]), np.argsort(prob[fold == k]))
    assert np.all((held > 0.5) == (prob > 0.5)) and np.abs(held - 0.5).max() < 0.4
    assert np.allclose(test, held[:40], atol=0.05)  # test: the temperature of all folds


def test_the_packaged_classifier_travels_to_predict_and_to_onnx(tmp_path, capsys):
    """A packaged model carrying the classifier predicts in an empty folder with its p_lesion as
    the lesion score and its p_malignant beside it; its ONNX export carries the classifier, and
    predict with the .onnx alone gives the same probabilities and gate."""
    import csv

    from conftest import tiny_params, write_png

    from busiseg.cli import main
    from busiseg.data.images import resize_image
    from busiseg.inference.classify import classifier_probabilities
    from busiseg.inference.segment import MaskSettings
    from busiseg.modeling.classifier import ImageClassifier
    from busiseg.modeling.model_file import package_model, save_model
    from busiseg.modeling.pretrained import input_normalisation
    from busiseg.modeling.registry import build_model
    from busiseg.params import ModelParams

    torch.manual_seed(0)
    model = build_model("unet", base=4, depth=2)
    save_model(tmp_path / "model.pt", model.state_dict(), model.config, tiny_params(), size=32)
    classifier = ImageClassifier(1)
    mean, std = input_normalisation(ModelParams(arch="smp_unet", encoder_weights="imagenet"), 1)
    blob = {"format": 1, "kind": "encoder", "config": classifier.config, "size": 32,
            "members": [{"fold": 0, "seed": 0, "state": classifier.state_dict()}],
            "input_mean": mean, "input_std": std, "malignancy": True, "malignant_threshold": 0.4}
    # every pixel over the threshold, every image under the gate: the gate alone empties masks
    settings = MaskSettings(threshold=0.01, presence_threshold=0.99).as_dict()
    package_model(tmp_path / "model.pt", tmp_path / "packaged.pt", settings, {}, blob)
    image = np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8)
    write_png(tmp_path / "in" / "a.png", image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tmp_path / "packaged.pt"), str(tmp_path / "in"),
                 "--out", str(out)]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    small = torch.from_numpy(resize_image(image, 32))[None, None]
    want = classifier_probabilities(build_members(blob), small, Feed(mean, std, batch_size=1))[0]
    assert float(row["p_lesion"]) == pytest.approx(float(want[0]), abs=1e-6)
    assert float(row["p_malignant"]) == pytest.approx(float(want[1]), abs=1e-6)
    assert row["lesion_score"] == row["p_lesion"] and float(row["p_lesion"]) < 0.99
    assert row["lesion"] == "0"  # gated on the classifier's p_lesion
    assert main(["predict", "--model", str(tmp_path / "packaged.pt"), str(tmp_path / "in"),
                 "--out", str(tmp_path / "open"), "--presence-threshold", "off"]) == 0
    with open(tmp_path / "open" / "predictions.csv", newline="") as fh:
        assert next(csv.DictReader(fh))["lesion"] == "1"  # the same masks, ungated
    # the ONNX export carries the classifier: predict with it alone gives the .pt's figures
    assert main(["export", "--model", str(tmp_path / "packaged.pt"), "--out",
                 str(tmp_path / "m.onnx")]) == 0
    assert "image classifier (1 members)" in capsys.readouterr().out
    (tmp_path / "packaged.pt").unlink()
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), str(tmp_path / "in"),
                 "--out", str(tmp_path / "onnx")]) == 0
    with open(tmp_path / "onnx" / "predictions.csv", newline="") as fh:
        onnx_row = next(csv.DictReader(fh))
    for key in ("p_lesion", "p_malignant", "lesion_score"):
        assert float(onnx_row[key]) == pytest.approx(float(row[key]), abs=1e-5), key
    assert onnx_row["lesion"] == row["lesion"] == "0"
