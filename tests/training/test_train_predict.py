from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import busiseg, run_train, tiny_params, write_png
from PIL import Image

import busiseg.training.checkpoint as checkpoint_module
from busiseg.errors import BusisegError
from busiseg.inference.predict import predict_run
from busiseg.inference.segment import MaskSettings
from busiseg.modeling.model_file import load_model, save_model
from busiseg.modeling.registry import build_model
from busiseg.params import AugmentParams
from busiseg.training.augment import augment_batch
from busiseg.training.checkpoint import run_hash
from busiseg.training.schedule import lr_factor


def test_short_training_lowers_the_loss_and_picks_best_on_val(tmp_path: Path):
    m = run_train(tmp_path, tiny_params())
    curves = m["curves"]
    assert len(curves) == 6 and m["epochs_run"] == 6
    assert curves["train_loss"].iloc[-1] < curves["train_loss"].iloc[0]
    assert m["best_val_dice"] == curves["val_dice"].max()
    assert m["best_epoch"] == int(curves.loc[curves["val_dice"].idxmax(), "epoch"])
    assert list(curves.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr"]
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["complete"] is True and "model" not in ckpt  # nothing left to resume by mistake


def test_training_is_repeatable_on_cpu(tmp_path: Path):
    a = run_train(tmp_path, tiny_params(epochs=3), "a")
    b = run_train(tmp_path, tiny_params(epochs=3), "b")
    pd.testing.assert_frame_equal(a["curves"], b["curves"])
    digests = [load_model(tmp_path / tag / "model.pt")[1]["digest"] for tag in "ab"]
    assert digests[0] == digests[1]  # the weights themselves, not rounded metrics


def test_early_stopping(tmp_path: Path):
    m = run_train(tmp_path, tiny_params(epochs=30, patience=1, lr=1e-6))
    assert m["stopped_early"] and m["epochs_run"] < 30


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine") < 0.01
    assert lr_factor(55, 100, 10, "poly") == pytest.approx(0.5 ** 0.9)
    assert lr_factor(50, 100, 0, "none") == 1.0


def test_augmentation_moves_image_and_mask_together():
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 1, 32, 32)
    mask[:, :, 8:20, 5:15] = 1
    image = mask.clone()  # an image equal to its mask must stay equal to it after warping
    p = AugmentParams(hflip=0.5, vflip=0.5, rotate=30, scale=0.2, shift=0.1, elastic=4,
                      brightness=0, contrast=0)
    x, y = augment_batch(image, mask, p, gen)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert ((x > 0.5).float() == y).float().mean() > 0.98
    assert not torch.equal(y, mask)  # something happened
    x2, y2 = augment_batch(image, mask, p, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded


def test_intensity_augmentation_keeps_range_and_mask():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16)
    y = (torch.rand(4, 1, 16, 16) > 0.5).float()
    p = AugmentParams(hflip=0, rotate=0, scale=0, shift=0, brightness=0.3, contrast=0.3,
                      gamma=0.3, blur=1.0, noise=0.2)
    x2, y2 = augment_batch(x, y, p, gen)
    assert torch.equal(y, y2) and x2.min() >= 0 and x2.max() <= 1 and not torch.equal(x, x2)


# -- model files and predict ---------------------------------------------------------------


def saved_model(tmp_path: Path) -> Path:
    p = tiny_params()
    model = build_model("unet", base=4, depth=2)
    path = tmp_path / "model.pt"
    save_model(path, model.state_dict(), model.config, p, size=32)
    return path


def test_model_file_round_trip(tmp_path: Path):
    model, blob = load_model(saved_model(tmp_path))
    assert blob["preprocess"]["size"] == 32 and blob["model"]["arch"] == "unet"
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/busiseg_pwned_marker")


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path):
    MARKER.unlink(missing_ok=True)
    evil = tmp_path / "model.pt"
    torch.save({"format": "busiseg-model", "payload": Exploit()}, evil)
    with pytest.raises(BusisegError, match="refused"):
        load_model(evil)
    assert not MARKER.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(BusisegError, match="refused"):
        load_model(raw)
    assert not MARKER.exists()


