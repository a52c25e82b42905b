"""Training: one readable loop, every knob a param, resumable after a kill.

Batches come straight from the in-memory uint8 cache and are augmented on the device. Every epoch
reseeds its own generators from (train.seed, epoch), and a checkpoint is written after every
completed epoch, so a run killed mid-way and resumed ends bit-identical (on CPU) to an
uninterrupted one. The best epoch is chosen on the validation split only. The policy around the
loop lives elsewhere: device and precision in `runtime`, resuming in `checkpoint`, prediction in
`inference`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from busiseg.data.cache import load_cache
from busiseg.errors import BusisegError
from busiseg.evaluation.metrics import confusion, dice_iou, lesion_dice_iou
from busiseg.inference.segment import Feed, normalize
from busiseg.modeling.archs import check_input_size, presence_head, split_output
from busiseg.modeling.model_file import model_kwargs, save_model, split_identity
from busiseg.modeling.pretrained import init_encoder, input_normalisation, weights_files
from busiseg.modeling.registry import build_model
from busiseg.params import Params, TrainParams
from busiseg.runtime import distributed
from busiseg.runtime.device import (
    amp_dtype,
    autocast,
    kernel_isa,
    place,
    seed_everything,
)
from busiseg.runtime.placement import QueueSlot, Ranks
from busiseg.runtime.progress import bar as progress_bar
from busiseg.runtime.progress import show_progress
from busiseg.training import checkpoint
from busiseg.training.augment import augment_batch
from busiseg.training.losses import SegLoss
from busiseg.training.schedule import lr_factor


# the training loop, kept whole to read top to bottom (as nanoGPT's train.py); what surrounds
# it (placing the run, building it, one epoch, validation, the summary) has helpers below
def train(p: Params, cache_path: Path, split_path: Path, model_path: Path, ckpt_path: Path,
          live_dir: Path, fold: int | None = None) -> dict:
    """One model: on the train split, keeping the best epoch on val; or, with `fold`, fold model
    k of a cross-validation run, trained on the other folds and kept at its last epoch."""
    cfg = p.train
    ranks = distributed.current()
    device, slot = place_and_seed(cfg, ranks)

    key = checkpoint.run_hash(p, [cache_path, split_path, *weights_files(p.model)], fold)
    done = checkpoint.finished_fold(ckpt_path, key) if fold is not None else None
    skip = bool(done and model_path.is_file())  # a cross-validation run killed in a later fold
    same_checkpoint_everywhere(skip, ranks, ckpt_path)
    if skip:
        if ranks.main:
            print(f"train: fold {fold} already trained ({model_path}); not training it again")
            open_live(live_dir, done["history"])
        return done["summary"]

    t = build_trainer(p, load_data(cache_path, split_path, p.preprocess.size, device, fold),
                      device, ranks)
    # resume only a checkpoint of this exact run that did not finish
    run = checkpoint.resume(ckpt_path, key, t.model, t.optimizer, t.scheduler, t.scaler)
    same_checkpoint_everywhere(run.epoch, ranks, ckpt_path)
    if run.epoch and ranks.main:
        print(f"train: resuming{'' if fold is None else f' fold {fold}'} from epoch {run.epoch} "
              f"of {cfg.epochs} ({ckpt_path})")
    t.fwd = distributed.wrap(t.model, device, ranks)
    t.fwd = torch.compile(t.fwd) if cfg.compile else t.fwd
    live = open_live(live_dir, run.history) if ranks.main else None

    progress = show_progress(cfg.progress) and ranks.main
    for epoch in range(run.epoch, cfg.epochs):
        if cfg.patience and run.bad_epochs >= cfg.patience:
            break
        slot.check_worker_alive()
        t0 = time.perf_counter()
        bar = progress_bar(t.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        train_loss = train_one_epoch(t, epoch, bar)
        lr = t.optimizer.param_groups[0]["lr"]
        val = validate(t) if ranks.main and validates(cfg, epoch) else None
        val = distributed.from_main(val, ranks)
        if cfg.schedule == "plateau":
            t.scheduler.step(val["dice"])
        run.seconds += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": train_loss, **({} if val is None else {
            "val_loss": val["loss"], "val_dice": val["dice"], "val_iou": val["iou"]}), "lr": lr}
        improved = record_epoch(run, row, t.model, keep_weights=ranks.main)
        if not ranks.main:
            continue
        # persist first: once the line below is printed, this epoch survives a kill
        checkpoint.save(ckpt_path, key, run, t.model, t.optimizer, t.scheduler, t.scaler)
        log_epoch(live, run.history[-1])
        print(epoch_line(fold, cfg.epochs, row, val, improved), flush=True)

    summary = finish(t, run, model_path, fold, write=ranks.main,
                     split=split_identity(p, split_path))
    if ranks.main:  # the finished run leaves only a small marker, nothing to resume by mistake
        checkpoint.mark_complete(ckpt_path, key,
                                 *((summary, run.history) if fold is not None else ()))
    return summary


# ---- the parts around the loop --------------------------------------------------------------


def place_and_seed(cfg: TrainParams, ranks: Ranks) -> tuple[torch.device, QueueSlot]:
    """The run's device and its share of the machine (threads, kernels, a queue worker's
    cores), then every generator seeded: before anything draws a random number."""
    device, slot = place(cfg.device, "train.device", threads=cfg.threads, processes=cfg.processes,
                         local_rank=ranks.local_rank, deterministic=cfg.deterministic,
                         cpu_isa=cfg.cpu_isa,
                         check=lambda d: distributed.check_request(cfg, d, ranks))
    distributed.init(device, ranks)
    seed_everything(cfg.seed)
    return device, slot


def epoch_line(fold: int | None, epochs: int, row: dict, val: dict | None,
               improved: bool) -> str:
    """The line each epoch prints: once it is printed, the epoch survives a kill."""
    tag = "" if fold is None else f"fold {fold} "
    scores = "" if val is None else (f"  val_loss {val['loss']:.4f}  val_dice "
                                     f"{val['dice']:.4f}  val_iou {val['iou']:.4f}")
    return (f"{tag}epoch {row['epoch']:3d}/{epochs}  train_loss {row['train_loss']:.4f}"
            f"{scores}  lr {row['lr']:.2e}{'  *' if improved else ''}")


@dataclass
class TrainingData:
    """The whole uint8 cache on the device; batches are index gathers."""

    images: torch.Tensor
    masks: torch.Tensor
    train_idx: torch.Tensor
    val_images: torch.Tensor
    val_masks: torch.Tensor
    size: int


@dataclass
class Trainer:
    """What one training run holds, built once by build_trainer (as nnU-Net keeps it on its
    trainer), so the loop's helpers take the run rather than a dozen arguments each."""

    p: Params
    data: TrainingData
    device: torch.device
    dtype: torch.dtype | None  # autocast's, or None (train.amp)
    memory_format: torch.memory_format
    ranks: distributed.Ranks
    kwargs: dict  # what the model file rebuilds the model from
    model: torch.nn.Module
    encoder_source: dict  # where the encoder's weights came from, for the model file
    batch_size: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loss_fn: SegLoss
    fwd: torch.nn.Module | None = None  # the model as the loop calls it (DDP, compiled)


