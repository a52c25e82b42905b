from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, run_train, tiny_params

from busiseg.errors import BusisegError
from busiseg.evaluation.choose import PIECES, candidates
from busiseg.evaluation.evaluate import evaluate
from busiseg.inference.segment import MaskSettings
from busiseg.params import parse_params
from busiseg.research import normals, protocol
from busiseg.research.ablate import ablate
from busiseg.research.presets import PRESETS, apply_overrides, exp_command, load_presets


def test_every_committed_preset_is_valid_and_reproducible_as_one_command():
    presets = load_presets(PRESETS, REPO / "params.yaml")
    assert {"busi-cpu", "busi-gpu", "zoo-unet", "zoo-attention_unet", "zoo-res_unet",
            "zoo-unet_plus_plus", "zoo-compact"} <= set(presets)
    cmd = exp_command(presets["busi-cpu"], 2, "/data/BUSI")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "busi-cpu-s2"]
    flags = dict(f.split("=", 1) for f in cmd[6::2])
    assert flags["data.raw_dir"] == "/data/BUSI"
    assert flags["split.seed"] == flags["train.seed"] == "2"
    assert flags["evaluate.tta"] == "true"  # YAML booleans, as dvc -S parses them
    # a noise run: the same split trained from another seed, under its own experiment name
    noisy = exp_command(presets["busi-cpu"], 2, "/data/BUSI", train_seed=5)
    assert noisy[4] == "busi-cpu-s2-t5"
    noisy_flags = dict(f.split("=", 1) for f in noisy[6::2])
    assert (noisy_flags["split.seed"], noisy_flags["train.seed"]) == ("2", "5")
    assert {k: v for k, v in noisy_flags.items() if k != "train.seed"} == {
        k: v for k, v in flags.items() if k != "train.seed"}
    # the -S flags applied to params.yaml give exactly the preset's parameters
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    p = parse_params(apply_overrides(base, {k: yaml.safe_load(v) for k, v in flags.items()}))
    assert (p.preprocess.size, p.model.arch, p.train.epochs) == (128, "unet", 40)
    zoo = {n: parse_params(apply_overrides(base, presets[n].overrides))
           for n in presets if n.startswith("zoo-")}
    budgets = {(q.preprocess.size, q.train.epochs, q.train.batch_size, q.augment) for q in
               zoo.values()}
    assert len(budgets) == 1, "the zoo presets must share one budget"
    assert {q.model.arch for q in zoo.values()} == {"unet", "attention_unet", "res_unet",
                                                    "unet_plus_plus", "compact"}


def test_a_bad_preset_names_the_preset_and_key(tmp_path: Path):
    bad = tmp_path / "presets.yaml"
    bad.write_text("mine:\n  set:\n    train.epoch: 3\n")
    with pytest.raises(BusisegError, match="preset 'mine'.*did you mean 'train.epochs'"):
        load_presets(bad, REPO / "params.yaml")
    bad.write_text("mine:\n  set:\n    epochs: 3\n")
    with pytest.raises(BusisegError, match="'epochs' is not a parameter"):
        load_presets(bad, REPO / "params.yaml")
    bad.write_text("mine:\n  about: no overrides\n")
    with pytest.raises(BusisegError, match="preset 'mine' needs a 'set:'"):
        load_presets(bad, REPO / "params.yaml")