def test_tampered_or_foreign_files_are_refused(tmp_path: Path):
    path = saved_model(tmp_path)
    blob = torch.load(path, weights_only=True)
    key = next(iter(blob["state_dict"]))
    blob["state_dict"][key] = blob["state_dict"][key] + 1
    torch.save(blob, path)
    with pytest.raises(BusisegError, match="digest"):
        load_model(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(BusisegError, match="not a busiseg model"):
        load_model(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(BusisegError, match="refused"):
        load_model(garbage)


def test_predict_writes_masks_at_original_size(tmp_path: Path):
    model = saved_model(tmp_path)
    inputs = tmp_path / "in"
    write_png(inputs / "grey.png", np.full((57, 83), 90, np.uint8))
    write_png(inputs / "rgb.png", np.full((40, 30, 3), 90, np.uint8))
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(inputs / "photo.jpg")
    write_png(inputs / "grey_mask.png", np.zeros((5, 5), np.uint8))  # masks are not inputs
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    run = predict_run(model, [inputs], out)
    written, failures = run.written, run.failures
    assert sorted(p.name for p in written) == ["grey_mask.png", "photo_mask.png", "rgb_mask.png"]
    assert Image.open(out / "grey_mask.png").size == (83, 57)
    assert Image.open(out / "rgb_mask.png").size == (30, 40)
    assert Image.open(out / "grey_overlay.png").mode == "RGB"
    assert set(np.unique(np.asarray(Image.open(out / "grey_mask.png")))) <= {0, 255}
    assert [f.path.name for f in failures] == ["broken.png"]


def test_predict_cli_exit_codes(tmp_path: Path):
    model = saved_model(tmp_path)
    good = write_png(tmp_path / "a.png", np.full((40, 50), 90, np.uint8))
    out = tmp_path / "o"
    cli = [sys.executable, "-m", "busiseg.cli", "predict", "--threshold", "0.5", "--out", str(out)]
    bad = subprocess.run(cli + ["--model", str(model), str(good), str(tmp_path / "missing.png")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"skipped: {tmp_path / 'missing.png'}: no such file or folder"
    assert (out / "a_mask.png").is_file()  # the good input was still written
    nomodel = subprocess.run(cli + ["--model", str(tmp_path / "x.pt"), str(good)],
                             capture_output=True, text=True)
    assert nomodel.returncode == 1 and "Traceback" not in nomodel.stderr
    assert "model file not found" in nomodel.stderr


def test_predict_from_eval_applies_what_evaluate_applied(tmp_path: Path):
    model = saved_model(tmp_path)
    good = write_png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (40, 50),
                                                                            dtype=np.uint8))
    cli = [sys.executable, "-m", "busiseg.cli", "predict", "--model", str(model), str(good)]
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"dice": 0.5, "threshold": 0.3, "used_tta": 1, "used_largest_cc": 1,
                              "used_fill_holes": 0, "used_tune_threshold": 1}))
    busiseg([*cli[3:], "--out", tmp_path / "a", "--from-eval", ev], tmp_path)
    busiseg([*cli[3:], "--out", tmp_path / "b", "--threshold", "0.3", "--tta", "--largest-cc"],
            tmp_path)
    mask = np.asarray(Image.open(tmp_path / "a" / "a_mask.png"))
    assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "b" / "a_mask.png")))
    assert MaskSettings.from_eval(ev) == MaskSettings(0.3, tta=True, largest_cc=True,
                                                      tuned_threshold=True)

    both = subprocess.run(cli + ["--out", str(tmp_path / "c"), "--from-eval", str(ev), "--tta"],
                          capture_output=True, text=True)
    assert both.returncode == 2 and "either it or them" in both.stderr
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"dice": 0.5, "threshold": 0.5}))
    for path, msg in ((old, "not an evaluate metrics file"), (tmp_path / "no.json", "not found")):
        r = subprocess.run(cli + ["--out", str(tmp_path / "d"), "--from-eval", str(path)],
                           capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().startswith(f"error: {path}: {msg}")
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_checkpoint_belongs_to_its_training_code(tmp_path: Path, monkeypatch):
    """Resuming after an edit to the loss must start over, not continue the old code's weights;
    the code hashed is the train stage's import closure, the files dvc.yaml lists for it."""
    import yaml

    from busiseg.pipeline.deps import CODE_PREFIXES

    repo = Path(__file__).parents[2]
    deps = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    hashed = {p.relative_to(repo).as_posix() for p in checkpoint_module.training_code()}
    assert "src/busiseg/training/losses.py" in hashed
    # what stages/train.py runs besides the training library: itself and the stage plumbing
    plumbing = {"stages/train.py", "src/busiseg/pipeline/stage.py"}
    assert hashed == {d for d in deps if d.startswith(CODE_PREFIXES)} - plumbing
    data = tmp_path / "cache.npz"
    data.write_bytes(b"cache")
    loss = tmp_path / "losses.py"
    loss.write_text("A = 1\n")
    monkeypatch.setattr(checkpoint_module, "training_code", lambda: (loss,))
    before = run_hash(tiny_params(), [data])
    assert run_hash(tiny_params(), [data]) == before
    loss.write_text("A = 2\n")
    assert run_hash(tiny_params(), [data]) != before


def test_a_model_file_records_the_split_it_trained_on(tmp_path: Path):
    """seed, folds and the digest of split.csv: what a composition of models checks."""
    from busiseg.files import file_sha256

    p = tiny_params()
    run_train(tmp_path, p)
    blob = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert blob["split"] == {"seed": p.split.seed, "folds": p.split.folds,
                             "sha256": file_sha256(tmp_path / "split.csv")}
