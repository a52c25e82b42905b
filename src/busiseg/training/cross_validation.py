"""Cross-validation training: K fold models, one after another or side by side.

On a CPU of a few cores a small network does not use two threads twice as well as one (the
depthwise convolutions of EfficientNet-Lite0 at 128 px barely gain from a second thread), so the
K folds finish sooner as separate processes of one thread each than in turn on all the cores
(`train.fold_workers`; measured in docs/performance.md). Each fold keeps its own checkpoint, so a
run killed anywhere resumes every fold where it stopped, and a fold computes exactly what it
computes trained alone with the same thread count (`-S train.threads=N -S train.fold_workers=1`).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from pathlib import Path

import torch

from busiseg.errors import BusisegError
from busiseg.modeling.model_file import model_kwargs, save_model, split_identity
from busiseg.params import Params, TrainParams
from busiseg.runtime import distributed
from busiseg.runtime.device import pick_device
from busiseg.runtime.placement import (
    OVERSUBSCRIBE,
    cpu_cores,
    cpu_threads,
    die_with_parent,
    queue_slot,
)
from busiseg.training.train import train

SUMMED = ("epochs_run", "seconds")  # per-fold figures the run reports summed


@dataclass(frozen=True)
class Member:
    """One network of the run: fold k's, from seed train.seed + s (s = 0 with train.seeds 1,
    whose files keep the plain fold names)."""

    fold: int
    seed: int
    seeds: int

    @property
    def name(self) -> str:
        return f"fold_{self.fold}" if self.seeds == 1 else f"fold_{self.fold}_seed_{self.seed}"

    def params(self, p: Params) -> Params:
        return replace(p, train=replace(p.train, seed=p.train.seed + self.seed))


def members_of(p: Params) -> list[Member]:
    return [Member(k, s, p.train.seeds) for k in range(p.split.folds)
            for s in range(p.train.seeds)]


def fold_workers(cfg: TrainParams, folds: int) -> int:
    """train.fold_workers, or (0) what measurement chose. On a CPU, folds of one thread all at
    once when that is at most OVERSUBSCRIBE processes per core, else one per core (one per
    train.threads cores when that is more than one): two one-thread processes out-train one
    two-thread process, and five one-thread folds on two cores finish sooner all at once than
    two at a time, which leaves the fifth alone on one core (bench.py levers,
    docs/performance.md). On a GPU one fold at a time, which a single fold already keeps
    busy."""
    if cfg.fold_workers:
        return min(cfg.fold_workers, folds)
    if cfg.processes > 1 or pick_device(cfg.device, "train.device").type != "cpu":
        return 1
    slots = max(1, cpu_cores() // (queue_slot().workers * max(1, cfg.threads)))
    if cfg.threads > 1:  # threads of several processes on one core wait for each other
        return min(folds, slots)
    return folds if folds <= OVERSUBSCRIBE * slots else slots


def train_cross_validation(p: Params, cache_path: Path, split_path: Path, model_path: Path,
                           folds_dir: Path, live_dir: Path) -> dict:
    """K fold models (× train.seeds), each trained, checkpointed and resumed on its own in
    `folds_dir` (kept by DVC across a kill), so a run killed during fold 3 re-trains none of
    folds 0-2. The finished members become one model file; their own files go, so a later run
    starts afresh."""
    members = members_of(p)
    folds_dir.mkdir(parents=True, exist_ok=True)
    workers = fold_workers(p.train, len(members))
    start = time.perf_counter()
    if workers == 1:
        summaries = [train_member(p, m, cache_path, split_path, folds_dir, live_dir)
                     for m in members]
    else:
        threads = cpu_threads(p.train.threads, workers, queue_slot())
        seeds = f" × {p.train.seeds} seeds" if p.train.seeds > 1 else ""
        print(f"train: {p.split.folds} folds{seeds}, {workers} side by side with {threads} "
              "thread(s) each; each prints its own epochs", flush=True)
        q = replace(p, train=replace(p.train, threads=threads, progress="off"))
        summaries = side_by_side(q, members, cache_path, split_path, folds_dir, live_dir,
                                 workers)
    wall = time.perf_counter() - start
    if not distributed.current().main:
        return {}  # rank 0 assembles and writes the ensemble
    assemble(p, members, folds_dir, model_path, split_path)
    seconds = sum(s["seconds"] for s in summaries)
    images = sum(s["seconds"] * (s["images_per_s"] or 0) for s in summaries)
    first_seed = [s for m, s in zip(members, summaries) if m.seed == 0]
    return {
        "folds": p.split.folds,
        **({"seeds": p.train.seeds} if p.train.seeds > 1 else {}),
        "epochs_run": sum(s["epochs_run"] for s in summaries),
        "seconds": round(seconds, 2),  # summed over the members, side by side or not
        "images_per_s": round(images / seconds, 2) if seconds else None,  # per training process
        "wall_seconds": round(wall, 2),
        "wall_images_per_s": round(images / wall, 2) if wall else None,
        "fold_workers": workers,
        **{key: summaries[0][key] for key in ("device", "processes", "threads", "amp",
                                                "kernel_isa", "n_params")},
        **{f"fold_{k}_{key}": s[key] for k, s in enumerate(first_seed)
           for key in ("kept_val_dice", "epochs_run", "seconds")},
    }


def train_member(p: Params, m: Member, cache_path: Path, split_path: Path, folds_dir: Path,
                 live_dir: Path) -> dict:
    return train(m.params(p), cache_path, split_path, folds_dir / f"{m.name}.pt",
                 folds_dir / f"{m.name}.ckpt", live_dir / m.name, fold=m.fold)


def assemble(p: Params, members: list[Member], folds_dir: Path, model_path: Path,
             split_path: Path) -> None:
    """The member files as one FoldEnsemble model file: fold k's seeds as member k, itself a
    FoldEnsemble of them, so out of fold an image meets its own fold's seeds only."""
    state, size, source = {}, None, None
    for m in members:
        blob = torch.load(folds_dir / f"{m.name}.pt", map_location="cpu", weights_only=True)
        prefix = f"members.{m.fold}." + (f"members.{m.seed}." if m.seeds > 1 else "")
        state.update({prefix + name: t for name, t in blob["state_dict"].items()})
        size, source = blob["preprocess"]["size"], blob.get("encoder_weights")
    kwargs = model_kwargs(p.model, presence=p.train.presence_weight > 0,
                          channels=p.preprocess.channels)
    save_model(model_path, state, kwargs, p, size, members=p.split.folds,
               encoder_weights=source, split=split_identity(p, split_path),
               seeds=p.train.seeds)
    for m in members:
        (folds_dir / f"{m.name}.pt").unlink()


