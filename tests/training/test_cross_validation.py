"""Cross-validation: out-of-fold predictions, fold ensembles, per-fold resume, intervals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Box, crafted_loaded, fold_data
from torch import nn

import busiseg.training.train as train_module
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import Loaded, evaluate_folds
from busiseg.evaluation.figures import bootstrap_ci
from busiseg.evaluation.plots import read_live_runs
from busiseg.inference.segment import Feed, binarize, predict_probabilities, probabilities
from busiseg.modeling.archs import FoldEnsemble
from busiseg.modeling.model_file import load_model, save_model
from busiseg.modeling.registry import build_model
from busiseg.params import parse_params
from busiseg.training.cross_validation import fold_workers, train_cross_validation

CPU = torch.device("cpu")
FEED = Feed(0.5, 0.25, CPU, 4)
SIZE = 32


def MarksItsFold(k: int) -> Box:  # noqa: N802 - reads as the crafted model it builds
    """Fold model k predicts a lesion on the first k + 1 rows: its predictions show its fold."""
    return Box(k + 1)


def loaded(members: list[nn.Module], cache_path: Path, split_path: Path) -> Loaded:
    return crafted_loaded(members, cache_path, split_path)


def test_each_out_of_fold_prediction_comes_from_the_model_that_never_saw_the_case(tmp_path):
    cache, split = fold_data(tmp_path)
    members = [MarksItsFold(k) for k in range(3)]
    p = parse_params({"split": {"folds": 3}, "evaluate": {"bootstrap": 200}})
    result = evaluate_folds(p, loaded(members, cache, split))
    cv = result["cv_per_image"]
    assert len(cv) == (pd.read_csv(split)["split"] == "cv").sum()
    assert np.allclose(cv["pred_area"], (cv["fold"] + 1) / SIZE)  # fold k ← member k alone
    # the ensemble averages probabilities: rows 0 and 1 are above 0.5 (3/3 and 2/3 members)
    assert np.allclose(result["per_image"]["pred_area"], 2 / SIZE)
    m = result["metrics"]
    assert m["folds"] == 3 and {"cv_dice", "cv_dice_pooled", "cv_dice_benign",
                                "cv_normal_empty_rate", "dice_single_mean"} <= set(m)
    singles = [m[f"dice_single_{k}"] for k in range(3)]
    assert m["dice_single_mean"] == pytest.approx(np.mean(singles), abs=1e-6)
    assert m["dice_ensemble_gain"] == pytest.approx(m["dice"] - np.mean(singles), abs=1e-5)
    for key in ("dice", "cv_dice", "dice_ensemble_gain"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key


def test_test_out_of_fold_and_external_scoring_share_one_chooser(tmp_path, monkeypatch):
    """evaluate.choose picks every setting: once per fold on the other folds, once on all
    out-of-fold images for test; the test figures apply exactly that MaskSettings, and what an
    external set or predict reads back from metrics/eval.json is the same setting."""
    import json

    import busiseg.evaluation.evaluate as evaluate_module
    from busiseg.inference.segment import MaskSettings

    calls = []
    real = evaluate_module.choose

    def spy(e, held):
        calls.append((len(held.truth), real(e, held)))
        return calls[-1][1]

    monkeypatch.setattr(evaluate_module, "choose", spy)
    cache, split = fold_data(tmp_path)
    p = parse_params({"split": {"folds": 3}, "evaluate": {
        "bootstrap": 50, "tune_threshold": True, "tta": True, "largest_cc": True,
        "select_on_val": True, "presence_threshold": "auto", "review_fraction": 0.2}})
    result = evaluate_folds(p, loaded([MarksItsFold(k) for k in range(3)], cache, split))
    sizes = pd.read_csv(split).query("split == 'cv'")["fold"].value_counts().sort_index()
    assert [n for n, _ in calls] == [sizes.sum() - sizes[k] for k in range(3)] + [sizes.sum()]
    chosen = calls[-1][1].settings
    assert result["settings"] == chosen
    m = result["metrics"]
    assert {k: m[k] for k in chosen.eval_keys()} == \
        {k: round(v, 6) if isinstance(v, float) else v for k, v in chosen.eval_keys().items()}
    (tmp_path / "eval.json").write_text(json.dumps(m))
    back = MaskSettings.from_eval(tmp_path / "eval.json")
    assert back.eval_keys() == {k: m[k] for k in chosen.eval_keys()}
    assert (back.threshold, back.tta, back.largest_cc, back.fill_holes,
            back.presence_threshold) == (chosen.threshold, chosen.tta, chosen.largest_cc,
                                         chosen.fill_holes, chosen.presence_threshold)


def test_an_ensemble_of_identical_members_predicts_what_the_member_predicts(tmp_path):
    torch.manual_seed(0)
    member = build_model("unet", base=4, depth=2).eval()
    ensemble = FoldEnsemble([member, copy.deepcopy(member), copy.deepcopy(member)]).eval()
    images = torch.randint(0, 256, (6, 1, SIZE, SIZE), dtype=torch.uint8)
    one = probabilities(member, images, FEED, tta=True)[:, 0].numpy()
    three = probabilities(ensemble, images, FEED, tta=True)[:, 0].numpy()
    assert np.abs(one - three).max() <= 1e-6
    assert np.array_equal(binarize(one, 0.5), binarize(three, 0.5))
    # one model file holds the members; loading it gives the ensemble back
    p = parse_params({"preprocess": {"size": SIZE}, "model": {"base": 4, "depth": 2}})
    save_model(tmp_path / "m.pt", ensemble.state_dict(), member.config, p, SIZE, members=3)
    again, blob = load_model(tmp_path / "m.pt")
    assert isinstance(again, FoldEnsemble) and blob["members"] == 3
    back = probabilities(again, images, FEED, tta=True)[:, 0].numpy()
    assert np.array_equal(back, three)


@pytest.mark.parametrize("presence", [False, True])
def test_one_pass_of_the_members_gives_the_ensemble_and_each_member_exactly(tmp_path, presence):
    """evaluate scores the ensemble and each member alone on test from one forward of every
    member: both must equal, bit for bit, what running each of them by itself gives (TTA on, a
    last batch shorter than the others)."""
    cache, split = fold_data(tmp_path)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model("unet", base=4, depth=2, presence=presence).eval())
    m = loaded(members, cache, split)
    m.batch_size = 1  # kept a chunk of 8 images at a time: 8 + 8 + 3, in batches of 4
    idx = list(range(19))
    forwards = [0]
    hooks = [member.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
             for member in members]
    joint, singles = m.predict_with_members(idx, tta=True)
    for hook in hooks:
        hook.remove()
    assert forwards[0] == 3 * 5 * 2  # members × batches (4 + 4, 4 + 4, 3) × (image, flip)
    alone = m.predict(m.model, idx, True)
    assert all(np.array_equal(a, b) for a, b in zip(joint, alone, strict=True))
    for member, single in zip(members, singles, strict=True):
        by_itself = m.predict(member, idx, True)
        assert all(np.array_equal(a, b) for a, b in zip(single, by_itself, strict=True))
    assert not np.array_equal(singles[0][0], singles[1][0])


def test_bootstrap_interval_is_seeded_and_contains_the_estimate():
    values = np.random.default_rng(0).uniform(0.3, 0.9, (40, 1))
    a = bootstrap_ci(values, lambda r: r[:, 0].mean(), 500, seed=3)
    assert a == bootstrap_ci(values, lambda r: r[:, 0].mean(), 500, seed=3)
    assert a != bootstrap_ci(values, lambda r: r[:, 0].mean(), 500, seed=4)
    assert a[0] < values.mean() < a[1]
    assert a[1] - a[0] < 0.2
    assert all(np.isnan(bootstrap_ci(values[:0], lambda r: r.mean(), 500)))


def cv_params(epochs: int = 4, workers: int = 1, folds: int = 3, **train):
    return parse_params({"preprocess": {"size": SIZE}, "model": {"base": 4, "depth": 2},
                         "split": {"folds": folds},
                         "train": {"epochs": epochs, "batch_size": 6, "lr": 0.01, "threads": 1,
                                   "warmup_epochs": 0, "fold_workers": workers, **train}})


def run_cv(tmp_path: Path, tag: str, workers: int = 1, **train) -> tuple[dict, Path]:
    cache, split = fold_data(tmp_path)
    out = tmp_path / tag
    metrics = train_cross_validation(cv_params(workers=workers, **train), cache, split,
                                     out / "model.pt", out / "checkpoints", out / "live")
    return metrics, out


TIMING = ("seconds", "images_per_s")


def same_run(a: dict, b: dict) -> bool:
    """Equal but for timings and how many folds ran at once."""
    def keep(m):
        return {k: v for k, v in m.items() if not k.endswith(TIMING) and k != "fold_workers"}
    return keep(a) == keep(b)


def kill_in_fold_1(tmp_path: Path, monkeypatch) -> None:
    """Run the folds in turn into tmp_path/killed and stop them as Ctrl-C would, after fold 1's
    second epoch (fold 0 has 4)."""
    calls = {"n": 0}
    log_epoch = train_module.log_epoch

    def killed_in_fold_1_epoch_2(live, row):
        log_epoch(live, row)
        calls["n"] += 1
        if calls["n"] == 4 + 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "log_epoch", killed_in_fold_1_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_cv(tmp_path, "killed")
    monkeypatch.setattr(train_module, "log_epoch", log_epoch)


def test_a_run_killed_in_a_later_fold_retrains_only_that_fold(tmp_path, monkeypatch, capsys):
    reference, ref_dir = run_cv(tmp_path, "uninterrupted")
    kill_in_fold_1(tmp_path, monkeypatch)
    capsys.readouterr()
    resumed, out = run_cv(tmp_path, "killed")
    said = capsys.readouterr().out
    assert "fold 0 already trained" in said and "fold 0 epoch" not in said
    assert "resuming fold 1 from epoch 2 of 4" in said and "fold 1 epoch   3/4" in said
    assert "fold 2 epoch   1/4" in said  # the fold not reached before the kill trains in full
    digest = torch.load(out / "model.pt", weights_only=True)["digest"]
    assert digest == torch.load(ref_dir / "model.pt", weights_only=True)["digest"]
    assert same_run(resumed, reference)
    ref_curves, curves = read_live_runs(ref_dir / "live"), read_live_runs(out / "live")
    assert list(curves) == ["fold 0", "fold 1", "fold 2"]
    for name in curves:
        pd.testing.assert_frame_equal(curves[name], ref_curves[name])
    # the finished run leaves no member file behind: a later run trains afresh
    assert not list((out / "checkpoints").glob("fold_*.pt"))


def test_folds_side_by_side_are_bit_identical_to_folds_in_turn(tmp_path, capfd):
    """Each fold in its own process computes what it computes alone with the same thread count:
    the ensemble's weights and every non-timing figure are the same; each process prints its
    fold's epochs and DVCLive keeps one folder per fold."""
    reference, ref_dir = run_cv(tmp_path, "in_turn", workers=1)
    capfd.readouterr()
    parallel, out = run_cv(tmp_path, "side_by_side", workers=2)
    said = capfd.readouterr().out
    assert "3 folds, 2 side by side with 1 thread(s) each" in said
    assert all(f"fold {k} epoch   4/4" in said for k in range(3))
    assert parallel["fold_workers"] == 2 and reference["fold_workers"] == 1
    assert parallel["threads"] == reference["threads"] == 1
    assert same_run(parallel, reference)
    digest = torch.load(out / "model.pt", weights_only=True)["digest"]
    assert digest == torch.load(ref_dir / "model.pt", weights_only=True)["digest"]
    ref_curves, curves = read_live_runs(ref_dir / "live"), read_live_runs(out / "live")
    assert list(curves) == ["fold 0", "fold 1", "fold 2"]
    for name in curves:
        pd.testing.assert_frame_equal(curves[name], ref_curves[name])


