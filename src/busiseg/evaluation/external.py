"""External validation: the trained model (or fold ensemble) scored on a dataset it never saw,
from another hospital or scanner, with the threshold and post-processing chosen on BUSI's own
held-out data (read from metrics/eval.json): nothing about the external set is tuned on it.

The external set goes through the same ingest checks and the same preprocessing as the training
data, at the model's input size, and is scored by evaluate's own test-scoring code, so its
metrics have the test metrics' keys and meaning.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from busiseg.data.cache import preprocess
from busiseg.data.ingest import ingest, report_dict
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import load, score_test
from busiseg.modeling.model_file import load_model
from busiseg.params import Params


def evaluate_external(p: Params, name: str, model_path: str | Path,
                      eval_path: str | Path) -> dict:
    if name not in p.external:
        known = ", ".join(p.external) or "none"
        raise BusisegError(f"params.yaml has no external.{name} (external datasets: {known})")
    ext = p.external[name]
    chosen = _chosen(Path(eval_path))
    pre = load_model(model_path)[1]["preprocess"]  # checked and rebuilt, then dropped
    size, channels = pre["size"], pre.get("channels", 1)
    found = ingest(ext.raw_dir, ext.on_problem, p.data.near_dup_hamming, p.data.workers,
                   layout=ext, section=f"external.{name}", channels=channels)
    with tempfile.TemporaryDirectory() as tmp:
        cache, split = Path(tmp) / "cache.npz", Path(tmp) / "split.csv"
        preprocess(found.rows, ext.raw_dir, size, cache, p.data.workers,
                   ext.mask_kind == "outline", p.data.burned_marks == "mask", channels)
        pd.DataFrame({"case_id": [r["case_id"] for r in found.rows],
                      "class": [r["class"] for r in found.rows],
                      "split": "test"}).to_csv(split, index=False)
        q = replace(p, evaluate=replace(p.evaluate, tta=bool(chosen["used_tta"]),
                                        confidence=chosen.get("confidence") or "entropy",
                                        largest_cc=bool(chosen["used_largest_cc"]),
                                        fill_holes=bool(chosen["used_fill_holes"])))
        m = load(q, model_path, cache, split)
        result = score_test(q, m, q, chosen["threshold"], chosen["val_dice"],
                            chosen.get("presence_threshold"),
                            chosen.get("presence_temperature") or 1.0,
                            chosen.get("review_threshold"))
    result["metrics"].update(n_problems=found.metrics["n_problems"])
    result["problems"] = [pr.message for pr in found.problems]
    result["report"] = report_dict(found, ext.raw_dir)  # what was skipped, converted, ignored
    return result


def _chosen(path: Path) -> dict:
    """Threshold and pieces evaluate chose on BUSI's validation (or out-of-fold) data."""
    if not path.is_file():
        raise BusisegError(f"{path}: not found; run the evaluate stage first (dvc repro)")
    try:
        chosen = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BusisegError(f"{path}: not valid JSON ({exc.__class__.__name__}); re-run the "
                           "evaluate stage (dvc repro -f evaluate)") from None
    if not isinstance(chosen, dict):
        raise BusisegError(f"{path}: not evaluate's metrics; re-run the evaluate stage")
    need = ("threshold", "val_dice", "used_tta", "used_largest_cc", "used_fill_holes")
    missing = [k for k in need if k not in chosen]
    if missing:
        raise BusisegError(f"{path}: lacks {', '.join(missing)}; re-run the evaluate stage")
    return chosen
