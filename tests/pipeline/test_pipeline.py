"""The pipeline through its real entry points: dvc repro, dvc exp run, and the stage scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    STAGES,
    TINY_PARAMS,
    busiseg,
    dvc,
    load_metrics,
    run,
    set_params,
    stale_stages,
    without_timing,
)
from PIL import Image

from busiseg.data.cache import load_cache
from busiseg.inference.confidence import calibrate
from busiseg.inference.onnx_model import load_onnx
from busiseg.inference.segment import Feed, MaskSettings, binarize, probabilities
from busiseg.modeling.model_file import load_model

pytestmark = pytest.mark.slow  # each test runs dvc on a copy of the repo


def test_repro_writes_every_output(pipeline):
    repo, first, metrics = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert set(metrics) == {"ingest.json", "split.json", "train.json", "classify.json",
                            "eval.json"}
    assert metrics["classify.json"] == {"kind": "none", "members": 0}  # off by default
    ingest = metrics["ingest.json"]
    assert ingest["n_images"] == 24 and ingest["n_problems"] == 0
    for key in ("n_masks", "n_multi_mask", "n_images_benign", "n_images_malignant",
                "n_images_normal", "n_duplicate_groups"):
        assert key in ingest
    for key in ("n_train", "n_val", "n_test"):
        assert metrics["split.json"][key] > 0
    for key in ("best_epoch", "best_val_dice", "best_val_iou", "epochs_run", "seconds",
                "images_per_s"):
        assert key in metrics["train.json"]
    for key in ("dice", "iou", "dice_pooled", "iou_pooled", "precision", "recall", "dice_benign",
                "dice_malignant", "normal_empty_rate", "normal_fp_area", "threshold"):
        assert key in metrics["eval.json"]
    for name in ("curves.png", "montage.png", "worst.png", "risk_coverage.png"):
        assert (repo / "plots" / "figures" / name).stat().st_size > 1000
    assert (repo / "plots" / "evaluate" / "per_image.csv").read_text().startswith(
        "case_id,class,dice,iou,lesion_area,pred_area")
    assert (repo / "models" / "model.pt").is_file()


def test_params_invalidate_only_the_stages_that_read_them(pipeline, python_env):
    """DVC re-runs a stage's dependents only when its outputs change, so the dry run names the
    first stage a change reaches; nothing upstream of it may appear. The package stage reads
    every section but plot's (its model card gives the command that makes the model again), so
    it is named beside the first stage of every change but a plot param's."""
    repo, _, _ = pipeline
    assert stale_stages(repo, python_env) == set()
    original = (repo / "params.yaml").read_text()
    try:
        for section, change, first in (("train", {"epochs": 7}, {"train"}),
                                       ("preprocess", {"size": 96}, {"preprocess"}),
                                       ("evaluate", {"tta": True}, {"evaluate"}),
                                       ("classify", {"epochs": 3}, {"classify"}),
                                       # classify records the split it was trained on
                                       ("split", {"seed": 5}, {"split", "classify"})):
            set_params(repo, **{section: change})
            assert stale_stages(repo, python_env) == {*first, "package"}, section
            (repo / "params.yaml").write_text(original)
        set_params(repo, plot={"n_worst": 3})
        assert stale_stages(repo, python_env) == {"plot"}
    finally:
        (repo / "params.yaml").write_text(original)


def _cache_size(repo: Path) -> int:
    with np.load(repo / "data" / "cache.npz") as z:
        return int(z["images"].shape[-1])