def test_seed_members_are_the_runs_of_their_seeds_averaged_per_fold(tmp_path):
    """train.seeds 2: fold k's member is a FoldEnsemble of the fold-k models of train.seed and
    train.seed + 1, each exactly what a one-seed run from that seed trains; out of fold an image
    meets its own fold's seeds only, and on test the ensemble is the mean over all of them."""
    seeded, out = run_cv(tmp_path, "seeds", epochs=2, seeds=2)
    one = {s: run_cv(tmp_path, f"seed{s}", epochs=2, seed=s)[1] for s in (0, 1)}
    model, blob = load_model(out / "model.pt")
    assert blob["members"] == 3 and blob["seeds"] == 2 and seeded["seeds"] == 2
    assert seeded["epochs_run"] == 3 * 2 * 2
    singles = {s: load_model(one[s] / "model.pt")[0] for s in (0, 1)}
    for k in range(3):
        for s in (0, 1):
            mine, theirs = model.members[k].members[s].state_dict(), \
                singles[s].members[k].state_dict()
            assert all(torch.equal(mine[n], theirs[n]) for n in theirs), (k, s)
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.inference_mode():
        want = torch.stack([torch.sigmoid(singles[s].members[k](x))
                            for k in range(3) for s in (0, 1)]).mean(0)
        assert torch.allclose(torch.sigmoid(model(x)[0]), want, atol=1e-6)
        fold_1 = torch.stack([torch.sigmoid(singles[s].members[1](x)) for s in (0, 1)]).mean(0)
        assert torch.allclose(torch.sigmoid(model.members[1](x)[0]), fold_1, atol=1e-6)
    assert sorted(read_live_runs(out / "live")) == sorted(
        f"fold {k} seed {s}" for k in range(3) for s in (0, 1))
    with pytest.raises(BusisegError, match="train.seeds"):
        parse_params({"train": {"seeds": 2}})  # no folds to average the seeds in


