"""The one inference path: what evaluate scores is what predict and an ONNX export give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from busiseg.errors import BusisegError
from busiseg.inference.segment import (
    Feed,
    MaskSettings,
    binarize,
    postprocess,
    probabilities,
    segment,
)
from busiseg.modeling.model_file import save_model
from busiseg.modeling.registry import build_model
from busiseg.params import parse_params

CPU = torch.device("cpu")


def masks(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


def test_postprocess_largest_component_and_holes():
    m = masks("###...#",
              "#.#....",
              "###....")
    assert postprocess(m, largest_cc=True, fill_holes=False).sum() == 8  # the lone pixel goes
    filled = postprocess(m, largest_cc=True, fill_holes=True)
    assert filled.sum() == 9 and filled[1, 1]
    assert not postprocess(np.zeros((3, 3), bool), True, True).any()
    probs = np.stack([m * 0.9, m * 0.2]).astype(np.float32)
    assert binarize(probs, 0.5, largest_cc=True).sum() == 8
    assert binarize(probs, 0.1).sum() == 2 * m.sum()


def test_flip_tta_averages_the_prediction_of_the_mirrored_image():
    def ramp(x: torch.Tensor) -> torch.Tensor:  # logits rising left to right, whatever the image
        return torch.linspace(-3, 3, x.shape[-1]).expand_as(x).clone()

    images = torch.zeros(3, 1, 8, 10, dtype=torch.uint8)
    plain = probabilities(ramp, images, Feed(0.5, 0.25, CPU, batch_size=2))
    tta = probabilities(ramp, images, Feed(0.5, 0.25, CPU, batch_size=2), tta=True)
    assert plain.shape == tta.shape == (3, 1, 8, 10)
    assert not torch.allclose(plain, plain.flip(-1))
    assert torch.allclose(tta, tta.flip(-1))
    assert torch.allclose(tta, 0.5 * (plain + plain.flip(-1)))


def test_predict_segments_an_image_exactly_as_evaluate_scores_it():
    """An image already at the training size goes through predict's path (resize, probabilities,
    resize back, threshold, post-processing) to the mask evaluate computes from the cache."""
    torch.manual_seed(0)
    model = build_model("unet", base=4, depth=2).eval()
    gray = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    prob = probabilities(model, torch.from_numpy(gray)[None, None], Feed(0.5, 0.25, CPU, 4),
                         tta=True)
    # an untrained net's probabilities sit near one value: threshold inside their range, so the
    # masks compared are neither empty nor full
    threshold = float(np.quantile(prob.numpy(), 0.6))
    settings = MaskSettings(threshold=threshold, tta=True, largest_cc=True, fill_holes=True)
    mask = segment(model, gray, 32, 0.5, 0.25, settings)
    want = binarize(prob[:, 0].numpy(), threshold, largest_cc=True, fill_holes=True)[0]
    assert 0 < want.mean() < 1
    assert mask.dtype == bool and np.array_equal(mask, want)
    big = np.random.default_rng(1).integers(0, 255, (45, 71), dtype=np.uint8)
    assert segment(model, big, 32, 0.5, 0.25, settings).shape == (45, 71)


def test_mask_settings_come_from_evaluates_output(tmp_path: Path):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"threshold": 0.35, "used_tta": 1, "used_largest_cc": 0,
                              "used_fill_holes": 1, "used_tune_threshold": 1}))
    assert MaskSettings.from_eval(ev) == MaskSettings(0.35, tta=True, fill_holes=True,
                                                      tuned_threshold=True)
    # what evaluate writes, MaskSettings reads back: one type owns the file's settings keys
    chosen = MaskSettings(0.4, tta=True, largest_cc=True, presence_threshold=0.3,
                          confidence="combined", presence_temperature=1.7, review_threshold=0.2,
                          tuned_threshold=True, val_dice=0.81)
    ev.write_text(json.dumps(chosen.eval_keys()))
    assert MaskSettings.from_eval(ev) == chosen
    ev.write_text(json.dumps({"threshold": 1.5, "used_tta": 0, "used_largest_cc": 0,
                              "used_fill_holes": 0}))
    with pytest.raises(BusisegError, match="threshold must be in"):
        MaskSettings.from_eval(ev)


def test_the_model_file_holds_no_evaluation_choice(tmp_path: Path):
    """A threshold in the model file would make an evaluate param re-train the model."""
    p = parse_params({"preprocess": {"size": 32}, "model": {"base": 4, "depth": 2},
                      "evaluate": {"threshold": 0.3}})
    model = build_model("unet", base=4, depth=2)
    save_model(tmp_path / "m.pt", model.state_dict(), model.config, p, 32)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "threshold" not in blob and "evaluate" not in blob["params"]
    assert blob["preprocess"] == {"size": 32, "input_mean": 0.5, "input_std": 0.25, "channels": 1}


def test_inference_never_imports_training_code():
    """Predict, export and evaluate depend on the model alone (nanoGPT's sample.py rule)."""
    code = ("import sys, busiseg.inference.predict, busiseg.evaluation.evaluate, "
            "busiseg.inference.onnx_model, busiseg.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('busiseg.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(out.stdout))  # noqa: S307 - our own printed list
    assert "busiseg.modeling.registry" in loaded  # the probe did import the inference path
    assert not {m for m in loaded if m.startswith(("busiseg.training", "busiseg.research"))}
