"""Training the image classifier (stage classify): members of folds × seeds on train's cache and
split, each on the other folds (or the train split), with one readable loop.

Presence is learnt from every image (a lesion in its masks or not), malignancy from the lesion
images whose class is benign or malignant: a normal image has no malignancy to learn, and a
dataset without those classes trains presence alone. Kind `segmentation` also learns the masks
(BCE + Dice averaged over lesion images, as the mask recipes), which is what teaches its encoder
where a lesion is.

On a CPU the members train side by side, one thread each (classify.member_workers), for the
reason the mask folds do (training/cross_validation.py): Lite0's depthwise convolutions barely
use a second thread.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from busiseg.data.cache import load_cache
from busiseg.errors import BusisegError
from busiseg.inference.segment import normalize
from busiseg.modeling.classifier import ENCODER, build_classifier, save_classifier
from busiseg.modeling.model_file import split_identity
from busiseg.modeling.pretrained import load_pretrained
from busiseg.params import AugmentParams, ModelParams, Params
from busiseg.runtime.device import kernel_isa, pin_kernels, place, seed_everything
from busiseg.runtime.placement import OVERSUBSCRIBE, cpu_cores, die_with_parent, queue_slot
from busiseg.training.augment import augment_batch
from busiseg.training.losses import LossSpec, SegLoss
from busiseg.training.schedule import lr_factor

AUGMENT = AugmentParams()  # the augment section's defaults: flips, small warps, intensity
MASK_LOSS = SegLoss(LossSpec(reduction="image"))  # kind segmentation: the lite0 recipes' loss


@dataclass
class Labels:
    lesion: torch.Tensor  # N floats, 1 where the masks mark a lesion
    malignant: torch.Tensor  # N floats, 1 malignant, 0 benign, NaN where not known or no lesion


def labels(classes: list[str], masks: torch.Tensor) -> Labels:
    lesion = (masks.reshape(len(masks), -1) > 0).any(dim=1).float()
    malignant = torch.tensor([1.0 if c == "malignant" else 0.0 if c == "benign" else np.nan
                              for c in classes])
    return Labels(lesion, torch.where(lesion > 0, malignant, torch.nan))


def plan(split: pd.DataFrame, folds: int, seeds: int, seed: int) -> list[tuple[int, int]]:
    """(fold, seed) of every member: fold -1 trains on the train split."""
    return [(k, seed + s) for k in (range(folds) if folds else [-1]) for s in range(seeds)]


def training_rows(split: pd.DataFrame, fold: int) -> pd.Series:
    if fold < 0:
        return split["split"] == "train"
    return (split["split"] == "cv") & (split["fold"] != fold)


def normalisation(channels: int):
    from busiseg.modeling.pretrained import input_normalisation

    return input_normalisation(ModelParams(arch="smp_unet", encoder=ENCODER,
                                           encoder_weights="imagenet"), channels)


def model_config(p: Params, channels: int) -> dict:
    """What build_classifier rebuilds a member from."""
    config = {"in_channels": channels, "encoder": ENCODER}
    if p.classify.kind == "segmentation":
        config["decoder_channels"] = list(p.classify.decoder_channels)
    return config


def train_member(p: Params, images: torch.Tensor, masks: torch.Tensor, target: Labels,
                 idx: torch.Tensor, seed: int, device: torch.device) -> tuple[dict, list[float]]:
    """One member from ImageNet weights: the loop, top to bottom. Returns its weights and the
    mean loss of each epoch."""
    c = p.classify
    seed_everything(seed)
    model = build_classifier(c.kind, model_config(p, images.shape[1]))
    load_pretrained(model.encoder, ENCODER)
    model = model.to(device)
    mean, std = normalisation(images.shape[1])
    bs = min(c.batch_size, len(idx))
    steps = max(1, len(idx) // bs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    total, warmup = steps * c.epochs, min(1, c.epochs - 1) * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, "cosine"))
    history = []
    for epoch in range(c.epochs):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = idx[torch.randperm(len(idx), generator=gen)]
        model.train()
        losses = []
        for step in range(steps):
            batch = perm[step * bs:(step + 1) * bs]
            x = images[batch].to(device).float() / 255
            y = masks[batch].to(device).float()
            x, y = augment_batch(x, y, AUGMENT, gen)
            loss = member_loss(model, normalize(x, mean, std), y, target, batch, c.kind,
                               c.malignant_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(round(float(np.mean(losses)), 6))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


def member_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: Labels,
                batch: torch.Tensor, kind: str, malignant_weight: float) -> torch.Tensor:
    lesion, malignant = target.lesion[batch].to(x.device), target.malignant[batch].to(x.device)
    if kind != "segmentation":
        return classify_loss(model(x), lesion, malignant, malignant_weight)
    logits, mask_logits = model.with_masks(x)
    return classify_loss(logits, lesion, malignant, malignant_weight) + \
        MASK_LOSS.masks(mask_logits, y)


def classify_loss(logits: torch.Tensor, lesion: torch.Tensor, malignant: torch.Tensor,
                  malignant_weight: float) -> torch.Tensor:
    """BCE of presence on every image, plus BCE of malignancy on the images whose malignancy is
    known (mean over those; nothing when the batch has none)."""
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], lesion)
    known = ~torch.isnan(malignant)
    if malignant_weight > 0 and known.any():
        loss = loss + malignant_weight * F.binary_cross_entropy_with_logits(
            logits[known, 1], malignant[known])
    return loss


def member_workers(p: Params, members: int, device: torch.device) -> int:
    """classify.member_workers, or (0) the mask folds' rule: on a CPU, members of one thread all
    at once up to OVERSUBSCRIBE per core; on a GPU one at a time."""
    c = p.classify
    if c.member_workers:
        return min(c.member_workers, members)
    if device.type != "cpu" or members == 1 or c.threads > 1:
        return 1
    slots = max(1, cpu_cores() // queue_slot().workers)
    return members if members <= OVERSUBSCRIBE * slots else slots


@dataclass
class Job:
    """One member's training, as a process of its own receives it."""

    p: Params
    cache_path: Path
    split_path: Path
    fold: int
    seed: int
    threads: int  # 0: place's share


