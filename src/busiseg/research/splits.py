"""A single model's val and test subsets, loaded once for the research tools that probe it
(ablate, normals); the pipeline never imports this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from busiseg.evaluation.evaluate import load, subset
from busiseg.params import Params


@dataclass
class Splits:
    probs: Callable[[list[int], bool], np.ndarray]
    va_idx: list[int]
    te_idx: list[int]
    te_rows: pd.DataFrame
    va_true: np.ndarray
    te_true: np.ndarray


def load_splits(p: Params, model_path, cache_path, split_path) -> Splits:
    m = load(p, model_path, cache_path, split_path)
    va_idx, _ = subset(m.cache, m.split, "val")
    te_idx, te_rows = subset(m.cache, m.split, "test")
    return Splits(lambda idx, tta: m.predict(m.model, idx, tta)[0], va_idx, te_idx, te_rows,
                  m.truth(va_idx), m.truth(te_idx))