def build_trainer(p: Params, data: TrainingData, device: torch.device,
                  ranks: distributed.Ranks) -> Trainer:
    """The model (its encoder's pretrained weights loaded), optimiser, schedule, loss and
    precision of one run, in the order that draws the seeded initial weights."""
    cfg = p.train
    dtype = amp_dtype(cfg.amp, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    kwargs = model_kwargs(p.model, presence=cfg.presence_weight > 0,
                          channels=p.preprocess.channels)
    model = build_model(**kwargs)
    check_input_size(model, data.size, data.size)
    if cfg.sync_bn and ranks.world > 1:
        model = distributed.sync_batchnorm(model)
    encoder_source = init_encoder(model, p.model)
    if cfg.presence_detach:
        detach_presence(model)
    model = model.to(device, memory_format=memory_format)
    bs = min(cfg.batch_size, len(data.train_idx))
    distributed.check_batch(bs, ranks)
    steps_per_epoch = max(1, len(data.train_idx) // bs)  # no ragged batch: BatchNorm needs ≥ 2
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Trainer(p, data, device, dtype, memory_format, ranks, kwargs, model, encoder_source,
                   bs, steps_per_epoch, optimizer, scheduler, scaler, SegLoss.from_params(cfg))


def detach_presence(model: torch.nn.Module) -> None:
    """Stop-gradient in front of the presence head: it learns to read the segmentation's features
    while the presence loss leaves them, and so the masks, as without a head. The head's dropout
    draws are taken back afterwards, so every other layer's dropout draws the same numbers."""
    head, saved = presence_head(model), {}

    def before(_, args):
        saved["cpu"] = torch.get_rng_state()
        saved["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return tuple(a.detach() for a in args)

    def after(*_):
        torch.set_rng_state(saved["cpu"])
        if saved["cuda"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda"])

    head.register_forward_pre_hook(before)
    head.register_forward_hook(after)


def load_data(cache_path: Path, split_path: Path, size: int, device: torch.device,
              fold: int | None = None) -> TrainingData:
    """Train and val cases: the split's, or for fold k the other folds and fold k."""
    cache = load_cache(cache_path, size)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)

    def indices(rows: pd.Series) -> torch.Tensor:
        return torch.tensor(cache.indices(split.loc[rows, "case_id"].tolist()))

    if fold is None:
        tr_idx, va_idx = indices(split["split"] == "train"), indices(split["split"] == "val")
    else:
        cv = split["split"] == "cv"
        tr_idx, va_idx = indices(cv & (split["fold"] != fold)), indices(split["fold"] == fold)
    if len(tr_idx) == 0 or len(va_idx) == 0:
        what = "the train and val splits" if fold is None else f"fold {fold} and the other folds"
        raise BusisegError(f"{split_path}: {what} must both be non-empty; re-run the split stage "
                           "(dvc repro split) with split.folds as params.yaml says")
    images, masks = cache.images.to(device), cache.masks.to(device)
    va = va_idx.to(device)
    return TrainingData(images, masks, tr_idx, images[va], masks[va], cache.size)


def same_checkpoint_everywhere(state, ranks: distributed.Ranks, ckpt_path: Path) -> None:
    """Processes that resume from different points would train out of step (or wait for ever):
    across machines, each reads its own models/checkpoints unless it is shared."""
    if not distributed.agree(state, ranks):
        raise BusisegError(f"{ckpt_path}: the training processes found different checkpoints; "
                           "across machines models/checkpoints must be on a shared filesystem "
                           "(or delete it there to start over)")


def make_optimizer(model: torch.nn.Module, cfg: TrainParams, steps_per_epoch: int):
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "plateau":
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=3)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps_per_epoch  # -S train.epochs=1 works
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))