def test_a_run_killed_in_turn_resumes_side_by_side(tmp_path, monkeypatch, capfd):
    """Checkpoints are per fold and do not depend on how many folds run at once: a run killed
    in fold 1 resumes it from its last epoch in a process of its own, and ends identical."""
    reference, ref_dir = run_cv(tmp_path, "uninterrupted")
    kill_in_fold_1(tmp_path, monkeypatch)
    capfd.readouterr()
    resumed, out = run_cv(tmp_path, "killed", workers=3)
    said = capfd.readouterr().out
    assert "fold 0 already trained" in said and "fold 0 epoch" not in said
    assert "resuming fold 1 from epoch 2 of 4" in said and "fold 1 epoch   3/4" in said
    assert "fold 2 epoch   1/4" in said
    assert same_run(resumed, reference)
    digest = torch.load(out / "model.pt", weights_only=True)["digest"]
    assert digest == torch.load(ref_dir / "model.pt", weights_only=True)["digest"]


def test_validating_fewer_epochs_changes_no_fold_model(tmp_path):
    """train.val_every 3 of 4 epochs validates epochs 3 and 4 only; fold models are kept at their
    last epoch, so the ensemble is the same and only the curves have fewer points."""
    reference, ref_dir = run_cv(tmp_path, "every_epoch")
    sparse, out = run_cv(tmp_path, "every_third", val_every=3)
    digest = torch.load(out / "model.pt", weights_only=True)["digest"]
    assert digest == torch.load(ref_dir / "model.pt", weights_only=True)["digest"]
    assert all(sparse[f"fold_{k}_kept_val_dice"] == reference[f"fold_{k}_kept_val_dice"]
               for k in range(3))
    curves = read_live_runs(out / "live")["fold 0"]
    assert curves["val_dice"].notna().tolist() == [False, False, True, True]
    assert curves["train_loss"].notna().all()
    with pytest.raises(BusisegError, match="train.val_every must be 1 with train.patience"):
        parse_params({"train": {"val_every": 2, "patience": 3}})


