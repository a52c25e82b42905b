"""Figures a reader can judge at a glance: curves, a test montage, the worst cases, and how
well the per-image confidence ranks the predictions (risk–coverage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global state

from busiseg.evaluation.metrics import aurc, risk_coverage

GT_COLOUR, PRED_COLOUR = "#2ecc71", "#e74c3c"


CURVES = ("train_loss", "val_loss", "val_dice", "val_iou", "lr")


def read_live_curves(live_dir: str | Path) -> pd.DataFrame:
    """One row per epoch from DVCLive's per-metric files (plots/metrics/NAME.tsv)."""
    frames = [pd.read_csv(Path(live_dir) / "plots" / "metrics" / f"{name}.tsv", sep="\t")
              .set_index("step")[[name]] for name in CURVES]
    return pd.concat(frames, axis=1).rename_axis("epoch").reset_index()


def read_live_runs(live_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The curves of one run, or of every fold (live_dir/fold_K/) of a cross-validation run."""
    live_dir = Path(live_dir)
    folds = sorted(live_dir.glob("fold_*"),  # fold_K, or fold_K_seed_S with train.seeds
                   key=lambda d: tuple(int(x) for x in d.name.split("_")[1::2]))
    if folds:
        return {d.name.replace("_", " "): read_live_curves(d) for d in folds}
    return {"": read_live_curves(live_dir)}


def plot_curves(runs: dict[str, pd.DataFrame] | pd.DataFrame, out: Path) -> None:
    """Loss, validation Dice/IoU and learning rate; with folds, one line per fold (each fold's
    validation is its own held-out fold, and its model is the last epoch)."""
    if isinstance(runs, pd.DataFrame):
        runs = {"": runs}
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, (name, curves) in enumerate(runs.items()):
        tag = f"{name} " if name else ""
        colour = {"color": f"C{i}"} if name else {}  # a fold's train and val in one colour
        axes[0].plot(curves["epoch"], curves["train_loss"], label=f"{tag}train", **colour)
        val = curves.dropna(subset=["val_dice"])  # train.val_every > 1 validates some epochs
        dot = {"marker": "o", "ms": 3} if len(val) < len(curves) else {}
        axes[0].plot(val["epoch"], val["val_loss"], label=f"{tag}val", ls="--", **dot, **colour)
        axes[1].plot(val["epoch"], val["val_dice"], label=f"{tag}val Dice", **dot, **colour)
        if not name:
            axes[1].plot(val["epoch"], val["val_iou"], label="val IoU", **dot)
            best = curves.loc[curves["val_dice"].idxmax()]
            axes[1].axvline(best["epoch"], color="grey", ls="--", lw=1,
                            label=f"best epoch {int(best['epoch'])}")
        axes[2].plot(curves["epoch"], curves["lr"])
    axes[0].set_title("loss")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("validation (lesion images, per-image mean)")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.savefig(out, dpi=110)


def _panel_row(axes, image, truth, pred, title: str) -> None:
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
    axes[1].imshow(truth, cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(pred, cmap="gray", vmin=0, vmax=1)
    axes[3].imshow(image, cmap="gray", vmin=0, vmax=255)
    for mask, colour in ((truth, GT_COLOUR), (pred, PRED_COLOUR)):
        if mask.any() and not mask.all():
            axes[3].contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])


def plot_cases(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, titles: list[str],
               out: Path, heading: str) -> None:
    """One row per case: image | ground truth | prediction | overlay (green truth, red pred);
    images grey N×H×W or colour N×H×W×3."""
    n = len(images)
    if n == 0:  # e.g. no lesion image in a tiny test split: say so instead of failing
        fig = Figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, f"{heading}: no cases to show", ha="center", va="center")
        fig.savefig(out, dpi=90)
        return
    fig = Figure(figsize=(8.4, 2.1 * n + 0.6))
    axes = fig.subplots(n, 4, squeeze=False)
    for col, name in enumerate(("image", "ground truth", "prediction", "overlay")):
        axes[0, col].set_title(name, fontsize=9)
    for r in range(n):
        _panel_row(axes[r], images[r], truths[r], preds[r], titles[r])
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def pick_montage(per_image: pd.DataFrame, n: int) -> list[int]:
    """Evenly spaced cases of every class, so a montage is not all benign."""
    picks: list[int] = []
    classes = sorted(per_image["class"].unique())
    per_class = max(1, n // max(1, len(classes)))
    for cls in classes:
        rows = np.flatnonzero(per_image["class"].to_numpy() == cls)
        take = np.linspace(0, len(rows) - 1, num=min(per_class, len(rows))).round().astype(int)
        picks.extend(rows[take].tolist())
    return sorted(picks)[:n]


def plot_dice_distribution(tables: dict[str, pd.DataFrame], out: Path) -> None:
    """Per-image Dice of the lesion images, one box and its points per set (test, out-of-fold):
    the spread the mean hides, and the failures behind it."""
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    names, values = [], []
    for name, table in tables.items():
        dice = table.loc[table["lesion_area"] > 0, "dice"].to_numpy()
        if len(dice):
            names.append(f"{name}\n(n={len(dice)}, mean {dice.mean():.3f})")
            values.append(dice)
    if values:
        ax.boxplot(values, vert=False, widths=0.5, showfliers=False)
        rng = np.random.default_rng(0)
        for i, v in enumerate(values, start=1):
            ax.scatter(v, i + rng.uniform(-0.15, 0.15, len(v)), s=6, alpha=0.5)
        ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("per-image Dice (lesion images)")
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(out, dpi=110)


def plot_risk_coverage(tables: dict[str, pd.DataFrame], out: Path) -> None:
    """Risk (1 − per-image Dice) of the images one keeps, against the share kept, most confident
    first; beside it what an oracle ranking and a random one would give. The closer to the
    oracle, the better the confidence tells a reader which masks to check."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for colour, (name, table) in zip(("C0", "C1"), tables.items()):
        if not len(table) or "confidence" not in table:
            continue
        risk = 1 - table["dice"].to_numpy()
        coverage, curve = risk_coverage(risk, table["confidence"].to_numpy())
        _, oracle = risk_coverage(risk, -risk)
        ax.plot(coverage, curve, color=colour,
                label=f"{name}: AURC {aurc(risk, table['confidence'].to_numpy()):.3f}")
        ax.plot(coverage, oracle, color=colour, ls=":", label=f"{name}: oracle {oracle.mean():.3f}")
        ax.axhline(risk.mean(), color=colour, ls="--", lw=0.8,
                   label=f"{name}: random {risk.mean():.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("risk of the kept images (1 − Dice)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)


def pick_worst(per_image: pd.DataFrame, n: int) -> list[int]:
    lesion = per_image[per_image["lesion_area"] > 0].sort_values(["dice", "case_id"])
    return [int(per_image.index.get_loc(i)) for i in lesion.index[:n]]