def test_ablation_covers_every_combination_and_matches_evaluate(tmp_path: Path):
    p = tiny_params()
    run_train(tmp_path, p)
    model, cache, split = tmp_path / "a" / "model.pt", tmp_path / "cache.npz", \
        tmp_path / "split.csv"
    table = ablate(p, model, cache, split)
    assert len(table) == 16
    assert len(table.drop_duplicates(["tta", "largest_cc", "fill_holes", "tune_threshold"])) == 16
    for tta, lcc in ((False, False), (True, True)):
        q = parse_params({"model": {"base": 4, "depth": 2},
                          "evaluate": {"tta": tta, "largest_cc": lcc, "tune_threshold": True}})
        m = evaluate(q, model, cache, split)["metrics"]
        row = table[(table.tta == tta) & (table.largest_cc == lcc) & ~table.fill_holes
                    & table.tune_threshold].iloc[0]
        assert row["dice"] == pytest.approx(m["dice"], abs=1e-6)
        assert row["threshold"] == pytest.approx(m["threshold"])
        assert row["val_dice"] == pytest.approx(m["val_dice"], abs=1e-6)

    # select_on_val: the best val Dice among the enabled pieces' subsets, applied to test
    model_kw = {"base": 4, "depth": 2}
    for enabled in (PIECES, ("tta",), ("largest_cc", "tune_threshold")):
        q = parse_params({"model": model_kw,
                          "evaluate": {"select_on_val": True, **{k: True for k in enabled}}})
        m = evaluate(q, model, cache, split)["metrics"]
        allowed = table[~table[[k for k in PIECES if k not in enabled]].any(axis=1)]
        assert len(allowed) == 2 ** len(enabled)
        assert m["val_dice"] == pytest.approx(allowed["val_dice"].max(), abs=1e-6)
        used = {k: bool(m[f"used_{k}"]) for k in PIECES}
        assert not any(used[k] for k in PIECES if k not in enabled)
        row = allowed[(allowed[list(PIECES)] == pd.Series(used)).all(axis=1)].iloc[0]
        assert row["val_dice"] == pytest.approx(m["val_dice"], abs=1e-6)
        assert row["dice"] == pytest.approx(m["dice"], abs=1e-6)


def test_select_on_val_candidates_are_subsets_of_the_enabled_pieces_simplest_first():
    def pieces(c: MaskSettings) -> tuple:
        return c.tta, c.largest_cc, c.fill_holes, c.tuned_threshold

    p = parse_params({"evaluate": {"tta": True, "fill_holes": True}})
    assert candidates(p.evaluate) == [MaskSettings(tta=True, fill_holes=True)]
    s = parse_params({"evaluate": {"tta": True, "fill_holes": True, "select_on_val": True}})
    got = [pieces(c) for c in candidates(s.evaluate)]
    assert got[0] == (False, False, False, False)
    assert got[-1] == (True, False, True, False)
    assert sorted(got) == sorted({(t, False, f, False) for t in (0, 1) for f in (0, 1)})


def test_normals_diagnostic_counts_confident_false_positives_and_smaller_lesions():
    stats = normals.stats

    prob = np.zeros((4, 10, 10), np.float32)
    true = np.zeros((4, 10, 10), bool)
    prob[0, :2, :5] = 0.95  # normal, confident false positive covering 10 %
    prob[1, 0, 0] = 0.6  # normal, faint 1-pixel false positive
    true[2, :1, :5] = True  # lesion of 5 %, found at 0.8
    prob[2, :1, :5] = 0.8
    true[3, :5, :5] = True  # lesion of 25 %, missed (peak 0.3)
    prob[3, :5, :5] = 0.3
    s = stats(prob, true, threshold=0.5)
    assert s == {"n_normal": 2, "n_normal_nonempty": 2, "n_normal_peak_ge_0.9": 1,
                 "median_normal_pred_area": 0.055, "n_lesion": 2,
                 "n_lesion_smaller_than_that": 1, "n_lesion_peak_lt_0.9": 2}


def _record(preset: str, overrides: dict, dice: dict, raw_dir: str = "/data/BUSI",
            commits: dict | None = None) -> dict:
    return {"preset": preset, "overrides": overrides, "raw_dir": raw_dir,
            "runs": {s: {"eval": {"dice": d, "normal_empty_rate": 0.5},
                         "train": {"seconds": 100.0 * (1 + len(overrides))},
                         "commit": (commits or {}).get(s)}
                     for s, d in dice.items()}}


