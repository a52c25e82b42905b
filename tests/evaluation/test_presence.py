"""Normal breasts: a presence head trained jointly, the presence threshold chosen on held-out
data for dice_all, the lesion score calibrated, and the same decision in predict and ONNX."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train, tiny_data, tiny_params, write_png
from PIL import Image

from busiseg.cli import main
from busiseg.errors import BusisegError
from busiseg.evaluation import presence
from busiseg.evaluation.evaluate import evaluate
from busiseg.files import file_sha256
from busiseg.inference.confidence import calibrate
from busiseg.inference.onnx_model import export_onnx, load_onnx
from busiseg.inference.predict import predict_run
from busiseg.inference.predict_options import SourcedSettings
from busiseg.inference.segment import Feed, MaskSettings, gate, predict_probabilities
from busiseg.modeling.archs import split_output
from busiseg.modeling.model_file import load_model
from busiseg.modeling.registry import build_model
from busiseg.training.losses import LossSpec, SegLoss


@pytest.mark.parametrize("arch", ["unet", "unet_plus_plus", "compact", "smp_unet"])
def test_every_arch_grows_a_presence_head_on_request_only(arch: str):
    kw = {} if arch in ("compact", "smp_unet") else {"base": 4, "depth": 2}
    plain = build_model(arch, **kw).eval()
    headed = build_model(arch, presence=True, **kw).eval()
    x = torch.zeros(2, 1, 64, 64)
    assert isinstance(plain(x), torch.Tensor)  # today's models are unchanged
    masks, logits = split_output(headed(x))
    assert masks.shape == (2, 1, 64, 64) and logits.shape == (2, 1)
    assert headed.config["presence"] is True and plain.config["presence"] is False


@pytest.mark.parametrize("arch", ["unet", "unet_plus_plus", "compact", "smp_unet"])
def test_a_presence_head_leaves_every_other_initial_weight_as_it_was(arch: str):
    kw = {} if arch in ("compact", "smp_unet") else {"base": 4, "depth": 2}
    torch.manual_seed(0)
    plain = build_model(arch, **kw).state_dict()
    torch.manual_seed(0)
    headed = build_model(arch, presence=True, **kw).state_dict()
    assert set(plain) < set(headed)
    assert all(torch.equal(plain[k], headed[k]) for k in plain)


def test_a_detached_head_learns_without_changing_the_segmentation(tmp_path: Path):
    def trained(tag: str, **train) -> dict:
        p = tiny_params(epochs=3, **train)  # with dropout: the head must not shift its draws
        run_train(tmp_path, replace(p, model=replace(p.model, dropout=0.2)), tag)
        model, _ = load_model(tmp_path / tag / "model.pt")
        return model.state_dict()

    plain = trained("plain")
    detached = trained("detached", presence_weight=1.0, presence_detach=True)
    joint = trained("joint", presence_weight=1.0)
    head = [k for k in detached if k not in plain]
    assert head and not any(torch.equal(detached[k], joint[k]) for k in head if "weight" in k)
    assert all(torch.equal(plain[k], detached[k]) for k in plain)  # bit for bit
    assert not all(torch.equal(plain[k], joint[k]) for k in plain)  # the joint loss moves them


def test_presence_detach_without_a_head_is_refused():
    with pytest.raises(BusisegError, match="train.presence_detach.*presence_weight"):
        tiny_params(presence_detach=True)


def test_the_presence_loss_is_bce_on_whether_the_image_has_a_lesion():
    torch.manual_seed(0)
    target = torch.zeros(3, 1, 8, 8)
    target[0, 0, 2:4, 2:4] = 1  # image 0 has a lesion, 1 and 2 are normal
    masks, logits = torch.randn(3, 1, 8, 8), torch.tensor([[2.0], [-1.0], [0.5]])
    base = SegLoss()(masks, target)
    got = SegLoss(LossSpec(presence_weight=0.5))((masks, logits), target)
    want = base + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(got, want)
    assert torch.equal(SegLoss()((masks, logits), target), base)  # weight 0: masks alone


def test_auto_presence_threshold_empties_normals_only_when_held_out_data_says_so():
    truth = np.zeros((4, 1, 6), bool)
    truth[:2, 0, :3] = True
    masks = np.ones((4, 1, 6), bool)  # a lesion drawn everywhere, normals included
    scores = np.array([0.9, 0.8, 0.2, 0.3])
    t = presence.choose_threshold(masks, truth, scores)
    assert 0.3 < t <= 0.8
    assert presence.dice_all(gate(masks, scores, t), truth) == pytest.approx((2 * 2 / 3 + 2) / 4)
    # normals already empty: any threshold could only empty a lesion, so it stays off
    clean = masks.copy()
    clean[2:] = False
    assert presence.choose_threshold(clean, truth, np.array([0.2, 0.3, 0.9, 0.8])) is None


def test_temperature_scaling_and_the_reliability_table():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    overconfident = np.where(labels, 0.99, 0.01)
    overconfident[:80] = 1 - overconfident[:80]  # 20 % of the time confidently wrong
    t = presence.fit_temperature(overconfident, labels)
    assert t > 1  # it softens an overconfident score
    ece_raw, _ = presence.reliability(overconfident, labels)
    ece_cal, table = presence.reliability(calibrate(overconfident, t), labels)
    assert ece_cal < ece_raw and sum(r["images"] for r in table) == 400


def test_separable_held_out_scores_do_not_drive_the_temperature_to_certainty():
    labels = np.r_[np.ones(60, bool), np.zeros(20, bool)]
    scores = np.where(labels, 0.8, 0.3)  # a perfect ranking on 80 images
    t = presence.fit_temperature(scores, labels)
    calibrated = calibrate(scores, t)
    assert 0.05 < t < 20  # inside the search range, not pinned to its bound
    assert 0.95 < calibrated[0] < 0.99 and 0.01 < calibrated[-1] < 0.1  # about 61/62 and 1/22


def test_a_presence_model_trains_evaluates_predicts_and_exports_the_same_decision(tmp_path: Path):
    params = tiny_params(epochs=3, presence_weight=1.0)
    params = replace(params, evaluate=replace(params.evaluate, presence_threshold="auto",
                                              bootstrap=50))
    run_train(tmp_path, params)
    model_path = tmp_path / "a" / "model.pt"
    model, blob = load_model(model_path)
    assert blob["model"]["presence"] is True
    cache, split = tiny_data(tmp_path)
    result = evaluate(params, model_path, cache, split)
    m = result["metrics"]
    assert {"dice_all", "detect_auroc", "detect_specificity", "detect_ece",
            "presence_temperature"} <= set(m)
    assert m["presence_threshold"] is None or 0 < m["presence_threshold"] < 1

    # predict: the CSV beside the masks carries the presence probability and the decision
    gray = np.random.default_rng(3).integers(0, 255, (40, 50), dtype=np.uint8)
    image = write_png(tmp_path / "in" / "x.png", gray)
    _, pres = predict_probabilities(model, torch.zeros(3, 1, 32, 32, dtype=torch.uint8),
                                    Feed(0.5, 0.25, batch_size=2), tta=True)
    assert pres is not None and pres.shape == (3,) and bool(((pres > 0) & (pres < 1)).all())
    above = MaskSettings(threshold=0.01, presence_threshold=0.0)
    below = MaskSettings(threshold=0.01, presence_threshold=1.0)
    for name, settings in (("above", above), ("below", below)):
        predict_run(model_path, [image], tmp_path / name, SourcedSettings.given(settings))
        with open(tmp_path / name / "predictions.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 1 and 0 <= float(rows[0]["lesion_score"]) <= 1
        drawn = np.asarray(Image.open(tmp_path / name / "x_mask.png"))
        assert int(rows[0]["lesion"]) == int(drawn.any())
    assert rows[0]["lesion"] == "0"  # a threshold of 1 empties every mask

    # ONNX: presence as a second output, the threshold in the metadata
    onnx_path = tmp_path / "m.onnx"
    meta = export_onnx(model, blob, MaskSettings(presence_threshold=0.4), onnx_path)
    assert meta["outputs"] == ["logits", "presence"] and meta["presence_threshold"] == 0.4
    forward, loaded = load_onnx(onnx_path)
    probe = torch.randn(2, 1, 32, 32)
    got, want = split_output(forward(probe)), split_output(model(probe))
    assert torch.allclose(torch.sigmoid(got[1]), torch.sigmoid(want[1]), atol=1e-4)
    assert loaded["presence_threshold"] == 0.4 and loaded["version"] == 2

    # the command line replaces the export's gate, with a number or with off
    for flag, gate_at in (("1", "1.0"), ("off", "")):
        out = tmp_path / f"cli-{flag}"
        assert main(["predict", str(image), "--model", str(onnx_path), "--out", str(out),
                     "--presence-threshold", flag]) == 0
        with open(out / "predictions.csv") as fh:
            row = next(csv.DictReader(fh))
        assert row["presence_threshold"] == gate_at
        assert row["lesion"] == "0" or flag == "off"
    # the record links the export to its .pt (one weights digest) and tells the files apart
    pt, onnx = (json.loads((tmp_path / d / "predictions.json").read_text())["model"]
                for d in ("above", "cli-off"))
    assert (pt["kind"], onnx["kind"]) == ("pt", "onnx")
    assert pt["weights_digest"] == onnx["weights_digest"] == blob["digest"]
    assert pt["file_sha256"] == file_sha256(model_path)
    assert onnx["file_sha256"] == file_sha256(onnx_path)


def test_onnx_exports_of_format_version_1_still_load_and_unknown_versions_do_not(tmp_path: Path):
    import json

    import onnx

    model = build_model("unet", base=4, depth=2).eval()
    blob = {"model": model.config, "digest": "0" * 64,
            "preprocess": {"size": 32, "input_mean": 0.5, "input_std": 0.25}}
    path = tmp_path / "m.onnx"
    export_onnx(model, blob, MaskSettings(), path)
    for version, loads in ((1, True), (5, False)):
        proto = onnx.load(str(path))
        entry = next(e for e in proto.metadata_props if e.key == "busiseg")
        old = {k: v for k, v in json.loads(entry.value).items()  # as version 1 wrote them
               if k not in ("confidence", "presence_temperature", "review_threshold", "channels",
                                 "presence_expected_dice")}
        entry.value = json.dumps({**old, "version": version})
        onnx.save(proto, str(tmp_path / f"v{version}.onnx"))
        if loads:
            meta = load_onnx(tmp_path / f"v{version}.onnx")[1]
            assert meta["version"] == 1 and MaskSettings.from_dict(meta) == MaskSettings()
        else:
            with pytest.raises(BusisegError, match="not a busiseg ONNX export"):
                load_onnx(tmp_path / f"v{version}.onnx")


def test_a_model_file_from_before_the_presence_head_still_loads(tmp_path: Path):
    from busiseg.modeling.model_file import save_model

    model = build_model("unet", base=4, depth=2)
    config = {k: v for k, v in model.config.items() if k != "presence"}  # as files were
    save_model(tmp_path / "old.pt", model.state_dict(), config, tiny_params(), 32)
    loaded, blob = load_model(tmp_path / "old.pt")
    assert "presence" not in blob["model"]
    assert isinstance(loaded(torch.zeros(1, 1, 32, 32)), torch.Tensor)
