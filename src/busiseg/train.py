"""Training: one readable loop, every knob a param, resumable after a kill.

Batches come straight from the in-memory uint8 cache and are augmented on the device. Every epoch
reseeds its own generators from (train.seed, epoch), and a checkpoint is written after every
completed epoch, so a run killed mid-way and resumed ends bit-identical (on CPU) to an
uninterrupted one. The best epoch is chosen on the validation split only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from busiseg.augment import augment_batch
from busiseg.data import atomic_torch_save, load_cache
from busiseg.errors import BusisegError
from busiseg.losses import SegLoss
from busiseg.metrics import confusion, dice_iou, lesion_dice_iou
from busiseg.modelio import model_kwargs, save_model
from busiseg.models import build_model, check_input_size
from busiseg.params import Params

CKPT_FORMAT = "busiseg-checkpoint-v1"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BusisegError("train.device is 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise BusisegError("train.device is 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU (measured slower)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_runtime(p: Params, device: torch.device) -> None:
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not p.train.deterministic
        torch.backends.cudnn.deterministic = p.train.deterministic
        if p.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine or poly decay to zero (per optimisation step)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "poly":
        return max(0.0, 1 - progress) ** 0.9
    return 1.0


# the library code a training run depends on (the train stage's code deps in dvc.yaml)
TRAINING_CODE = [Path(__file__).with_name(f"{m}.py")
                 for m in ("train", "models", "losses", "augment", "modelio")]


def run_hash(p: Params, files: list[Path]) -> str:
    """What a checkpoint belongs to: every param that changes training, the input files and the
    training code: a run interrupted, then resumed after an edit to the loss, would otherwise
    continue the old code's weights under the new code's name."""
    relevant = {k: asdict(getattr(p, k)) for k in ("model", "train", "augment")}
    relevant["train"].pop("progress")
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for f in [*TRAINING_CODE, *files]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def show_progress(setting: str) -> bool:
    if setting != "auto":
        return setting == "on"
    return sys.stderr.isatty() and not os.environ.get("CI")


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float,
                  device: torch.device, batch_size: int, dtype: torch.dtype | None = None,
                  tta: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (float32, CPU) for uint8 N×1×H×W images."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            prob = torch.sigmoid(model(x).float())
            if tta:
                prob = 0.5 * (prob + torch.sigmoid(model(x.flip(-1)).float()).flip(-1))
        out.append(prob.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def normalize(x_uint8: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x_uint8.float() / 255 - mean) / std


def train(p: Params, cache_path: Path, split_path: Path, model_path: Path, ckpt_path: Path,
          curves_path: Path) -> dict:
    cfg = p.train
    device = pick_device(cfg.device)
    configure_runtime(p, device)
    dtype = amp_dtype(cfg.amp, device)
    seed_everything(cfg.seed)

    # data: the whole uint8 cache lives on the device; batches are index gathers
    cache = load_cache(cache_path, p.preprocess.size)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    tr_idx = torch.tensor(cache.indices(split.loc[split["split"] == "train", "case_id"].tolist()))
    va_idx = torch.tensor(cache.indices(split.loc[split["split"] == "val", "case_id"].tolist()))
    if len(tr_idx) == 0 or len(va_idx) == 0:
        raise BusisegError(f"{split_path}: the train and val splits must both be non-empty")
    images = cache.images.to(device)
    masks = cache.masks.to(device)
    va_images, va_masks = images[va_idx.to(device)], masks[va_idx.to(device)]
    size = cache.size

    # model, optimiser, schedule, loss
    kwargs = model_kwargs(p.model)
    model = build_model(**kwargs)
    check_input_size(model, size, size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(tr_idx))
    steps_per_epoch = max(1, len(tr_idx) // bs)  # drop the ragged batch: BatchNorm needs ≥ 2
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1) * steps_per_epoch  # -S train.epochs=1 works
    if cfg.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                               patience=3)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
    loss_fn = SegLoss(cfg.loss, cfg.bce_weight, cfg.dice_weight, cfg.focal_gamma,
                      cfg.tversky_alpha, cfg.tversky_beta, cfg.dice_reduction,
                      cfg.empty_weight, cfg.empty_topk)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fwd = torch.compile(model) if cfg.compile else model

    # resume only a checkpoint of this exact run that did not finish
    key = run_hash(p, [cache_path, split_path])
    start_epoch, best, best_state, history, bad_epochs, seconds = 0, -1.0, None, [], 0, 0.0
    ckpt = load_checkpoint(ckpt_path)
    if ckpt and ckpt["run_hash"] == key and not ckpt["complete"]:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, best_state = ckpt["epoch"], ckpt["best_dice"], ckpt["best_state"]
        history, bad_epochs, seconds = ckpt["history"], ckpt["bad_epochs"], ckpt["seconds"]
        print(f"train: resuming from epoch {start_epoch} of {cfg.epochs} ({ckpt_path})")

    progress = show_progress(cfg.progress)
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience and bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout RNG, per epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # order + augmentation
        perm = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
        model.train()
        losses = []
        bar = _bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        for step in range(steps_per_epoch):
            idx = perm[step * bs:(step + 1) * bs].to(device)
            x = images[idx].float() / 255
            y = masks[idx].float()
            x, y = augment_batch(x, y, p.augment, gen)
            x = ((x - p.model.input_mean) / p.model.input_std).contiguous(
                memory_format=memory_format)
            with autocast(device, dtype):
                out = fwd(x)
            loss = loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if cfg.schedule != "plateau":
                scheduler.step()
            losses.append(loss.item())
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        val = evaluate_split(model, va_images, va_masks, p, device, dtype, loss_fn, memory_format)
        if cfg.schedule == "plateau":
            scheduler.step(val["dice"])
        seconds += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val["loss"],
               "val_dice": val["dice"], "val_iou": val["iou"], "lr": lr}
        history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
        improved = val["dice"] > best
        if improved:
            best, bad_epochs = val["dice"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        # persist first: once the line below is printed, this epoch survives a kill
        atomic_torch_save({
            "format": CKPT_FORMAT, "run_hash": key, "complete": False, "epoch": epoch + 1,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "best_dice": best, "best_state": best_state, "history": history,
            "bad_epochs": bad_epochs, "seconds": seconds,
        }, ckpt_path)
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
              f"val_loss {val['loss']:.4f}  val_dice {val['dice']:.4f}  val_iou {val['iou']:.4f}"
              f"  lr {lr:.2e}{'  *' if improved else ''}", flush=True)

    best_row = max(history, key=lambda r: r["val_dice"])
    save_model(model_path, best_state, kwargs, p, size)
    pd.DataFrame(history).to_csv(curves_path, index=False)
    # the finished run leaves only a small marker: nothing a later run could resume by mistake
    atomic_torch_save({"format": CKPT_FORMAT, "run_hash": key, "complete": True}, ckpt_path)
    images_seen = steps_per_epoch * bs * len(history)
    return {
        "best_epoch": best_row["epoch"],
        "best_val_dice": best_row["val_dice"],
        "best_val_iou": best_row["val_iou"],
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "seconds": round(seconds, 2),
        "images_per_s": round(images_seen / seconds, 2) if seconds else None,
        "device": device.type,
        "n_params": sum(t.numel() for t in model.parameters()),
    }


def evaluate_split(model, images, masks, p: Params, device, dtype, loss_fn,
                   memory_format=torch.contiguous_format) -> dict:
    """Val loss over all images; Dice/IoU as per-image means over images with a lesion."""
    bs = p.evaluate.batch_size
    model.eval()
    total, counts = 0.0, []
    with torch.inference_mode():
        for i in range(0, len(images), bs):
            x = normalize(images[i:i + bs], p.model.input_mean, p.model.input_std)
            x = x.contiguous(memory_format=memory_format)
            y = masks[i:i + bs].float()
            with autocast(device, dtype):
                logits = model(x)
            total += loss_fn(logits, y).item() * len(x)
            pred = (logits.float() > 0).cpu().numpy()  # sigmoid > 0.5
            counts.append(confusion(pred, y.cpu().numpy() > 0))
    c = np.concatenate(counts)
    dice, iou = lesion_dice_iou(c)
    if np.isnan(dice):  # a val split without lesions: fall back to all images
        dice, iou = (float(v.mean()) for v in dice_iou(c))
    return {"loss": total / len(images), "dice": dice, "iou": iou}


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a broken checkpoint is simply not resumed
        print(f"train: ignoring unreadable checkpoint {path}; starting from scratch")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        return None
    return ckpt


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