def test_paired_gain_is_seed_by_seed_on_shared_splits_and_names_what_changed(monkeypatch):
    module = protocol

    base = _record("zoo-unet", {"model.arch": "unet", "model.base": 16},
                   {"0": 0.60, "1": 0.70, "2": 0.50}, commits={"0": "aaa", "1": "aaa"})
    # seed 3 has no baseline run: it must not enter the mean
    other = _record("piece-x", {"model.arch": "unet", "train.loss": "tversky",
                                "evaluate.tta": True}, {"0": 0.62, "1": 0.69, "3": 0.99},
                    commits={"0": "aaa", "1": "bbb"})
    r = module.paired(base, other, {"model.base": 16, "train.loss": "bce_dice",
                                    "evaluate.tta": False})
    assert list(r["gain"]) == ["0", "1"]
    assert r["gain"]["0"] == pytest.approx(0.02) and r["gain"]["1"] == pytest.approx(-0.01)
    assert r["mean"] == pytest.approx(0.005) and r["wins"] == 1
    # model.base is set by one preset only but equals the default: not a change
    assert r["changed"] == {"evaluate.tta": "true", "train.loss": "tversky"}
    # a pair trained by two commits is named: float order alone moves a run
    assert r["code"] == {"0": "same", "1": "aaa vs bbb"}
    assert "time_ratio" not in r  # not timed side by side: no speed claim
    assert module.paired(base, _record("p", {}, {"2": 0.5}), {})["code"] == {"2": "unknown"}
    # two commits whose training code is the same are a fair pair; otherwise the files are named
    diff = {("aaa", "bbb"): [], ("aaa", "ccc"): ["src/busiseg/losses.py"]}
    for co, want in (("bbb", "same"), ("ccc", "aaa vs ccc (src/busiseg/losses.py differ)")):
        o = _record("p", {}, {"0": 0.6}, commits={"0": co})
        assert module.paired(base, o, {}, lambda a, b: diff[(a, b)])["code"] == {"0": want}

    with pytest.raises(ValueError, match="same data"):
        module.paired(base, _record("p", {}, {"0": 0.6}, raw_dir="elsewhere"))
    with pytest.raises(ValueError, match="share no split seed"):
        module.paired(base, _record("p", {}, {"7": 0.6}))


def test_noise_summary_is_the_spread_over_training_seeds_on_one_split(monkeypatch, tmp_path):
    module = protocol
    rec = {**_record("zoo-unet", {}, {"0": 0.60, "1": 0.64, "2": 0.62},
                     commits={"0": "aaa", "1": "aaa", "2": "bbb"}), "split_seed": 0}
    n = module.noise_summary(rec)
    assert (n["n"], n["split_seed"], n["min"], n["max"]) == (3, 0, 0.60, 0.64)
    assert n["mean"] == pytest.approx(0.62) and n["sd"] == pytest.approx(0.02)
    assert n["commits"] == ["aaa", "bbb"]
    # a gain is the difference of two runs: sd * sqrt(2), and a mean over 2 splits halves variance
    assert module.noise_band(0.02, 1) == pytest.approx(2 * 0.02 * 2 ** 0.5)
    assert module.noise_band(0.02, 2) == pytest.approx(0.04)
    assert module.noise_summary({**rec, "runs": {"0": rec["runs"]["0"]}})["sd"] is None

    # training seeds only compare on one split: a record for another split is refused
    monkeypatch.setattr(module, "OUT", tmp_path)
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "zoo-unet.json").write_text('{"split_seed": 1, "runs": {}}')
    assert module._noise_path("zoo-unet", 1) == tmp_path / "noise" / "zoo-unet.json"
    with pytest.raises(SystemExit, match="split seed 1"):
        module._noise_path("zoo-unet", 0)


def test_protocol_names_the_presets_when_one_is_unknown(monkeypatch):
    module = protocol
    assert module.load_preset("busi-cpu-empty").name == "busi-cpu-empty"
    with pytest.raises(SystemExit) as exc:
        module.load_preset("busi-cpu-emtpy")
    message = str(exc.value)
    assert "no preset 'busi-cpu-emtpy'" in message and "busi-cpu-empty" in message
    assert "\n" not in message