def test_editing_a_module_marks_exactly_the_stages_that_run_it(pipeline, python_env):
    """dvc status after a one-line edit: the Dice in evaluation/metrics.py picks train's kept
    epoch, scores evaluate and draws plot's risk–coverage curve (package reads evaluate's), so
    those change and classify, which never scores a mask, does not; data/split.py runs in the
    split stage alone."""
    import json

    repo, _, _ = pipeline

    def changed() -> set[str]:
        return set(json.loads(dvc(repo, python_env, "status", "--json").stdout))

    assert changed() == set()
    try:
        for module, stages in (("evaluation/metrics.py", {"train", "evaluate", "package",
                                                          "plot"}),
                               ("data/split.py", {"split"})):
            path = repo / "src" / "busiseg" / module
            original = path.read_text()
            path.write_text(original + "\n# an edit\n")
            assert changed() == stages, module
            path.write_text(original)
        assert changed() == set()
    finally:
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)


def test_a_size_sweep_is_never_served_another_size_from_the_run_cache(pipeline, python_env):
    """DVC leaves every key named `size` out of its run-cache key (treeverse/dvc#10296): with the
    size only in params, going back and forth between two sizes restored the first size's cache
    for the second, silently, and everything downstream trained on it."""
    repo, _, _ = pipeline
    size = TINY_PARAMS["preprocess"]["size"]
    try:
        for want in (size // 2, size, size // 2):  # each size is in the run cache the 2nd time
            set_params(repo, preprocess={"size": want})
            dvc(repo, python_env, "repro", "preprocess")
            assert _cache_size(repo) == want
    finally:  # back to the committed run for the tests after this one
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
        dvc(repo, python_env, "checkout", "-f")
    assert _cache_size(repo) == size
    # the command-line size exists for DVC only: one that disagrees with params.yaml is refused
    bad = run([sys.executable, "stages/preprocess.py", "--size", "48"], repo, python_env,
              check=False)
    assert bad.returncode == 1 and _cache_size(repo) == size
    assert bad.stderr.strip().splitlines() == [
        f"error: stages/preprocess.py got '--size 48' but params.yaml has preprocess.size {size}; "
        "run `dvc repro`"]


def test_onnx_export_predicts_what_pytorch_predicts_on_the_demo_test_split(pipeline, python_env,
                                                                         tmp_path):
    repo, _, metrics = pipeline
    onnx_path = tmp_path / "model.onnx"
    busiseg(["export", "--model", "models/model.pt", "--format", "onnx", "--out", onnx_path],
            repo)
    forward, meta = load_onnx(onnx_path)
    settings = MaskSettings.from_eval(repo / "metrics" / "eval.json")
    assert MaskSettings.from_dict(meta) == settings  # every setting, gate and flag included
    model, blob = load_model(repo / "models" / "model.pt")
    assert (meta["size"], meta["input_mean"], meta["input_std"]) == (
        blob["preprocess"]["size"], blob["preprocess"]["input_mean"],
        blob["preprocess"]["input_std"])

    split = pd.read_csv(repo / "data" / "split.csv", dtype={"case_id": str})
    test_ids = split.loc[split["split"] == "test", "case_id"].tolist()
    cache = load_cache(repo / "data" / "cache.npz")
    images = cache.images[torch.tensor(cache.indices(test_ids))]
    args = (images, Feed(meta["input_mean"], meta["input_std"], batch_size=4))
    for tta in (False, True):
        want = probabilities(model, *args, tta=tta)[:, 0].numpy()
        got = probabilities(forward, *args, tta=tta)[:, 0].numpy()
        assert np.abs(got - want).max() <= 1e-4
        # the tiny model's masks at evaluate's threshold may be all lesion, which would agree
        # with anything: also compare at thresholds inside the probabilities' range
        for t in (settings.threshold, *np.quantile(want, [0.3, 0.5, 0.7])):
            mask, other = binarize(want, t), binarize(got, t)
            near = np.abs(want - t) <= 1e-4  # where a 1e-4 difference may flip the pixel
            assert not ((mask != other) & ~near).any(), t
            assert t == settings.threshold or 0 < mask.mean() < 1
    middle = round(float(np.median(want)), 4)

    # the whole predict path on the raw test images: the .pt with evaluate's file, the .onnx alone
    manifest = pd.read_csv(repo / "data" / "manifest.csv", dtype={"case_id": str})
    raw = repo / "data" / "demo" / "Dataset_BUSI_with_GT"
    files = [str(raw / f) for f in manifest.set_index("case_id").loc[test_ids, "image"]]
    busiseg(["predict", "--model", "models/model.pt", "--out", tmp_path / "pt", *files], repo)
    out = busiseg(["predict", "--model", onnx_path, "--out", tmp_path / "onnx", *files],
                  tmp_path)
    assert "settings from" in out and "metadata" in out
    for f in files:
        name = f"{Path(f).stem}_mask.png"
        a = np.asarray(Image.open(tmp_path / "pt" / name))
        b = np.asarray(Image.open(tmp_path / "onnx" / name))
        assert np.array_equal(a, b), name
    # and at a threshold that splits the images: masks neither empty nor full, and equal but for
    # the odd pixel within ONNX Runtime's 1e-4 of it
    for kind, model_file in (("pt", "models/model.pt"), ("onnx", str(onnx_path))):
        busiseg(["predict", "--model", model_file, "--threshold", middle, "--out",
                 tmp_path / f"{kind}-mid", *files], repo)
    a, b = ([np.asarray(Image.open(tmp_path / f"{kind}-mid" / f"{Path(f).stem}_mask.png")) > 0
             for f in files] for kind in ("pt", "onnx"))
    lesion = np.mean([m.mean() for m in a])
    assert 0.05 < lesion < 0.95, lesion
    assert max((x != y).mean() for x, y in zip(a, b)) <= 1e-3
    assert metrics["eval.json"]["threshold"] == settings.threshold


def test_the_packaged_model_alone_predicts_the_masks_evaluate_scored(pipeline, python_env,
                                                                    tmp_path):
    """models/busiseg-model/model.pt, copied into an empty folder with no repository and no
    metrics/eval.json, and its ONNX export made there: `busiseg predict` on the test images (at
    the model's input size, as evaluate scored them) gives evaluate's test masks exactly. The
    tiny model's masks at evaluate's threshold may be all lesion, which any setting would match,
    so a copy packaged with a threshold inside its probabilities must give the masks evaluate's
    own path gives at that threshold."""
    import shutil
    from dataclasses import replace

    from busiseg.evaluation.evaluate import load
    from busiseg.modeling.model_file import package_model
    from busiseg.params import load_params

    repo, _, metrics = pipeline
    alone = tmp_path / "alone"
    alone.mkdir()
    packaged = repo / "models" / "busiseg-model" / "model.pt"
    shutil.copy(packaged, alone / "model.pt")
    scored = torch.load(repo / "data" / "predictions.pt", weights_only=True)
    idx = [int(i) for i in scored["test_idx"]]
    cache = load_cache(repo / "data" / "cache.npz")
    images = alone / "images"
    images.mkdir()
    for k, i in enumerate(idx):
        Image.fromarray(cache.images[i, 0].numpy()).save(images / f"case{k}.png")
    settings = MaskSettings.from_eval(repo / "metrics" / "eval.json")
    m = load(load_params(repo / "params.yaml"), packaged, repo / "data" / "cache.npz",
             repo / "data" / "split.csv")
    prob, scores = m.predict(m.model, idx, settings.tta)
    middle = replace(settings, threshold=round(float(np.median(prob)), 4))
    package_model(packaged, alone / "middle.pt", middle.as_dict(), {})
    # and one under the expected-Dice rule: its flat curve (q̂ the same for every image, as the
    # tiny model's confidences barely differ) keeps a mask iff the score beats a cut set in the
    # widest gap between the test images' scores (none near it for ONNX's 1e-4 to move across)
    ranked = np.sort(scores)
    gap = int(np.argmax(np.diff(ranked)))
    p_cut = float(calibrate((ranked[gap] + ranked[gap + 1]) / 2, 0.8))  # p at a temperature
    q0 = round((1 - p_cut) / p_cut, 6)
    expected = replace(middle, presence_threshold=None, presence_temperature=0.8,
                       presence_expected_dice=((0.0, q0), (1.0, q0)))
    package_model(packaged, alone / "expected.pt", expected.as_dict(), {})
    want = {"model": scored["pred"].numpy().astype(bool), "middle": middle.masks(prob, scores),
            "expected": expected.masks(prob, scores)}
    assert 0 < want["middle"].mean() < 1
    kept = want["expected"].reshape(len(idx), -1).any(axis=1)
    assert kept.any() and not kept.all() and want["middle"][~kept].any()  # the rule empties some
    for name in ("model", "middle", "expected"):
        busiseg(["export", "--model", f"{name}.pt", "--out", f"{name}.onnx"], alone)
        for kind in ("pt", "onnx"):
            out = busiseg(["predict", "--model", f"{name}.{kind}", "images", "--out",
                           f"{name}-{kind}"], alone)
            got = np.stack([np.asarray(Image.open(alone / f"{name}-{kind}" /
                                                  f"case{k}_mask.png")) > 0
                            for k in range(len(idx))])
            if kind == "pt":
                assert np.array_equal(got, want[name]), (name, out)
            else:  # ONNX Runtime's probabilities are PyTorch's within 1e-4
                near = np.abs(prob - (settings.threshold if name == "model"
                                      else middle.threshold)) <= 1e-4
                assert not ((got != want[name]) & ~near).any(), (name, out)
    assert not (alone / "metrics").exists()
    assert MaskSettings.from_dict(load_onnx(alone / "model.onnx")[1]) == settings
    assert metrics["eval.json"]["threshold"] == settings.threshold


def test_the_model_card_states_what_the_metrics_hold(pipeline):
    """The card beside the packaged model copies every headline figure from metrics/eval.json,
    says the demo data are synthetic, and gives the command that made it."""
    repo, _, metrics = pipeline
    card = (repo / "models" / "busiseg-model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "mit" and header["pipeline_tag"] == "image-segmentation"
    ev = metrics["eval.json"]
    figures = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    for key in ("dice", "dice_all", "detect_sensitivity", "detect_specificity", "aurc"):
        assert figures[key] == ev[key], key
        assert f"| {ev[key]} [{ev[key + '_ci_low']}, {ev[key + '_ci_high']}] |" in card, key
    assert "SYNTHETIC" in card and "not a medical device" in card
    assert "uv run dvc exp run" in card and "-S preprocess.size=" in card
    packaged = torch.load(repo / "models" / "busiseg-model" / "model.pt", weights_only=True)
    assert f"| threshold | {packaged['settings']['threshold']} |" in card


def test_the_trained_model_is_a_dvc_artifact(pipeline, python_env, tmp_path):
    """`dvc artifacts get` resolves a registered version (a GTO tag) to the packaged model: the
    model file with its settings, and its card."""
    repo, _, _ = pipeline
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    run(git + ["tag", "-a", "busiseg-model@v0.1.0", "-m", "first model"], repo, python_env)
    try:
        dvc(tmp_path, python_env, "artifacts", "get", str(repo), "busiseg-model", "-o",
            str(tmp_path / "busiseg-model"))
        packaged = repo / "models" / "busiseg-model"
        for name in ("model.pt", "README.md"):
            assert (tmp_path / "busiseg-model" / name).read_bytes() == (
                packaged / name).read_bytes()
    finally:
        run(["git", "tag", "-d", "busiseg-model@v0.1.0"], repo, python_env)


def test_two_clean_runs_give_identical_metrics(pipeline, python_env):
    repo, _, metrics = pipeline
    digest = torch.load(repo / "models" / "model.pt", weights_only=True)["digest"]
    again = dvc(repo, python_env, "repro", "-f")
    assert "Running stage 'train'" in again.stdout  # really re-ran, not restored from a cache
    assert without_timing(load_metrics(repo)) == without_timing(metrics)
    assert torch.load(repo / "models" / "model.pt", weights_only=True)["digest"] == digest