def train_job(job: Job) -> dict:
    """Loads what the member trains on and trains it: the same code in turn or side by side."""
    c = job.p.classify
    pin_kernels(c.cpu_isa, "classify.cpu_isa")
    device, _ = place(c.device, "classify.device", threads=job.threads)
    cache = load_cache(job.cache_path)
    split = pd.read_csv(job.split_path, dtype={"case_id": str}, keep_default_na=False)
    class_of = dict(zip(split["case_id"], split["class"]))
    target = labels([class_of.get(c, "") for c in cache.case_ids], cache.masks)
    idx = torch.tensor(cache.indices(split.loc[training_rows(split, job.fold),
                                               "case_id"].tolist()))
    if len(idx) < 2:
        raise BusisegError(f"{job.split_path}: fewer than 2 training images for classifier "
                           f"member fold {job.fold}; re-run the split stage")
    start = time.perf_counter()
    state, history = train_member(job.p, cache.images, cache.masks, target, idx, job.seed, device)
    print(f"classify: member fold {job.fold} seed {job.seed}: loss {history[0]:.4f} -> "
          f"{history[-1]:.4f}", flush=True)
    weights = io.BytesIO()  # bytes, not tensors: a process pool would pass tensors through
    torch.save(state, weights)  # /dev/shm, which containers keep small
    return {"fold": job.fold, "seed": job.seed, "state": weights.getvalue(), "loss": history,
            "seconds": round(time.perf_counter() - start, 2),
            "threads": torch.get_num_threads(), "device": device.type,
            "kernel_isa": kernel_isa() if device.type == "cpu" else None,
            "malignancy": bool(torch.isfinite(target.malignant).any())}


def side_by_side(jobs: list[Job], workers: int) -> list[dict]:
    """The members in `workers` processes at once. The first to fail stops the others at once
    (so does Ctrl-C), and a member's process killed (out of memory) is one line."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent)
    futures = [pool.submit(train_job, job) for job in jobs]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:  # a failure is raised before an unfinished member is waited for
            if f in done and f.exception() is not None:
                f.result()
        return [f.result() for f in futures]
    except BrokenProcessPool:
        raise BusisegError("a classifier member's training process was killed (out of "
                           "memory?); re-run dvc repro classify, or set "
                           "classify.member_workers 1") from None
    finally:
        if not all(f.done() and f.exception() is None for f in futures):
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def train_classifier(p: Params, cache_path, split_path, out_path) -> dict:
    """Every member of `plan`, written to `out_path` with what feeding them needs; returns the
    summary for metrics/classify.json."""
    c = p.classify
    pin_kernels(c.cpu_isa, "classify.cpu_isa")
    device, _ = place(c.device, "classify.device", threads=c.threads)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    todo = plan(split, p.split.folds, c.seeds, c.seed)
    workers = member_workers(p, len(todo), device)
    jobs = [Job(p, Path(cache_path), Path(split_path), fold, seed,
                c.threads if workers == 1 else max(1, c.threads)) for fold, seed in todo]
    start = time.perf_counter()
    if workers == 1:
        members = [train_job(job) for job in jobs]
    else:
        print(f"classify: {len(jobs)} members, {workers} side by side", flush=True)
        members = side_by_side(jobs, workers)
    for m in members:
        m["state"] = torch.load(io.BytesIO(m["state"]), weights_only=True)
    wall = time.perf_counter() - start
    cache = load_cache(cache_path)
    channels = int(cache.images.shape[1])
    mean, std = normalisation(channels)
    malignancy = members[0]["malignancy"] and c.malignant_weight > 0
    save_classifier(out_path, [{k: m[k] for k in ("fold", "seed", "state", "loss")}
                               for m in members], model_config(p, channels),
                    {"size": cache.size, "input_mean": mean, "input_std": std,
                     "split": split_identity(p, split_path), "folds": p.split.folds,
                     "seeds": c.seeds, "malignancy": malignancy}, kind=c.kind)
    return {"members": len(members), "seconds": round(sum(m["seconds"] for m in members), 2),
            "wall_seconds": round(wall, 2), "member_workers": workers,
            "device": members[0]["device"], "threads": members[0]["threads"],
            "kernel_isa": members[0]["kernel_isa"], "malignancy_trained": malignancy}
