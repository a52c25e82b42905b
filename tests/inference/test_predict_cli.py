"""`busiseg predict` as a user meets it: predictions.json says how every mask was made and what
became of every input; a model that carries its settings needs no workspace; the options other
tools' users look for; every bad argument ends in one line."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_params, ultrasound_dicoms, write_png
from PIL import Image

import busiseg.inference.predict as predict_module
from busiseg import busiseg_version
from busiseg.cli import main
from busiseg.data.layouts import IMAGE_SUFFIXES
from busiseg.files import file_sha256
from busiseg.inference.predict import EXISTS, MASK_LIKE, SUFFIXES, predict_run
from busiseg.inference.predict_options import SourcedSettings
from busiseg.inference.segment import SETTING_NAMES, MaskSettings
from busiseg.modeling.model_file import save_model
from busiseg.modeling.registry import build_model

NOTE = "chosen out of fold (evaluate.tune_threshold)"


def model_file(folder: Path, settings: MaskSettings | None = None,
               sources: dict | None = None, name: str = "model.pt", seed: int = 0) -> Path:
    """An untrained tiny model; with `settings`, carrying them as a packaged model does."""
    torch.manual_seed(seed)
    model = build_model("unet", base=4, depth=2)
    path = folder / name
    save_model(path, model.state_dict(), model.config, tiny_params(), size=32)
    if settings is not None:
        blob = torch.load(path, weights_only=True)
        blob["settings"] = settings.as_dict()
        if sources is not None:
            blob["settings_source"] = sources
        torch.save(blob, path)
    return path


def image(path: Path, seed: int = 0) -> Path:
    return write_png(path, np.random.default_rng(seed).integers(0, 255, (40, 50), np.uint8))


def record(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


def mask(out: Path, name: str = "a") -> np.ndarray:
    return np.asarray(Image.open(out / f"{name}_mask.png"))


def rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def kill_at(monkeypatch, name: str, call: int) -> list[int]:
    """predict's `name` raises KeyboardInterrupt at its `call`-th call (0: never), as a kill
    there would stop the run; the calls are counted."""
    real = getattr(predict_module, name)
    real = getattr(real, "__wrapped__", real)
    calls: list[int] = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    dying.__wrapped__ = real
    monkeypatch.setattr(predict_module, name, dying)
    return calls


def one_line_error(capsys, argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_the_record_names_version_model_settings_and_sources(tmp_path: Path, capsys):
    model = model_file(tmp_path)
    a = image(tmp_path / "in" / "a.png")
    ev = tmp_path / "eval.json"  # an older evaluate file: no review threshold, no confidence
    ev.write_text(json.dumps({"threshold": 0.4, "used_tta": 1, "used_largest_cc": 0,
                              "used_fill_holes": 1, "presence_threshold": None}))
    out = tmp_path / "out"
    argv = ["predict", str(a), "--model", str(model), "--out", str(out), "--from-eval", str(ev),
            "--presence-threshold", "0.2"]
    assert main(argv) == 0
    assert "predictions.json" in capsys.readouterr().out
    r = record(out)
    blob = torch.load(model, weights_only=True)
    assert r["busiseg"] == busiseg_version() and r["busiseg"]
    assert r["command"] == ["busiseg", *argv]
    assert r["model"] == {"path": str(model.resolve()), "kind": "pt",
                          "weights_digest": blob["digest"], "file_sha256": file_sha256(model)}
    assert r["finished"] is True
    assert r["device"] == "cpu" and r["cwd"] == str(Path.cwd())
    assert set(r["settings"]) == set(r["settings_source"]) == set(SETTING_NAMES)
    assert r["settings"]["threshold"] == 0.4 and r["settings"]["tta"] is True
    assert r["settings"]["presence_threshold"] == 0.2
    src = r["settings_source"]
    assert src["threshold"] == src["tta"] == src["fill_holes"] == f"eval file {ev}"
    assert src["presence_threshold"] == "flag --presence-threshold"
    assert src["review_threshold"] == src["confidence"] == "default"  # not in the file
    assert r["inputs"] == {"found": 1, "written": [{"image": str(a), "mask": "a_mask.png"}],
                           "skipped": [], "failed": []}
    assert r["outputs"]["mask_values"] == [0, 255] and r["outputs"]["overlays"] is True
    assert not list(out.glob(".*tmp*"))  # written beside, then renamed


def test_flags_replace_the_whole_set_and_say_so(tmp_path: Path):
    model = model_file(tmp_path, MaskSettings(0.3, largest_cc=True, presence_threshold=0.5))
    out = tmp_path / "out"
    assert main(["predict", str(image(tmp_path / "a.png")), "--model", str(model), "--out",
                 str(out), "--threshold", "0.6", "--tta"]) == 0
    r = record(out)
    assert r["settings"]["threshold"] == 0.6 and r["settings"]["largest_cc"] is False
    assert r["settings"]["presence_threshold"] is None
    assert r["settings_source"]["threshold"] == "flag --threshold"
    assert r["settings_source"]["tta"] == "flag --tta"
    assert r["settings_source"]["largest_cc"] == r["settings_source"]["fill_holes"] == "default"


@pytest.mark.parametrize("threshold, lesion", [(0.001, 255), (0.999, 0)])
def test_a_model_carrying_settings_predicts_with_them_in_an_empty_folder(
        tmp_path: Path, monkeypatch, capsys, threshold: float, lesion: int):
    model = model_file(tmp_path, MaskSettings(threshold, fill_holes=True),
                       {"threshold": NOTE})
    a = image(tmp_path / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # no metrics/eval.json anywhere near
    assert main(["predict", str(a), "--model", str(model), "--out", "out"]) == 0
    assert f"settings from {model} metadata" in capsys.readouterr().out
    assert np.all(mask(empty / "out") == lesion)  # the model's threshold, not the default 0.5
    r = record(empty / "out")
    assert r["settings"]["threshold"] == threshold and r["settings"]["fill_holes"] is True
    assert r["settings_source"]["threshold"] == f"model: {NOTE}"
    assert r["settings_source"]["fill_holes"] == "model"
    assert set(r["settings_source"].values()) == {f"model: {NOTE}", "model"}


def test_a_packaged_model_s_folder_is_a_model_for_predict(tmp_path: Path, capsys):
    """What `dvc artifacts get busiseg-model` writes is a folder: --model takes it as its
    model.pt."""
    folder = tmp_path / "busiseg-model"
    folder.mkdir()
    model_file(folder, MaskSettings(0.001))
    a = image(tmp_path / "a.png")
    assert main(["predict", str(a), "--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert np.all(mask(tmp_path / "out") == 255)  # its own threshold, 0.001
    r = record(tmp_path / "out")
    assert r["settings"]["threshold"] == 0.001
    assert r["model"]["weights_digest"] == torch.load(folder / "model.pt",
                                                      weights_only=True)["digest"]


def test_a_model_without_settings_still_needs_evaluates_file(tmp_path: Path, monkeypatch,
                                                             capsys):
    model = model_file(tmp_path)
    a = image(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["predict", str(a), "--model", str(model), "--out", "out"])
    assert "carries no settings" in err and "--from-eval" in err and "--threshold" in err
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(
        {"threshold": 0.999, "used_tta": 0, "used_largest_cc": 0, "used_fill_holes": 0}))
    assert main(["predict", str(a), "--model", str(model), "--out", "out"]) == 0
    assert record(tmp_path / "out")["settings_source"]["threshold"] == (
        "eval file metrics/eval.json")
    assert not mask(tmp_path / "out").any()


def test_mask_values_and_no_overlay(tmp_path: Path):
    model = model_file(tmp_path)
    a = image(tmp_path / "a.png")
    base = ["predict", str(a), "--model", str(model), "--threshold", "0.001"]
    assert main([*base, "--out", str(tmp_path / "labels"), "--mask-values", "1",
                 "--no-overlay"]) == 0
    assert main([*base, "--out", str(tmp_path / "view")]) == 0
    labels, view = mask(tmp_path / "labels"), mask(tmp_path / "view")
    assert set(np.unique(labels)) == {1} and set(np.unique(view)) == {255}
    assert not list((tmp_path / "labels").glob("*_overlay.png"))
    assert (tmp_path / "view" / "a_overlay.png").is_file()
    r = record(tmp_path / "labels")["outputs"]
    assert r["mask_values"] == [0, 1] and r["overlays"] is False


def test_continue_skips_what_is_done_and_keeps_its_rows(tmp_path: Path, capsys):
    model = model_file(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    image(inputs / "a.png")
    cli = ["predict", str(inputs), "--model", str(model), "--out", str(out), "--threshold", "0.5"]
    assert main(cli) == 0
    write_png(out / "a_mask.png", np.full((3, 3), 7, np.uint8))  # what a rewrite would replace
    image(inputs / "b.png", seed=1)
    capsys.readouterr()
    assert main([*cli, "--continue"]) == 0
    assert f"skipped: {inputs / 'a.png'}: {EXISTS}" in capsys.readouterr().err
    assert np.all(mask(out) == 7)  # not predicted again
    r = record(out)
    assert r["inputs"]["found"] == 2
    assert r["inputs"]["written"] == [{"image": str(inputs / "b.png"), "mask": "b_mask.png"}]
    assert r["inputs"]["skipped"] == [{"path": str(inputs / "a.png"), "reason": EXISTS}]
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["mask"] for row in rows] == ["a_mask.png", "b_mask.png"]
    assert main(cli) == 0  # without --continue: everything again, this run's rows alone
    with open(out / "predictions.csv") as fh:
        assert [row["mask"] for row in csv.DictReader(fh)] == ["a_mask.png", "b_mask.png"]
    assert len(record(out)["inputs"]["written"]) == 2


def test_continue_resumes_a_killed_run_and_lists_every_image_once(tmp_path: Path, monkeypatch,
                                                                  capsys):
    model = model_file(tmp_path)
    names = ["a", "b", "c", "d", "e"]
    for seed, name in enumerate(names):
        image(tmp_path / "in" / f"{name}.png", seed)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user gives them
    cli = ["predict", "in", "--model", str(model), "--out", "out", "--threshold", "0.5"]
    kill_at(monkeypatch, "segment_with_score", 3)
    assert main(cli) == 130
    assert "--continue" in capsys.readouterr().err
    out = tmp_path / "out"
    assert [r["mask"] for r in rows(out)] == ["a_mask.png", "b_mask.png"]  # rows as they finish
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["a_mask.png", "b_mask.png"]
    assert record(out)["finished"] is False and record(out)["settings"]["threshold"] == 0.5
    calls = kill_at(monkeypatch, "segment_with_score", 0)
    assert main([*cli, "--continue"]) == 0
    assert len(calls) == 3  # c, d and e; a and b are not predicted again
    assert [r["mask"] for r in rows(out)] == [f"{n}_mask.png" for n in names]
    r = record(out)
    assert r["finished"] is True and r["inputs"]["found"] == 5
    given = Path.cwd() / "in"  # the relative paths given, written absolute
    assert r["inputs"]["written"] == [{"image": str(given / f"{n}.png"),
                                       "mask": f"{n}_mask.png"} for n in "cde"]
    assert r["inputs"]["skipped"] == [{"path": str(given / f"{n}.png"), "reason": EXISTS}
                                      for n in "ab"]
    assert main([*cli, "--continue"]) == 0 and len(calls) == 3  # all done: nothing twice
    assert [r["mask"] for r in rows(out)] == [f"{n}_mask.png" for n in names]


def test_a_mask_is_written_last_and_counts_only_with_its_row(tmp_path: Path, monkeypatch):
    model = model_file(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    for seed, name in enumerate("abc"):
        image(inputs / f"{name}.png", seed)
    cli = ["predict", str(inputs), "--model", str(model), "--out", str(out), "--threshold",
           "0.001", "--save-probabilities"]
    kill_at(monkeypatch, "overlay", 2)  # b: killed after its probability map
    assert main(cli) == 130
    assert (out / "b_prob.png").is_file() and not (out / "b_overlay.png").exists()
    assert not (out / "b_mask.png").exists()  # no mask: b is not done
    assert not list(out.glob(".*tmp*"))  # nothing half-written left beside
    kill_at(monkeypatch, "overlay", 0)
    kill_at(monkeypatch, "append_score", 1)  # b: killed between its mask and its row
    assert main([*cli, "--continue"]) == 130
    assert (out / "b_mask.png").is_file() and [r["mask"] for r in rows(out)] == ["a_mask.png"]
    (out / "b_mask.png").write_bytes(b"\x89PNG cut short")  # whatever it holds, no row: redo
    with open(out / "predictions.csv", "a") as fh:
        fh.write(f"{inputs / 'b.png'},b_mask.png,0.5")  # a row cut short is no row
    kill_at(monkeypatch, "append_score", 0)
    calls = kill_at(monkeypatch, "segment_with_score", 0)
    assert main([*cli, "--continue"]) == 0
    assert len(calls) == 2  # b and c
    assert [r["mask"] for r in rows(out)] == ["a_mask.png", "b_mask.png", "c_mask.png"]
    assert all(r["confidence"] != "" for r in rows(out))
    assert np.all(mask(out, "b") == 255)


@pytest.mark.parametrize("change, says", [
    (["--threshold", "0.6"], "threshold 0.5 (this run: 0.6)"),
    (["--threshold", "0.5", "--tta"], "tta False (this run: True)"),
    (["--threshold", "0.5", "--presence-threshold", "0.3"],
     "presence_threshold None (this run: 0.3)"),
    (["--threshold", "0.5", "--mask-values", "1"], "--mask-values 255 (this run: 1)"),
    (["--threshold", "0.5", "--mask-marks"], "without --mask-marks (this run: with)"),
    (["--threshold", "0.5", "--model", "{other}"], "another model"),
])
def test_continue_refuses_to_mix_runs(tmp_path: Path, monkeypatch, capsys, change, says):
    model, other = model_file(tmp_path), model_file(tmp_path, name="other.pt", seed=1)
    for seed, name in enumerate("ab"):
        image(tmp_path / "in" / f"{name}.png", seed)
    out = tmp_path / "out"
    base = ["predict", str(tmp_path / "in"), "--out", str(out), "--continue"]
    kill_at(monkeypatch, "segment_with_score", 2)  # killed: the record says how it began
    assert main([*base, "--model", str(model), "--threshold", "0.5"]) == 130
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = [*base, *(x.format(other=other) for x in change)]
    if "--model" not in argv:
        argv += ["--model", str(model)]
    err = one_line_error(capsys, argv)
    assert err.startswith("error: --continue: ") and says in err, err
    assert "give another --out for this run, or drop --continue" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched


def test_continue_takes_the_same_weights_from_another_file(tmp_path: Path, monkeypatch):
    model = model_file(tmp_path)
    packaged = model_file(tmp_path, MaskSettings(0.9), name="packaged.pt")  # same weights
    for seed, name in enumerate("ab"):
        image(tmp_path / "in" / f"{name}.png", seed)
    out = tmp_path / "out"
    cli = ["predict", str(tmp_path / "in"), "--out", str(out), "--threshold", "0.5"]
    kill_at(monkeypatch, "segment_with_score", 2)
    assert main([*cli, "--model", str(model)]) == 130
    kill_at(monkeypatch, "segment_with_score", 0)
    assert main([*cli, "--model", str(packaged), "--continue"]) == 0
    r = record(out)["model"]
    assert r["path"] == str(packaged.resolve()) and r["file_sha256"] != file_sha256(model)
    assert r["weights_digest"] == torch.load(model, weights_only=True)["digest"]
    assert [row["mask"] for row in rows(out)] == ["a_mask.png", "b_mask.png"]


def test_inputs_with_one_name_fail_rather_than_overwrite(tmp_path: Path, capsys):
    model = model_file(tmp_path)
    a = image(tmp_path / "a" / "x.png")
    b = tmp_path / "b" / "x.jpg"
    b.parent.mkdir()
    Image.fromarray(np.full((40, 50), 90, np.uint8)).save(b)
    c = image(tmp_path / "c" / "X.png", seed=2)  # one file on macOS and Windows
    out = tmp_path / "out"
    cli = ["--model", str(model), "--out", str(out), "--threshold", "0.5"]
    assert main(["predict", str(a), str(tmp_path / "b"), str(c), str(a), *cli]) == 1
    err = capsys.readouterr().err
    for later in (b, c, a):
        assert f"skipped: {later}: its outputs would overwrite those of {a} (same name)" in err
    assert [r["image"] for r in rows(out)] == [str(a)]
    assert [f["path"] for f in record(out)["inputs"]["failed"]] == [str(b), str(c), str(a)]
    assert record(out)["inputs"]["written"] == [{"image": str(a), "mask": "x_mask.png"}]
    # nor across runs: with --continue, b/x.jpg is not taken for a/x.png, done before
    assert main(["predict", str(b), *cli, "--continue"]) == 1
    assert f"skipped: {b}: its outputs would overwrite those of {a} (same name, predicted by an " \
        "earlier run)" in capsys.readouterr().err
    assert [r["image"] for r in rows(out)] == [str(a)]
    assert SUFFIXES is IMAGE_SUFFIXES  # one list of the image files busiseg reads


def test_files_not_predicted_are_reported(tmp_path: Path, capsys):
    model = model_file(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    image(inputs / "a.png")
    write_png(inputs / "a_mask.png", np.zeros((40, 50), np.uint8))
    write_png(inputs / "b_mask.png", np.zeros((40, 50), np.uint8))
    write_png(inputs / "a_overlay.png", np.zeros((40, 50, 3), np.uint8))
    (inputs / "notes.txt").write_text("x")
    (inputs / "more").mkdir()
    assert main(["predict", str(inputs), "--model", str(model), "--out", str(out),
                 "--threshold", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 files: name looks like a mask (contains _mask)" in err
    assert f"skipped: {inputs / 'a_overlay.png'}: predict's own output" in err
    assert f"skipped: {inputs / 'notes.txt'}: not an image file" in err
    assert f"skipped: {inputs / 'more'}: a folder inside a folder" in err
    skipped = {Path(s["path"]).name: s["reason"] for s in record(out)["inputs"]["skipped"]}
    assert skipped["a_mask.png"] == skipped["b_mask.png"] == MASK_LIKE
    assert skipped["a_overlay.png"] == "predict's own output"
    assert set(skipped) == {"a_mask.png", "b_mask.png", "a_overlay.png", "notes.txt", "more"}
    assert record(out)["inputs"]["found"] == 1
    # the library keeps its answer: skipped files are no failures
    run = predict_run(model, [inputs], tmp_path / "lib", SourcedSettings.given(MaskSettings()))
    assert [p.name for p in run.written] == ["a_mask.png"] and run.failures == []
    assert record(tmp_path / "lib")["settings_source"]["threshold"] == "given by the caller"


def test_the_record_is_written_when_nothing_was(tmp_path: Path, capsys):
    model = model_file(tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "gone.png"), "--model", str(model), "--out", str(out),
                 "--threshold", "0.5"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"skipped: {tmp_path / 'gone.png'}: no such file or folder")
    r = record(out)["inputs"]
    assert r["written"] == [] and r["failed"] == [{"path": str(tmp_path / "gone.png"),
                                                   "reason": "no such file or folder"}]


def bad_settings_model(folder: Path) -> Path:
    path = model_file(folder, name="bad.pt")
    blob = torch.load(path, weights_only=True)
    blob["settings"] = {"tta": True}  # no threshold
    torch.save(blob, path)
    return path


@pytest.mark.parametrize("case, argv, says", [
    ("out is a file", ["--out", "{tmp}/taken"], "--out {tmp}/taken: is a file"),
    ("no model", ["--model", "{tmp}/none.pt"], "--model {tmp}/none.pt: model file not found"),
    ("not a model", ["--model", "{tmp}/taken"], "--model {tmp}/taken: refused: not a busiseg"),
    ("bad settings", ["--model", "{tmp}/bad.pt"], "settings are unreadable"),
    ("threshold 2", ["--threshold", "2"], "--threshold: threshold must be in (0, 1)"),
    ("eval folder", ["--from-eval", "{tmp}"], "--from-eval {tmp}: is a folder"),
    ("eval missing", ["--from-eval", "{tmp}/no.json"], "not found"),
    ("presence auto", ["--presence-threshold", "auto"], "--presence-threshold auto"),
    ("presence 3", ["--presence-threshold", "3"], "--presence-threshold is '3'"),
    ("onnx on cuda", ["--model", "{tmp}/m.onnx", "--device", "cuda"], "--device cuda"),
])
def test_a_bad_argument_ends_in_one_line(tmp_path: Path, capsys, case, argv, says):
    model_file(tmp_path)
    bad_settings_model(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    a = image(tmp_path / "a.png")
    defaults = {"--model": str(tmp_path / "model.pt"), "--out": str(tmp_path / "out")}
    argv = [x.format(tmp=tmp_path) for x in argv]
    for key, value in defaults.items():
        if key not in argv:
            argv += [key, value]
    if "--threshold" not in argv and "--from-eval" not in argv:
        argv += ["--threshold", "0.5"]
    err = one_line_error(capsys, ["predict", str(a), *argv])
    assert says.format(tmp=tmp_path) in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cuda_without_a_gpu_ends_in_one_line(tmp_path: Path, capsys):
    err = one_line_error(capsys, ["predict", str(image(tmp_path / "a.png")), "--model",
                                  str(model_file(tmp_path)), "--out", str(tmp_path / "o"),
                                  "--threshold", "0.5", "--device", "cuda"])
    assert "--device is 'cuda'" in err and "use auto or cpu" in err


def test_argparse_refusals_and_version(capsys):
    for argv in (["predict", "a.png", "--out", "o", "--mask-values", "7"],
                 ["predict", "a.png", "--out", "o", "--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    for argv in (["--version"], ["predict", "--version"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == f"busiseg {busiseg_version()}"


def test_one_table_names_every_setting_in_every_file_that_carries_it():
    """metrics/eval.json's keys, a packaged model's or an export's settings, and the names files
    written before carry all read back to the same settings, and the record calls each field
    read from any of them by its source, never "default"."""
    from busiseg.inference.predict import field_sources
    from busiseg.inference.segment import EARLIER_NAMES, SETTINGS

    s = MaskSettings(0.3, True, True, True, None, ((0.1, 0.2), (0.9, 0.8)), "combined", 0.7,
                     0.25, True, 0.81)
    assert all(getattr(s, n) != getattr(MaskSettings(), n) for n in SETTING_NAMES
               if n != "presence_threshold")  # each field differs from its default
    eval_json = json.loads(json.dumps(s.eval_keys()))
    stored = json.loads(json.dumps(s.as_dict()))
    earlier = {EARLIER_NAMES.get(k, k): v for k, v in stored.items()}
    assert set(eval_json) == {SETTINGS[n][0] for n in SETTING_NAMES} | {"presence_rule"}
    for shape in (eval_json, stored, earlier):
        assert MaskSettings.from_dict(shape) == s
        assert "default" not in field_sources(shape, "file").values()
    assert eval_json["used_tta"] == 1 and eval_json["presence_rule"] == "expected"
    assert eval_json["presence_expected_dice"] == {"confidence": [0.1, 0.9], "dice": [0.2, 0.8]}
    assert field_sources({"threshold": 0.5}, "file")["presence_temperature"] == "default"
    with pytest.raises(KeyError, match="used_tta"):
        MaskSettings.from_dict({k: v for k, v in eval_json.items() if k != "used_tta"})


def test_a_model_under_the_expected_rule_records_it_and_continues(tmp_path: Path, capsys):
    """The expected-Dice rule travels in the packaged settings (model file version 2, which an
    older busiseg refuses rather than drop the gate): predict applies it, says so per image, and
    --continue recognises its own earlier run under it."""
    settings = MaskSettings(0.001, presence_temperature=0.5,
                            presence_expected_dice=((0.2, 0.1), (0.9, 0.95)))
    model = model_file(tmp_path, settings)
    blob = torch.load(model, weights_only=True)
    assert blob["version"] == 1  # a hand-made copy; the package stage writes 2 for this rule
    from busiseg.modeling.model_file import package_model, read_model_file

    packaged = package_model(model, tmp_path / "packaged.pt", settings.as_dict(), {})
    assert packaged["version"] == 2 and read_model_file(tmp_path / "packaged.pt")["version"] == 2
    inputs, out = tmp_path / "in", tmp_path / "out"
    image(inputs / "a.png")
    cli = ["predict", str(inputs), "--model", str(tmp_path / "packaged.pt"), "--out", str(out)]
    assert main(cli) == 0
    with open(out / "predictions.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["presence_rule"] == "expected" and row["presence_threshold"] == ""
    assert MaskSettings.from_dict(record(out)["settings"]) == settings
    image(inputs / "b.png", seed=1)
    capsys.readouterr()
    assert main([*cli, "--continue"]) == 0, capsys.readouterr().err
    assert [w["image"] for w in record(out)["inputs"]["written"]] == [str(inputs / "b.png")]


def test_continue_from_three_folders_keeps_every_image_path_resolvable(tmp_path: Path,
                                                                       monkeypatch):
    """Two images predicted from the data's folder, a third with --continue from another folder,
    a fourth from a third: every row's image path resolves wherever the reader stands (absolute,
    as predictions.json says), and an older folder whose rows are relative to its run's cwd comes
    back absolute too."""
    model = model_file(tmp_path)
    data = tmp_path / "data"
    for i in range(4):
        image(data / f"img_{i}.png", seed=i)
    out = tmp_path / "out"
    cli = ["--model", str(model), "--threshold", "0.5", "--continue", "--no-overlay"]
    runs = ((data, ["img_0.png", "img_1.png"]), (tmp_path / "elsewhere", ["../data/img_2.png"]),
            (tmp_path / "a" / "b", ["../../data/img_3.png"]))
    for here, args in runs:
        here.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(here)
        assert main(["predict", *args, "--out", os.path.relpath(out, here), *cli]) == 0
    monkeypatch.chdir(tmp_path / "a")  # a reader somewhere else again
    got = rows(out)
    assert [r["mask"] for r in got] == [f"img_{i}_mask.png" for i in range(4)]
    for i, r in enumerate(got):
        assert Path(r["image"]).is_absolute()
        assert Path(r["image"]).resolve() == (data / f"img_{i}.png").resolve()
    rec = record(out)
    assert rec["image_paths"] == "absolute"
    assert [Path(w["image"]).resolve() for w in rec["inputs"]["written"]] == [
        (data / "img_3.png").resolve()]
    # a folder an older busiseg wrote: rows relative to its cwd, no image_paths in its record
    with open(out / "predictions.csv", newline="") as fh:
        old = list(csv.DictReader(fh))
    for r in old:
        r["image"] = os.path.relpath(r["image"], data)
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(old[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(old)
    rec.pop("image_paths")
    rec["cwd"] = str(data)
    (out / "predictions.json").write_text(json.dumps(rec))
    image(data / "img_4.png", seed=4)
    assert main(["predict", "../data/img_4.png", "--out", str(out), *cli]) == 0  # from a/
    assert [Path(r["image"]).resolve() for r in rows(out)] == [
        (data / f"img_{i}.png").resolve() for i in range(5)]


def test_dicom_inputs_predict_every_frame_with_mm_sizes_and_a_dicom_seg(tmp_path: Path, capsys):
    """Every ultrasound DICOM of pydicom's test data that pydicom decodes predicts (a file that
    needs a missing decoder fails naming it); frames are images of their own; sizes come in mm
    where the file gives a region's pixel size; --dicom-seg's SEG holds the masks written."""
    data_store = pytest.importorskip("data_store")
    import highdicom as hd
    import pydicom

    inputs = tmp_path / "in"
    inputs.mkdir()
    files = ultrasound_dicoms()
    assert len(files) >= 20 and data_store
    for path in files:
        if not (inputs / path.name).exists():  # pydicom's own copies of some store files
            (inputs / path.name).write_bytes(path.read_bytes())
    out, model = tmp_path / "out", model_file(tmp_path, MaskSettings(threshold=0.5))
    assert main(["predict", "--model", str(model), str(inputs), "--out", str(out),
                 "--frames", "first", "--dicom-seg", "--no-overlay"]) == 1  # one input failed
    err = capsys.readouterr().err
    assert "JPGLosslessP14SV1_1s_1f_8b.dcm" in err and "pylibjpeg-libjpeg" in err
    by_mask = {r["mask"]: r for r in rows(out)}
    failed = {Path(f["path"]).name for f in record(out)["inputs"]["failed"]}
    assert failed == {"JPGLosslessP14SV1_1s_1f_8b.dcm"}  # every other one predicted
    assert len(by_mask) == len(list(inputs.iterdir())) - 1
    for path in inputs.iterdir():  # mm wherever the file gives a region's pixel size
        if path.name in failed:
            continue
        row = next(r for r in by_mask.values() if Path(r["image"].split("#")[0]) == path)
        known = pydicom.dcmread(path, stop_before_pixels=True, force=True).get(
            "SequenceOfUltrasoundRegions") is not None
        assert (row["area_mm2"] != "") == known, path.name
    assert mask(out, "US1_UNCR").shape == (480, 640)
    assert by_mask["US1_UNCR_mask.png"]["long_axis_mm"] == ""  # no pixel size in the file
    for name, pixel in (("OBXXXX1A_rle_2frame_f001", 0.262287877),
                        ("color3d_jpeg_baseline_f001", 0.510497056)):
        row = by_mask[f"{name}_mask.png"]
        assert row["image"].endswith(f"{name.rsplit('_f', 1)[0]}.dcm#f001")
        assert float(row["long_axis_mm"]) == pytest.approx(float(row["long_axis_px"]) * pixel,
                                                           abs=1e-3)
    for name in ("US1_UNCR", "OBXXXX1A_rle_2frame", "color3d_jpeg_baseline"):
        seg = hd.seg.segread(out / f"{name}_seg.dcm")
        source = pydicom.dcmread(inputs / f"{name}.dcm", stop_before_pixels=True)
        assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "busiseg" in str(seg.SegmentSequence[0].SegmentAlgorithmName)
        stem = name if name == "US1_UNCR" else f"{name}_f001"
        frame = seg.pixel_array if seg.pixel_array.ndim == 2 else seg.pixel_array[0]
        assert np.array_equal(frame > 0, mask(out, stem) > 0)
    assert not (out / "JPGLosslessP14SV1_1s_1f_8b_seg.dcm").exists()
    # a second run predicts the other frame of the loop; its own SEG outputs are not inputs
    out2 = tmp_path / "out2"
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # highdicom's warnings quote the patient's name: kept in
        assert main(["predict", "--model", str(model), str(inputs / "OBXXXX1A_rle_2frame.dcm"),
                     str(out), "--out", str(out2), "--frames", "2", "--no-overlay",
                     "--dicom-seg"]) == 1  # `out` holds no images
    assert f"{out}: folder holds no images" in capsys.readouterr().err
    written = sorted(r["mask"] for r in rows(out2))
    assert written == ["OBXXXX1A_rle_2frame_f002_mask.png"]
    assert any("_seg.dcm" in s["path"] and s["reason"] == "predict's own output"
               for s in record(out2)["inputs"]["skipped"])
