"""Shared fixtures: small BUSI-layout datasets built in temp dirs, a temp copy of the repo, and a
tiny cached dataset to train on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from busiseg.data.cache import load_cache, save_cache
from busiseg.evaluation.evaluate import Loaded
from busiseg.evaluation.plots import read_live_curves
from busiseg.inference.segment import Feed, predict_probabilities
from busiseg.modeling.archs import FoldEnsemble
from busiseg.params import parse_params
from busiseg.training.train import train

REPO = Path(__file__).resolve().parents[1]
REAL_BUSI = REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT"

# parameters that make the whole pipeline run in seconds
TINY_PARAMS = {
    "demo": {"n_benign": 10, "n_malignant": 8, "n_normal": 6, "min_size": 64, "max_size": 96},
    "preprocess": {"size": 64},
    "model": {"base": 4, "depth": 3},
    # folds one after another in the test's process: side by side is tested on its own
    "train": {"epochs": 3, "batch_size": 8, "threads": 1, "fold_workers": 1},
    "plot": {"n_montage": 3, "n_worst": 2},
}


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path)
    return path


def make_case(root: Path, cls: str, n: int, size=(40, 32), n_masks: int = 1, lesion=True,
              mask_mode: str = "1", seed: int = 0) -> tuple[Path, list[Path]]:
    """One image (dark disc on speckle) with its mask files, BUSI naming."""
    rng = np.random.default_rng(seed + n * 7 + len(cls))
    w, h = size
    img = rng.integers(80, 200, size=(h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for k in range(n_masks):
        cx, cy = (w // 3) * (1 + k % 2), h // 2
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= (min(w, h) // 6) ** 2) & lesion
        img[disc] = 20
        name = f"{cls} ({n})_mask.png" if k == 0 else f"{cls} ({n})_mask_{k}.png"
        masks.append(write_png(root / cls / name, (disc * 255).astype(np.uint8), mask_mode))
    image = write_png(root / cls / f"{cls} ({n}).png", img)
    return image, masks


@pytest.fixture
def small_busi(tmp_path: Path) -> Path:
    """3 classes × 4 cases, one multi-mask case; a valid dataset to break in tests."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for n in range(1, 5):
            make_case(root, cls, n, n_masks=2 if (cls, n) == ("benign", 1) else 1,
                      lesion=cls != "normal", mask_mode="RGB" if cls == "normal" else "1")
    return root


@pytest.fixture(scope="session")
def python_env() -> dict:
    return python_environment()


def python_environment() -> dict:
    """Environment whose PATH finds this interpreter's `python` and `dvc` first."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CI"] = "true"
    env.pop("DVC_ANALYTICS", None)
    return env


def copy_repo(dest: Path, params: dict | None = None) -> Path:
    """A fresh git+DVC repo with the project's tracked files and (optionally) merged params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if not src.is_file() or f.startswith(("metrics/", "plots/", "dvclive/")) or f == "dvc.lock":
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
    if params:
        merged = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in params.items():
            merged.setdefault(section, {}).update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "init"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def busiseg(args: list, cwd: Path) -> str:
    """`busiseg ARGS` run from `cwd` in this process, its exit code checked, its output returned:
    what the command line does, without the seconds a fresh Python spends importing PyTorch."""
    import contextlib
    import io

    from busiseg.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(here)
    if code != 0:
        raise AssertionError(f"busiseg {' '.join(map(str, args))} failed ({code}):\n"
                             f"{out.getvalue()}\n{err.getvalue()}")
    return out.getvalue()


TIMING_KEYS = {"seconds", "images_per_s"}
STAGES = ("demo", "ingest", "preprocess", "split", "train", "classify", "evaluate", "package",
          "plot")


def dvc(repo: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo, env, check=check)


def load_metrics(repo: Path) -> dict:
    return {f.name: json.loads(f.read_text()) for f in sorted((repo / "metrics").glob("*.json"))}


def without_timing(metrics: dict) -> dict:
    return {name: {k: v for k, v in m.items() if k not in TIMING_KEYS}
            for name, m in metrics.items()}


def set_params(repo: Path, **changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stale_stages(repo: Path, env: dict) -> set[str]:
    """Stages that `dvc repro` would run now (a dry run executes nothing)."""
    out = dvc(repo, env, "repro", "--dry").stdout
    return {s for s in STAGES if f"Running stage '{s}'" in out}


def built_pipeline(tmp_path_factory, env: dict) -> Path:
    """One tiny end-to-end run of the repository with TINY_PARAMS, committed, its outputs in its
    DVC cache: built once per session, under a lock that pytest-xdist's workers share (by the
    controller as soon as a worker has collected a test that uses it, else by the first test
    that asks); never changed, only copied (`copy_built`)."""
    base = tmp_path_factory.getbasetemp()
    return build_pipeline(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base, env)


# the tests that copy the built pipeline, for pytest-xdist's controller to start it early
BUILT_PIPELINE_USERS = ("tests/pipeline/test_pipeline.py::",
                        "tests/pipeline/test_pipeline_runs.py::",
                        "tests/pipeline/test_remotes.py::",
                        "tests/runtime/test_scale_out.py::test_the_queue_runs")
_controller: dict = {}


def pytest_configure(config):
    _controller["config"] = config


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's: absent when it is not loaded
def pytest_xdist_node_collection_finished(node, ids):
    """On pytest-xdist's controller, which runs no test: once a worker has collected the tests,
    the built pipeline starts building here, beside the workers, rather than on the first
    worker that needs it while the other one waits for it."""
    if "thread" in _controller or not any(i.startswith(BUILT_PIPELINE_USERS) for i in ids):
        return
    import threading

    root = _controller["config"]._tmp_path_factory.getbasetemp()
    _controller["thread"] = threading.Thread(target=build_pipeline,
                                             args=(root, python_environment()), daemon=True)
    _controller["thread"].start()


def build_pipeline(root: Path, env: dict) -> Path:
    from filelock import FileLock

    built = root / "tiny-pipeline"
    with FileLock(f"{built}.lock"):
        if not (built / "repro.json").is_file():
            repo = copy_repo(Path(tempfile.mkdtemp(dir=built.parent)), TINY_PARAMS)
            first = dvc(repo, env, "repro")
            git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
            run(git + ["add", "-A"], repo, env)
            run(git + ["commit", "-qm", "run"], repo, env)
            shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)  # locks, state: this path's
            repo.rename(built)
            (built / "repro.json").write_text(json.dumps({"stdout": first.stdout,
                                                          "stderr": first.stderr}))
    return built


