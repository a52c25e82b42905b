"""Training the image classifier (stage classify): members of folds × seeds on train's cache and
split, each on the other folds (or the train split), with one readable loop.

Presence is learnt from every image (a lesion in its masks or not), malignancy from the lesion
images whose class is benign or malignant: a normal image has no malignancy to learn, and a
dataset without those classes trains presence alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from busiseg.data.cache import load_cache
from busiseg.errors import BusisegError
from busiseg.inference.segment import normalize
from busiseg.modeling.classifier import ENCODER, ImageClassifier, save_classifier
from busiseg.modeling.model_file import split_identity
from busiseg.modeling.pretrained import load_pretrained
from busiseg.params import AugmentParams, ModelParams, Params
from busiseg.runtime.device import kernel_isa, pin_kernels, place, seed_everything
from busiseg.training.augment import augment_batch
from busiseg.training.train import lr_factor

AUGMENT = AugmentParams()  # the augment section's defaults: flips, small warps, intensity


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


def train_member(p: Params, images: torch.Tensor, target: Labels, idx: torch.Tensor,
                 seed: int, device: torch.device) -> tuple[dict, list[float]]:
    """One member from ImageNet weights: the loop, top to bottom. Returns its weights and the
    mean loss of each epoch."""
    c = p.classify
    seed_everything(seed)
    model = ImageClassifier(images.shape[1])
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
            x, _ = augment_batch(x, torch.zeros_like(x[:, :1]), AUGMENT, gen)
            logits = model(normalize(x, mean, std))
            loss = classify_loss(logits, target.lesion[batch].to(device),
                                 target.malignant[batch].to(device), c.malignant_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append(round(float(np.mean(losses)), 6))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


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


def train_classifier(p: Params, cache_path, split_path, out_path) -> dict:
    """Every member of `plan`, written to `out_path` with what feeding them needs; returns the
    summary for metrics/classify.json."""
    c = p.classify
    pin_kernels(c.cpu_isa, "classify.cpu_isa")
    device, _ = place(c.device, "classify.device", threads=c.threads)
    cache = load_cache(cache_path)
    split = pd.read_csv(split_path, dtype={"case_id": str}, keep_default_na=False)
    class_of = dict(zip(split["case_id"], split["class"]))
    target = labels([class_of.get(c, "") for c in cache.case_ids], cache.masks)
    members, start = [], time.perf_counter()
    for fold, seed in plan(split, p.split.folds, c.seeds, c.seed):
        idx = torch.tensor(cache.indices(split.loc[training_rows(split, fold),
                                                   "case_id"].tolist()))
        if len(idx) < 2:
            raise BusisegError(f"{split_path}: fewer than 2 training images for classifier "
                               f"member fold {fold}; re-run the split stage")
        state, history = train_member(p, cache.images, target, idx, seed, device)
        members.append({"fold": fold, "seed": seed, "state": state, "loss": history})
        print(f"classify: member fold {fold} seed {seed}: loss {history[0]:.4f} -> "
              f"{history[-1]:.4f}", flush=True)
    mean, std = normalisation(cache.images.shape[1])
    save_classifier(out_path, members, {"in_channels": int(cache.images.shape[1]),
                                        "encoder": ENCODER},
                    {"size": cache.size, "input_mean": mean, "input_std": std,
                     "split": split_identity(p, split_path), "folds": p.split.folds,
                     "seeds": c.seeds, "malignancy": bool(torch.isfinite(target.malignant).any()
                                                          and c.malignant_weight > 0)})
    seconds = time.perf_counter() - start
    return {"members": len(members), "seconds": round(seconds, 2),
            "device": device.type, "threads": torch.get_num_threads(),
            "kernel_isa": kernel_isa() if device.type == "cpu" else None,
            "malignancy_trained": bool(torch.isfinite(target.malignant).any())
            and c.malignant_weight > 0}