def test_a_failing_fold_process_ends_the_run_in_its_one_line(tmp_path):
    cache, split = fold_data(tmp_path, folds=2)  # folds 0 and 1 only: fold 2 has no cases
    with pytest.raises(BusisegError, match="fold 2 and the other folds must both be non-empty"):
        train_cross_validation(cv_params(workers=3), cache, split, tmp_path / "m.pt",
                               tmp_path / "ck", tmp_path / "live")
    assert not (tmp_path / "m.pt").exists()


KILL_PARENT = """
import sys
from pathlib import Path
from busiseg.params import parse_params
from busiseg.training.cross_validation import train_cross_validation
p = parse_params({"preprocess": {"size": 32}, "model": {"base": 4, "depth": 2},
                  "split": {"folds": 3}, "train": {"epochs": 10000, "batch_size": 6,
                  "threads": 1, "fold_workers": 2}})
out = Path(sys.argv[3])
train_cross_validation(p, Path(sys.argv[1]), Path(sys.argv[2]), out / "m.pt", out / "ck",
                       out / "live")
"""


def start_side_by_side(tmp_path: Path, env: dict):
    """KILL_PARENT in a process of its own: two fold processes training for ever."""
    import subprocess
    import sys

    cache, split = fold_data(tmp_path)
    return subprocess.Popen([sys.executable, "-c", KILL_PARENT, str(cache), str(split),
                             str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_fold_processes_die_with_a_killed_parent(tmp_path, python_env):
    """SIGKILL leaves the parent no time to stop its folds; orphans would go on writing the
    checkpoints a resumed run reads, so the kernel kills them too."""
    import signal

    import psutil

    parent = start_side_by_side(tmp_path, python_env)
    for line in parent.stdout:  # wait until both folds train
        if "epoch   2/10000" in line:
            break
    children = psutil.Process(parent.pid).children()
    assert len(children) >= 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.pid for c in alive]


def test_a_fold_process_killed_ends_the_run_in_one_line_and_stops_the_others(tmp_path,
                                                                               python_env):
    """A fold that dies without a word (the out-of-memory killer, kill -9) is named with the
    signal and how to resume; the folds still running are stopped."""
    import signal

    import psutil

    parent = start_side_by_side(tmp_path, python_env)
    for line in parent.stdout:
        if "epoch   2/10000" in line:
            break
    folds = [c for c in psutil.Process(parent.pid).children()
             if "spawn_main" in " ".join(c.cmdline())]  # not multiprocessing's resource tracker
    assert len(folds) == 2
    folds[0].send_signal(signal.SIGKILL)
    said = parent.communicate(timeout=60)[0]
    assert parent.returncode != 0
    assert "training process was killed by signal 9" in said and "dvc repro" in said
    gone, alive = psutil.wait_procs(folds, timeout=10)
    assert not alive


def test_fold_workers_default_to_one_per_core_on_a_cpu(monkeypatch):
    import busiseg.training.cross_validation as cv

    def cfg(**train):
        return parse_params({"train": {"device": "cpu", **train}}).train

    monkeypatch.setattr(cv, "cpu_cores", lambda: 2)
    assert fold_workers(cfg(), 5) == 5  # all at once: none left alone on one core at the end
    assert fold_workers(cfg(), 10) == 2  # beyond 3 per core: one per core
    assert fold_workers(cfg(threads=2), 5) == 1  # two threads a fold fill both cores
    assert fold_workers(cfg(), 1) == 1
    assert fold_workers(cfg(fold_workers=4), 3) == 3  # never more than the folds
    assert fold_workers(cfg(processes=2), 5) == 1  # torchrun's processes already share the cores
    with pytest.raises(BusisegError, match="train.fold_workers and train.processes"):
        parse_params({"train": {"processes": 2, "fold_workers": 2}})


def test_an_ensembles_lesion_score_is_the_mean_of_its_members_scores():
    """Without presence heads each member's score is its most confident pixel; the ensemble's
    must be their mean (what the out-of-fold presence threshold was chosen on), not the maximum
    of the averaged map, which sits lower."""
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model("unet", base=4, depth=2).eval())
    images = torch.randint(0, 255, (5, 1, 32, 32), dtype=torch.uint8)
    singles = [predict_probabilities(m, images, FEED, tta=True)[1] for m in members]
    prob, score = predict_probabilities(FoldEnsemble(members), images, FEED, tta=True)
    assert torch.allclose(score, torch.stack(singles).mean(0), atol=1e-5)
    assert (score > prob.flatten(1).amax(1) + 1e-4).any()