def _workspace(root: Path, histories: list[list[float]], seconds: list[float]) -> Path:
    for k, hist in enumerate(histories):
        d = root / "dvclive" / "train" / f"fold_{k}" / "plots" / "metrics"
        d.mkdir(parents=True)
        (d / "val_dice.tsv").write_text("step\tval_dice\n" + "".join(
            f"{e + 1}\t{v}\n" for e, v in enumerate(hist)))
    train = {"folds": len(histories),
             **{f"fold_{k}_seconds": s for k, s in enumerate(seconds)},
             **{f"fold_{k}_epochs_run": len(h) for k, h in enumerate(histories)}}
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(json.dumps(train))
    return root


def test_time_to_quality_counts_epochs_to_the_reference_level_per_fold(tmp_path: Path):
    from busiseg.research.time_to_quality import read_run, time_to_quality

    # reference: 4 epochs of 60 s (the slower fold, 90 s/epoch, shared the machine)
    ref = _workspace(tmp_path / "ref", [[0.5, 0.7, 0.8, 0.75], [0.4, 0.6, 0.7, 0.7]], [240, 360])
    run = _workspace(tmp_path / "run", [[0.76, 0.9], [0.5, 0.71]], [30, 30])  # 15 s/epoch
    result = time_to_quality(*read_run(ref), *read_run(run))
    assert [f["level"] for f in result["folds"]] == [0.75, 0.7]
    assert [f["reference_epoch"] for f in result["folds"]] == [3, 3]
    assert [f["run_epoch"] for f in result["folds"]] == [1, 2]
    assert result["reference_min"] == 6.0 and result["run_min"] == 0.8  # (3+3)·60 s, (1+2)·15 s
    assert result["ratio"] == 0.125
    # mean over folds: reference 0.5 0.65 0.75 0.725 -> level 0.725 at epoch 3; run 0.63 0.805
    mean = result["mean_over_folds"]
    assert (mean["level"], mean["reference_epoch"], mean["run_epoch"]) == (0.725, 3, 2)
    assert (mean["reference_min"], mean["run_min"], mean["ratio"]) == (6.0, 1.0, 0.167)
    slow = _workspace(tmp_path / "slow", [[0.1, 0.2], [0.9, 0.9]], [30, 30])
    never = time_to_quality(*read_run(ref), *read_run(slow))
    assert never["folds"][0]["run_epoch"] is None and never["run_min"] is None
    with pytest.raises(SystemExit, match="same folds"):
        time_to_quality(*read_run(ref), [[0.9]], 1.0)


def test_paired_difference_pairs_images_and_keeps_lesion_images_by_default():
    from busiseg.research.paired import paired_difference

    ids = [f"c{i}" for i in range(40)]
    classes = ["normal" if i % 4 == 0 else "benign" for i in range(40)]
    rng = np.random.default_rng(1)
    a_dice = rng.uniform(0.5, 0.9, 40)
    a = pd.DataFrame({"case_id": ids, "class": classes, "dice": a_dice})
    # b is a minus 0.05 on every lesion image and equal on normals, listed in another order
    b = pd.DataFrame({"case_id": ids, "class": classes,
                      "dice": a_dice - np.where(np.array(classes) == "normal", 0, 0.05)})[::-1]
    out = paired_difference(a, b)
    assert out["n"] == 30 and out["difference"] == pytest.approx(0.05)
    assert out["ci_low"] == pytest.approx(0.05) and out["ci_high"] == pytest.approx(0.05)
    assert paired_difference(a, b, lesion_only=False)["difference"] == pytest.approx(0.0375)
    with pytest.raises(BusisegError, match="different images"):
        paired_difference(a, b.iloc[1:])


