"""Checkpoints: a run killed mid-way resumes where it stopped and ends bit-identical (on CPU) to
an uninterrupted one, and nothing else is ever resumed by mistake.

A checkpoint is written after every completed epoch and carries a hash of everything the run
depends on; a finished run leaves only a small marker, so a later run cannot continue it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from busiseg.files import atomic_torch_save
from busiseg.params import Params
from busiseg.pipeline.deps import module_closure

FORMAT = "busiseg-checkpoint-v1"


def training_code() -> tuple[Path, ...]:
    """The library files a training run executes: the import closure of the training modules
    (cross_validation imports train), found the way dvc.yaml's deps of the train stage are
    (busiseg.pipeline.deps)."""
    return module_closure("busiseg.training.cross_validation")


def run_hash(p: Params, files: list[Path], fold: int | None = None) -> str:
    """What a checkpoint belongs to: every param that changes training, the input files and the
    training code: a run interrupted, then resumed after an edit to the loss, would otherwise
    continue the old code's weights under the new code's name. Each fold is a run of its own."""
    relevant = {k: asdict(getattr(p, k)) for k in ("model", "train", "augment")}
    # how many folds run at once changes no fold; the threads each gets do (cross_validation
    # writes them into train.threads), so a fold resumed with another count starts over
    for how_not_what in ("progress", "fold_workers"):
        relevant["train"].pop(how_not_what)
    relevant["fold"] = fold
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for f in [*training_code(), *files]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Progress:
    """Everything about a run that is not in the model, optimiser or schedule state."""

    epoch: int = 0  # epochs completed
    best_dice: float = -1.0
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)  # one row per completed epoch
    bad_epochs: int = 0
    seconds: float = 0.0


def save(path: Path, key: str, progress: Progress, model, optimizer, scheduler, scaler) -> None:
    atomic_torch_save({
        "format": FORMAT, "run_hash": key, "complete": False, "epoch": progress.epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "best_dice": progress.best_dice, "best_state": progress.best_state,
        "history": progress.history, "bad_epochs": progress.bad_epochs,
        "seconds": progress.seconds,
    }, path)


def resume(path: Path, key: str, model, optimizer, scheduler, scaler) -> Progress:
    """Load an unfinished checkpoint of this exact run into the given objects; else start fresh."""
    ckpt = load(path)
    if not ckpt or ckpt["run_hash"] != key or ckpt["complete"]:
        return Progress()
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return Progress(ckpt["epoch"], ckpt["best_dice"], ckpt["best_state"], ckpt["history"],
                    ckpt["bad_epochs"], ckpt["seconds"])


def mark_complete(path: Path, key: str, summary: dict | None = None,
                  history: list[dict] | None = None) -> None:
    """A finished run leaves only this marker, which is never resumed. A finished fold also
    keeps its summary and curves, so a cross-validation run killed in a later fold skips it."""
    atomic_torch_save({"format": FORMAT, "run_hash": key, "complete": True, "summary": summary,
                       "history": history}, path)


def finished_fold(path: Path, key: str) -> dict | None:
    """The marker of a fold of this exact run that finished, or None."""
    ckpt = load(path)
    if ckpt and ckpt["run_hash"] == key and ckpt["complete"] and ckpt.get("summary"):
        return ckpt
    return None


def load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a broken checkpoint is simply not resumed
        print(f"train: ignoring unreadable checkpoint {path}; starting from scratch")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return None
    return ckpt