def train_one_epoch(t: Trainer, epoch: int, bar) -> float:
    """One pass over the train split; returns the mean loss. Every epoch reseeds its own
    generators from (train.seed, epoch): that is what makes a resumed run bit-identical. Under
    torchrun every rank draws the whole batch and trains on its slice of it."""
    p, data, bs, ranks = t.p, t.data, t.batch_size, t.ranks
    torch.manual_seed((p.train.seed * 100_003 + epoch) * ranks.world + ranks.rank)  # dropout
    gen = torch.Generator().manual_seed(p.train.seed * 1_000_003 + epoch)  # order + augmentation
    perm = data.train_idx[torch.randperm(len(data.train_idx), generator=gen)]
    mean, std = input_normalisation(p.model, p.preprocess.channels)
    t.model.train()
    losses = []
    for step in range(t.steps_per_epoch):
        idx = perm[step * bs:(step + 1) * bs].to(t.device)
        x = data.images[idx].float() / 255
        y = data.masks[idx].float()
        x, y = augment_batch(x, y, p.augment, gen)
        x, y = distributed.shard(x, ranks), distributed.shard(y, ranks)
        x = normalize(x, mean, std).contiguous(memory_format=t.memory_format)
        with autocast(t.device, t.dtype):
            out = t.fwd(x)
        loss = t.loss_fn(out, y)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        if p.train.schedule != "plateau":
            t.scheduler.step()
        losses.append(loss.item())
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar:
        bar.close()
    return distributed.mean(float(np.mean(losses)), ranks)


