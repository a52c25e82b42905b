"""--continue: which images an earlier predict run into the same folder has done, and whether
its masks were made as this run's would be (same model, settings, mask values and marks), so a
killed or extended run adds to the folder rather than mixing two kinds of masks."""

from __future__ import annotations

import json
from pathlib import Path

from busiseg.errors import BusisegError, first_line
from busiseg.inference.run_record import SCORES, Failure, input_path, mask_name, read_scores
from busiseg.inference.segment import SETTING_NAMES, MaskSettings


def plan_resume(out_dir: Path, files: list[Path], base: Path
                ) -> tuple[list[Path], list[Path], list[dict], list[Failure]]:
    """--continue: (images to predict, images done, the earlier rows to keep, clashes). An image
    is done when its mask is in `out_dir` and its row in predictions.csv: the mask is written
    last and the row after it, so a run killed mid-image left neither, or a mask without its
    row, and that image is predicted again. Earlier rows whose mask is gone are dropped. An
    image whose name an earlier run's other image took is a clash, neither done nor predicted.
    `base`: the folder an older record's relative paths start from; the rows kept come back
    with absolute paths."""
    rows = {r["mask"]: {**r, "image": input_path(base / r["image"])}
            for r in read_scores(out_dir / SCORES) if (out_dir / r["mask"]).is_file()}
    todo, done, clashes = [], [], []
    for p in files:
        row = rows.get(mask_name(p))
        if row is None:
            todo.append(p)
        elif Path(row["image"]).resolve() == p.resolve():
            done.append(p)
        else:
            clashes.append(Failure(p, f"its outputs would overwrite those of {row['image']} "
                                      "(same name, predicted by an earlier run)"))
    return todo, done, list(rows.values()), clashes


def check_resume(path: Path, now: dict) -> Path | None:
    """--continue: refuse to add to a folder whose predictions.json (if any) says its masks came
    from another model, other settings, other mask values or marks painted otherwise; else the
    folder a relative image path in it starts from (its cwd: records before absolute paths)."""
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
        difference = _difference(earlier, now)
        base = Path(earlier["cwd"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError,
            AttributeError) as exc:
        raise BusisegError(f"--continue: {path} is unreadable ({first_line(exc)}); give "
                           "another --out, or predict without --continue") from None
    if difference:
        raise BusisegError(f"--continue: the masks in {path.parent} were made with "
                           f"{difference}; give another --out for this run, or drop --continue "
                           "to predict every image again")
    return base


def _difference(earlier: dict, now: dict) -> str | None:
    """The first way the run recorded in `earlier` differs from this one that shows in masks."""
    was, model = earlier["model"], now["model"]
    if not _model_ids(was) & _model_ids(model):
        return (f"another model ({was.get('path')}, weights {_short(was.get('weights_digest'))};"
                f" this run: {model['path']}, weights {_short(model['weights_digest'])})")
    before = MaskSettings.from_dict(earlier["settings"]).as_dict()  # any earlier spelling
    changed = [k for k in SETTING_NAMES if before[k] != now["settings"][k]]
    if changed:
        return ", ".join(f"{k} {before[k]} (this run: {now['settings'][k]})" for k in changed)
    old, new = earlier["outputs"]["mask_values"], now["outputs"]["mask_values"]
    if old != new:
        return f"--mask-values {old[1]} (this run: {new[1]})"
    if bool(earlier["outputs"].get("mask_marks")) != now["outputs"]["mask_marks"]:
        return "{} --mask-marks (this run: {})".format(
            *(("without", "with") if now["outputs"]["mask_marks"] else ("with", "without")))
    return None


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "unknown"


def _model_ids(model: dict) -> set[str]:
    """What identifies a recorded model: its weights' digest (one for the .pt and its export)
    and its file's sha256; "digest" in a record from busiseg 0.1.0's first predict."""
    return {str(model[k]) for k in ("weights_digest", "file_sha256", "digest") if model.get(k)}