def test_presence_decisions_refit_per_fold_and_separate_what_the_score_separates():
    from busiseg.research.decisions import decide

    rng = np.random.default_rng(0)
    n = 200
    lesion = np.arange(n) % 4 != 0
    table = pd.DataFrame({
        "case_id": [f"c{i}" for i in range(n)],
        "class": np.where(lesion, "benign", "normal"),
        "fold": np.arange(n) % 5,
        # every normal gets a (wrong) mask: Dice 0; lesion images are segmented fairly well
        "dice": np.where(lesion, rng.uniform(0.6, 0.9, n), 0.0),
        "pred_area": 0.1,
        "image_score": np.where(lesion, rng.uniform(0.7, 1.0, n), rng.uniform(0.0, 0.3, n)),
        "confidence": rng.uniform(0.5, 1.0, n),
    })
    out = decide(table)
    assert out["off"]["cv_dice_all"] == pytest.approx(table["dice"].mean(), abs=1e-6)
    assert out["off"]["specificity"] == 0.0 and out["off"]["sensitivity"] == 1.0
    for rule in ("auto", "every_score", "expected"):  # the score separates: every rule finds it
        assert out[rule]["specificity"] == 1.0, rule
        # the cut at the lowest held-out lesion score may drop a lesion a hair below it
        assert out[rule]["sensitivity"] >= (0.98 if rule == "every_score" else 1.0), rule
        assert out[rule]["cv_dice_all"] > out["off"]["cv_dice_all"] + 0.2
    with pytest.raises(BusisegError, match="no fold column"):
        decide(table.drop(columns="fold"))


def test_the_committed_model_card_states_its_record_s_figures_exactly():
    """docs/results/cards/busi-lite0-cv5.md is what the package stage wrote for the recorded
    busi-lite0-cv5 run: every figure it states is the protocol record's, to the last digit, and
    a figure the record lacks fails (the card may state nothing the record cannot back)."""
    from busiseg.evaluation.card import HEADLINE, _figure

    card = (REPO / "docs" / "results" / "cards" / "busi-lite0-cv5.md").read_text()
    run = json.loads((REPO / "docs" / "results" / "protocol" / "busi-lite0-cv5.json")
                     .read_text())["runs"]["0"]
    record = run["eval"]
    header = yaml.safe_load(card.split("---")[1])
    stated = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert {"dice", "dice_all", "detect_auroc", "aurc", "hd95", "nsd"} <= set(stated)
    for key, value in stated.items():
        assert f"cv_{key}" in record, f"the card states cv_{key}, which the record lacks"
        assert value == record[f"cv_{key}"], key
    what = dict(HEADLINE)
    table = [ln for ln in card.split("## Results")[1].split("\n\n")[1].splitlines()[2:]]
    assert len(table) >= 8
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = next((k for k, w in what.items() if w == cells[0]), None)
        assert key is not None, f"the card's row {cells[0]!r} is no headline figure"
        for cell, name in ((cells[1], f"cv_{key}"), (cells[2], key)):
            if cell != "n/a":
                assert name in record, f"the card states {name}, which the record lacks"
                assert cell == _figure(record, name), name
    settings = dict(ln.strip("|").split("|")[:2] for ln in
                    card.split("## Settings predict applies")[1].split("## ")[0].splitlines()[3:]
                    if ln.startswith("|"))
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    assert settings["threshold"] == str(record["threshold"])
    # the card names the setting as the package stage did when it ran (before: "temperature")
    assert settings.get("presence_temperature", settings.get("temperature")) == str(
        record["presence_temperature"])
    train = run["train"]
    assert f"{train['threads']} thread(s)" in card and f"kernels {train['kernel_isa']}" in card
    assert f" in {train['wall_seconds']} s" in card
    assert run["command"].removeprefix("uv run ").split(" -S ", 1)[0].startswith("dvc exp run")
    for pin in ("-S train.threads=2", "-S train.cpu_isa=avx2"):  # the card's command carries them
        assert pin in card.split("```")[1] and pin in run["command"]
    assert "not a medical device" in card and "Baheya" in card


def test_presence_from_another_run_takes_its_scores_image_by_image():
    from busiseg.research.decisions import with_presence_from

    masks = pd.DataFrame({"case_id": ["a", "b", "c"], "image_score": [0.1, 0.2, 0.3],
                          "dice": [0.5, 0.6, 0.7]})
    head = pd.DataFrame({"case_id": ["c", "a", "b"], "image_score": [0.9, 0.7, 0.8]})
    got = with_presence_from(masks, head)
    assert got["image_score"].tolist() == [0.7, 0.8, 0.9] and got["dice"].tolist() == [0.5, 0.6,
                                                                                          0.7]
    with pytest.raises(BusisegError, match="different images"):
        with_presence_from(masks, head.iloc[:2])