def validate(t: Trainer) -> dict:
    """Val loss over all images; Dice/IoU as per-image means over images with a lesion, at the
    fixed 0.5 threshold: choosing the epoch must not depend on evaluate's settings."""
    p, data, bs = t.p, t.data, t.p.train.val_batch_size
    t.model.eval()
    total, counts = 0.0, []
    mean, std = input_normalisation(p.model, p.preprocess.channels)
    batches = Feed(mean, std, t.device, bs,
                   channels_last=t.memory_format == torch.channels_last).batches(data.val_images)
    with torch.inference_mode():
        for x, y in zip(batches, data.val_masks.split(bs)):
            with autocast(t.device, t.dtype):
                out = t.model(x)
            y = y.float()
            total += t.loss_fn(out, y).item() * len(x)
            logits = split_output(out)[0]
            pred = (logits.float() > 0).cpu().numpy()  # sigmoid > 0.5
            counts.append(confusion(pred, y.cpu().numpy() > 0))
    c = np.concatenate(counts)
    dice, iou = lesion_dice_iou(c)
    if np.isnan(dice):  # a val split without lesions: fall back to all images
        dice, iou = (float(v.mean()) for v in dice_iou(c))
    return {"loss": total / len(data.val_images), "dice": dice, "iou": iou}


def validates(cfg: TrainParams, epoch: int) -> bool:
    """Every train.val_every-th epoch and the last: a fold model is kept at its last epoch
    whatever its curve says, so its other validations only draw the curve (and cost ~5 % of an
    epoch on a CPU: bench.py levers)."""
    return epoch + 1 == cfg.epochs or bool(cfg.val_every and (epoch + 1) % cfg.val_every == 0)


def record_epoch(run: checkpoint.Progress, row: dict, model: torch.nn.Module,
                 keep_weights: bool = True) -> bool:
    """Adds the epoch's row; keeps a copy of the weights when val Dice improved."""
    run.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    run.epoch = row["epoch"]
    if "val_dice" not in row:  # not validated this epoch (train.val_every)
        return False
    if row["val_dice"] > run.best_dice:
        run.best_dice, run.bad_epochs = row["val_dice"], 0
        if keep_weights:
            run.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return True
    run.bad_epochs += 1
    return False


def open_live(live_dir: Path, history: list[dict]):
    """DVCLive logger whose files are rebuilt from the checkpoint's history: the checkpoint is
    the one record of which epochs survived a kill (DVCLive's own files may hold an epoch the
    checkpoint does not), so a resumed run's curves equal an uninterrupted run's."""
    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    for row in history:
        log_epoch(live, row)
    return live


def log_epoch(live, row: dict) -> None:
    live.step = row["epoch"]
    for name, value in row.items():
        if name != "epoch":
            live.log_metric(name, value)
    live.next_step()


def finish(t: Trainer, run: checkpoint.Progress, model_path: Path, fold: int | None = None,
           write: bool = True, split: dict | None = None) -> dict:
    """Save the kept weights and summarise the run. A fold model keeps its last epoch: choosing
    the epoch on the fold it is then scored on would inflate the cross-validation score
    (nnU-Net's fixed schedule, scored at its end)."""
    p, device = t.p, t.device
    best_row = max((r for r in run.history if "val_dice" in r), key=lambda r: r["val_dice"])
    state = run.best_state if fold is None else \
        {k: v.detach().cpu() for k, v in t.model.state_dict().items()}
    if write:
        save_model(model_path, state, t.kwargs, p, t.data.size,
                   encoder_weights=t.encoder_source, split=split)
    images_seen = t.steps_per_epoch * t.batch_size * len(run.history)
    summary = {
        "best_epoch": best_row["epoch"],
        "best_val_dice": best_row["val_dice"],
        "best_val_iou": best_row["val_iou"],
        "epochs_run": len(run.history),
        "stopped_early": len(run.history) < p.train.epochs,
        "seconds": round(run.seconds, 2),
        "images_per_s": round(images_seen / run.seconds, 2) if run.seconds else None,
        "device": device.type,
        "processes": p.train.processes,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "amp": str(t.dtype).removeprefix("torch.") if t.dtype else "off",
        "kernel_isa": kernel_isa() if device.type == "cpu" else None,
        "n_params": sum(x.numel() for x in t.model.parameters()),
    }
    if fold is not None:
        summary["kept_epoch"] = run.history[-1]["epoch"]
        summary["kept_val_dice"] = run.history[-1]["val_dice"]
    return summary