def side_by_side(p: Params, members: list[Member], cache_path: Path, split_path: Path,
                 folds_dir: Path, live_dir: Path, workers: int) -> list[dict]:
    """Train the members in `workers` processes at once, each taking the next as one ends.
    The first to fail stops the others (their checkpoints keep what they had done)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no OpenMP pool inherited mid-use
    todo, running, done = list(range(len(members))), {}, {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                i = todo.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_member_process, name=f"busiseg-{members[i].name}",
                                   args=(send, p, members[i], cache_path, split_path,
                                         folds_dir, live_dir))
                proc.start()
                send.close()
                running[i] = (proc, receive)
            # a member's report is read as soon as it comes (a long one never blocks the
            # child); a member that ended without one died (killed, out of memory)
            ready = set(wait([x for proc, receive in running.values()
                              for x in (receive, proc.sentinel)]))
            for i in [i for i, (proc, receive) in running.items()
                      if receive in ready or proc.sentinel in ready]:
                proc, receive = running.pop(i)
                message = _report(receive)
                receive.close()
                proc.join()
                if message[0] != "done":
                    _fail(members[i], proc.exitcode, *message)
                done[i] = message[1]
    finally:
        for proc, receive in running.values():
            proc.terminate()
            receive.close()
        for proc, _ in running.values():
            proc.join()
    return [done[i] for i in range(len(members))]


def _report(receive) -> tuple:
    """The fold's ("done", summary) / ("error", line) / ("crash", traceback), or ("died",)."""
    try:
        return receive.recv() if receive.poll() else ("died", None)
    except (EOFError, OSError):
        return ("died", None)


def _fail(m: Member, exitcode: int | None, kind: str, detail: str | None) -> None:
    what = f"fold {m.fold}" + (f" seed {m.seed}" if m.seeds > 1 else "")
    if kind == "error":
        raise BusisegError(detail)
    if kind == "crash":
        print(detail, file=sys.stderr, end="")
        raise RuntimeError(f"{what}'s training process failed (its traceback is above)")
    how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else \
        f"ended with exit code {exitcode}"
    raise BusisegError(f"{what}'s training process {how} (out of memory?); `dvc repro` "
                       "resumes every fold from its last epoch (models/checkpoints)")


def _member_process(conn, p: Params, m: Member, cache_path: Path, split_path: Path,
                    folds_dir: Path, live_dir: Path) -> None:
    """One member in a process of its own, which reports its summary or its failure to the
    parent and never outlives it."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the parent
    try:                                          # stops the members and says so once
        conn.send(("done", train_member(p, m, cache_path, split_path, folds_dir, live_dir)))
    except BusisegError as exc:
        conn.send(("error", str(exc)))
    except BaseException:  # noqa: BLE001 - a bug: the parent prints the traceback and stops
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()
