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
from pathlib import Path

import numpy as np
import pandas as pd

from busiseg.data.cache import Reading, preprocess
from busiseg.data.ingest import IngestOptions, ingest, report_dict
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import load, open_model, score_test
from busiseg.evaluation.figures import FigureSettings
from busiseg.evaluation.malignancy import malignancy_figures
from busiseg.evaluation.metrics import rounded
from busiseg.inference.confidence import calibrate
from busiseg.inference.segment import MaskSettings
from busiseg.params import Params
from busiseg.runtime.progress import show_progress


def evaluate_external(p: Params, name: str, model_path: str | Path,
                      eval_path: str | Path, classifier_path: str | Path | None = None) -> dict:
    """With `classifier_path` (models/classifier.pt), its p_lesion is the lesion score and its
    malignancy is scored at the cut evaluate chose out of fold, where the set has classes."""
    if name not in p.external:
        known = ", ".join(p.external) or "none"
        raise BusisegError(f"params.yaml has no external.{name} (external datasets: {known})")
    ext = p.external[name]
    settings = MaskSettings.from_eval(eval_path)  # what evaluate chose on BUSI's held-out data
    opened = open_model(p, model_path)
    pre = opened[1]["preprocess"]
    size, channels = pre["size"], pre.get("channels", 1)
    shown = show_progress(p.data.progress)
    found = ingest(ext.raw_dir, IngestOptions(ext.on_problem, p.data.near_dup_hamming,
                                              p.data.workers, layout=ext, channels=channels,
                                              progress=shown), section=f"external.{name}")
    with tempfile.TemporaryDirectory() as tmp:
        cache, split = Path(tmp) / "cache.npz", Path(tmp) / "split.csv"
        manifest = Path(tmp) / "manifest.csv"  # the original sizes: boundary figures' unit
        reading = Reading(ext.mask_kind == "outline", p.data.burned_marks == "mask", channels,
                          ext.mask_resize == "resample")
        preprocess(found.rows, ext.raw_dir, size, cache, reading, p.data.workers, shown)
        pd.DataFrame({"case_id": [r["case_id"] for r in found.rows],
                      "class": [r["class"] for r in found.rows],
                      "split": "test"}).to_csv(split, index=False)
        pd.DataFrame(found.rows).to_csv(manifest, index=False)
        m = load(p, model_path, cache, split, opened, steps=1, manifest_path=manifest,
                 classifier_path=classifier_path)
        result = score_test(p, m, settings)
        m.step(f"external set {name} scored")
    if result["classifier_test"] is not None:
        external_malignancy(p, result, json.loads(Path(eval_path).read_text()),
                            m.classifier.malignancy)
    result["metrics"].update(n_problems=found.metrics["n_problems"])
    result["problems"] = [pr.message for pr in found.problems]
    result["report"] = report_dict(found, ext.raw_dir)  # what was skipped, converted, ignored
    return result


def external_malignancy(p: Params, result: dict, chosen: dict, trained: bool) -> None:
    probs = result["classifier_test"].copy()
    if chosen.get("malignant_temperature") is not None:  # calibrated as on BUSI
        probs[:, 1] = calibrate(probs[:, 1], float(chosen["malignant_temperature"]))
    result["per_image"]["p_lesion"] = np.round(probs[:, 0], 6)
    result["per_image"]["p_malignant"] = np.round(probs[:, 1], 6)
    if trained and chosen.get("malignant_threshold") is not None:
        cut = float(chosen["malignant_threshold"])
        result["metrics"].update(rounded({**malignancy_figures(
            FigureSettings.of(p.evaluate), probs[:, 1], result["test_rows"]["class"].tolist(),
            cut), "malignant_threshold": cut}))