def copy_built(built: Path, dest: Path) -> Path:
    """A copy of the built tiny pipeline to change at will: a git repository whose committed
    run DVC finds up to date, so a param change re-runs only the stages that read it."""
    shutil.copytree(built, dest, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("repro.json"))
    return dest


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, python_env):
    """The built tiny run, copied for one test module on each pytest-xdist worker that runs
    one of its tests, so that no module sees another's changes."""
    built = built_pipeline(tmp_path_factory, python_env)
    repo = copy_built(built, tmp_path_factory.mktemp("repo"))
    first = json.loads((built / "repro.json").read_text())
    return repo, subprocess.CompletedProcess(["dvc", "repro"], 0, **first), load_metrics(repo)


# ---- a tiny cached dataset and training run, for the library-level tests ------------------


def tiny_data(tmp_path: Path, n: int = 24, size: int = 32) -> tuple[Path, Path]:
    """Dark discs on noise (every fourth image without a lesion), cached and split."""
    rng = np.random.default_rng(0)
    images = rng.integers(120, 220, (n, 1, size, size)).astype(np.uint8)
    masks = np.zeros((n, 1, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    classes = []
    for i in range(n):
        if i % 4 == 3:
            classes.append("normal")
            continue
        cx, cy, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(3, 7))]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        images[i, 0][disc] = rng.integers(10, 60, disc.sum())
        masks[i, 0][disc] = 1
        classes.append("benign" if i % 2 else "malignant")
    ids = [f"c{i}" for i in range(n)]
    save_cache(tmp_path / "cache.npz", images, masks, ids, classes)
    split = ["val" if i % 6 == 0 else "test" if i % 6 == 1 else "train" for i in range(n)]
    pd.DataFrame({"case_id": ids, "class": classes, "dup_group": range(n), "split": split,
                  "fold": -1}).to_csv(tmp_path / "split.csv", index=False)
    return tmp_path / "cache.npz", tmp_path / "split.csv"


def tiny_params(**train):
    return parse_params({"preprocess": {"size": 32}, "model": {"base": 4, "depth": 2},
                         "train": {"epochs": 6, "batch_size": 6, "lr": 0.01, "threads": 1,
                                   "warmup_epochs": 0, **train}})


def run_train(tmp_path: Path, p, tag: str = "a") -> dict:
    cache, split = tiny_data(tmp_path)
    out = tmp_path / tag
    out.mkdir(exist_ok=True)
    metrics = train(p, cache, split, out / "model.pt", out / "ckpt.pt", out / "live")
    metrics["curves"] = read_live_curves(out / "live")
    return metrics


# ---- crafted fold models: out-of-fold scoring whose every prediction is known -----------------


def fold_data(tmp_path: Path, folds: int = 3) -> tuple[Path, Path]:
    """tiny_data with every non-test case in one of `folds` folds."""
    cache, split = tiny_data(tmp_path)
    s = pd.read_csv(split, dtype={"case_id": str})
    cv = s["split"] != "test"
    s.loc[cv, "split"] = "cv"
    s.loc[cv, "fold"] = np.arange(cv.sum()) % folds
    s.to_csv(split, index=False)
    return cache, split


class Box(nn.Module):
    """A lesion over the first `rows` image rows (and `cols`) whatever the image: each crafted
    fold model draws its own, so a prediction shows which one made it."""

    def __init__(self, rows: int, cols: slice = slice(None)) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.config = {"arch": "crafted"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full_like(x, -20.0)
        logits[..., : self.rows, self.cols] = 20.0
        return logits


def crafted_loaded(members: list[nn.Module], cache_path: Path, split_path: Path,
                   spacing: np.ndarray | None = None) -> Loaded:
    """What evaluate.load returns, for crafted members instead of a model file."""
    cache = load_cache(cache_path)

    def predict(forward, idx, tta):
        prob, score = predict_probabilities(forward, cache.images[torch.tensor(idx)],
                                            Feed(0.5, 0.25, batch_size=4), tta=tta)
        return prob[:, 0].numpy(), score.numpy()

    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    return Loaded(FoldEnsemble(members), members, cache, split, predict, spacing=spacing,
                  batch_size=4)


def ultrasound_dicoms() -> list[Path]:
    """Every ultrasound DICOM file of pydicom's test data: its own and the pydicom-data
    package's (empty without that package)."""
    import warnings

    import pydicom

    try:
        import data_store
    except ImportError:
        return []
    own = Path(pydicom.data.__file__).parent / "test_files"
    store = Path(data_store.__file__).parent / "data"
    out = []
    for path in sorted(store.iterdir()) + sorted(own.glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - not a DICOM file of the store
            continue
        if str(ds.get("Modality", "")) == "US":
            out.append(path)
    return out
