"""Boundary metrics (HD95, NSD) against a brute-force reference on shapes whose distances are
known, their empty-mask conventions, and their place in evaluate's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import Box, crafted_loaded, fold_data

from busiseg.data.cache import load_cache
from busiseg.errors import BusisegError
from busiseg.evaluation.evaluate import Loaded, evaluate_folds, original_spacing, score_test
from busiseg.evaluation.metrics import boundary_metrics
from busiseg.inference.segment import MaskSettings
from busiseg.inference.sizes import lesion_size
from busiseg.params import parse_params

SIZE = 48


def outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask or the image, by shifting, no scipy."""
    m = np.pad(mask, 1)
    inside = (m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])
    return mask & ~inside


def brute(pred: np.ndarray, true: np.ndarray, spacing=(1.0, 1.0),
          tolerance: float = 1.0) -> tuple[float, float]:
    """HD95 (larger directed 95th percentile) and NSD from every pairwise distance between the
    two outlines' pixel coordinates."""
    a = np.argwhere(outline(pred)) * np.asarray(spacing)
    b = np.argwhere(outline(true)) * np.asarray(spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    a_to_b, b_to_a = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    nsd = ((a_to_b <= tolerance).sum() + (b_to_a <= tolerance).sum()) / (len(a) + len(b))
    return float(hd95), float(nsd)


def square(top: int, left: int, side: int = 12, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


def disc(radius: float, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return (yy - c) ** 2 + (xx - c) ** 2 <= radius ** 2


def one(pred, true, spacing=(1.0, 1.0), tolerance=1.0) -> tuple[float, float]:
    hd95, nsd = boundary_metrics(pred[None], true[None], np.array([spacing]), tolerance)
    return float(hd95[0]), float(nsd[0])


@pytest.mark.parametrize("k", [1, 3, 7])
def test_a_square_shifted_by_k_pixels_is_k_away(k):
    true = square(10, 10)
    for pred in (square(10 + k, 10), square(10, 10 + k)):
        got = one(pred, true)
        assert got[0] == pytest.approx(k)
        assert got == pytest.approx(brute(pred, true))


@pytest.mark.parametrize("k", [2, 5])
def test_anisotropic_spacing_scales_each_axis(k):
    true, spacing = square(10, 10), (2.0, 0.5)
    down, right = square(10 + k, 10), square(10, 10 + k)
    assert one(down, true, spacing)[0] == pytest.approx(2.0 * k)
    assert one(right, true, spacing)[0] == pytest.approx(0.5 * k)
    for pred in (down, right):
        assert one(pred, true, spacing, 1.5) == pytest.approx(brute(pred, true, spacing, 1.5))


def test_concentric_discs_are_the_difference_of_their_radii_apart():
    small, large = disc(8), disc(14)
    hd95, nsd = one(small, large, tolerance=2.0)
    assert hd95 == pytest.approx(6, abs=1)
    assert nsd == 0.0  # every point of either outline is about 6 from the other
    assert (hd95, nsd) == pytest.approx(brute(small, large, tolerance=2.0))
    assert one(large, small, tolerance=2.0) == pytest.approx((hd95, nsd))  # symmetric


def test_nsd_is_one_within_the_tolerance_and_less_below_it():
    true, pred = square(10, 10), square(13, 10)  # 3 pixels down
    assert one(pred, true, tolerance=3.0)[1] == 1.0
    assert one(pred, true, tolerance=5.0)[1] == 1.0
    tight = one(pred, true, tolerance=2.5)[1]
    assert 0 < tight < 1
    assert tight == pytest.approx(brute(pred, true, tolerance=2.5)[1])
    assert one(true, true, tolerance=0.0) == (0.0, 1.0)  # identical outlines


def test_irregular_shapes_at_irregular_spacing_match_the_brute_force():
    rng = np.random.default_rng(1)
    pred, true, spacing = [], [], rng.uniform(0.3, 3.0, (8, 2))
    for _ in range(8):
        a, b = disc(rng.uniform(4, 12)), disc(rng.uniform(4, 12))
        speckle = rng.random(a.shape) > 0.995  # lone pixels: outlines of one point
        pred.append(np.roll(a, rng.integers(-20, 20, 2), axis=(0, 1)) | speckle)
        true.append(np.roll(b, rng.integers(-20, 20, 2), axis=(0, 1)))
    pred[0][:5, :] = True  # a mask cut by the image's edge has an outline along it
    hd95, nsd = boundary_metrics(np.array(pred), np.array(true), spacing, 4.0)
    for i in range(8):
        assert (hd95[i], nsd[i]) == pytest.approx(brute(pred[i], true[i], spacing[i], 4.0)), i


def test_empty_masks_follow_metrics_reloaded():
    empty, lesion = np.zeros((SIZE, SIZE), bool), square(10, 10)
    assert one(empty, empty) == (0.0, 1.0)  # nothing to find, nothing found
    diagonal = np.hypot(SIZE * 2.0, SIZE * 0.5)
    for pred, true in ((empty, lesion), (lesion, empty)):  # missed lesion, false positive
        hd95, nsd = one(pred, true, (2.0, 0.5))
        assert nsd == 0.0
        assert hd95 == pytest.approx(diagonal)


def test_inputs_shapes_and_tolerance():
    masks = np.stack([square(10, 10), square(12, 10)])
    flat = boundary_metrics(masks, masks[::-1], np.array([1.0, 1.0]), 1.0)  # one spacing for all
    channel = boundary_metrics(masks[:, None], masks[::-1, None], np.ones((2, 2)), 1.0)
    assert np.array_equal(flat[0], channel[0]) and np.array_equal(flat[1], channel[1])
    with pytest.raises(BusisegError, match="same N×H×W"):
        boundary_metrics(masks, masks[:1], np.ones((2, 2)), 1.0)
    with pytest.raises(BusisegError, match="positive"):
        boundary_metrics(masks, masks, np.zeros((2, 2)), 1.0)
    with pytest.raises(BusisegError, match="evaluate.surface_tolerance must be > 0"):
        parse_params({"evaluate": {"surface_tolerance": 0}})
    assert parse_params({}).evaluate.surface_tolerance == 5.0


# ---- evaluate's figures -------------------------------------------------------------------


def write_manifest(path: Path, cache_path: Path) -> Path:
    """Every cached case as if its original were 96 rows by 64 columns."""
    ids = load_cache(cache_path).case_ids
    pd.DataFrame({"case_id": ids, "width": 64, "height": 96}).to_csv(path, index=False)
    return path


def test_spacing_is_the_original_size_over_the_cache_size(tmp_path):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"case_id": ["a", "b"], "width": [300, 64], "height": [150, 64]}).to_csv(
        manifest, index=False)
    assert original_spacing(manifest, ["b", "a"], 32).tolist() == [[2.0, 2.0], [150 / 32, 300 / 32]]
    with pytest.raises(BusisegError, match="m.csv has no case 'c'"):
        original_spacing(manifest, ["a", "c"], 32)


def folded(tmp_path: Path, spacing: bool) -> Loaded:
    """Three crafted fold models, each a box over the first k + 8 rows: outlines that differ."""
    tmp_path.mkdir(exist_ok=True)
    cache_path, split_path = fold_data(tmp_path)
    cache = load_cache(cache_path)
    sizes = (original_spacing(write_manifest(tmp_path / "manifest.csv", cache_path),
                              cache.case_ids, cache.size) if spacing else None)
    return crafted_loaded([Box(k + 8, slice(4, 20)) for k in range(3)], cache_path, split_path,
                          sizes)


def test_evaluate_reports_lesion_means_with_intervals_test_and_out_of_fold(tmp_path):
    p = parse_params({"split": {"folds": 3}, "evaluate": {"bootstrap": 100,
                                                          "surface_tolerance": 6.0}})
    m = folded(tmp_path, spacing=True)
    result = evaluate_folds(p, m)
    metrics = result["metrics"]
    spacing = np.array([[3.0, 2.0]])  # 96 × 64 originals cached at 32 × 32
    for prefix, table, pred, idx in (("", result["per_image"], result["test_pred"],
                                      result["test_idx"]),
                                     ("cv_", result["cv_per_image"], result["cv_pred"],
                                      result["cv_idx"])):
        true = m.truth(list(idx))
        hd95, nsd = boundary_metrics(pred, true, spacing, 6.0)
        assert np.allclose(table["hd95"], hd95, atol=1e-6)
        assert np.allclose(table["nsd"], nsd, atol=1e-6)
        lesion = true.reshape(len(true), -1).any(axis=1)
        assert 0 < lesion.sum() < len(lesion)  # normals in the table, not in the means
        assert metrics[f"{prefix}hd95"] == pytest.approx(hd95[lesion].mean(), abs=1e-6)
        assert metrics[f"{prefix}nsd"] == pytest.approx(nsd[lesion].mean(), abs=1e-6)
        for key in ("hd95", "nsd"):
            k = prefix + key
            assert metrics[f"{k}_ci_low"] <= metrics[k] <= metrics[f"{k}_ci_high"], k
    # boundary figures sit beside the others; without sizes there is no unit and no figure
    plain = evaluate_folds(p, folded(tmp_path / "plain", spacing=False))["metrics"]
    measured = ("hd95", "nsd", "long_axis")  # the size figures need the unit too
    assert not {k for k in plain if any(word in k for word in measured)}
    assert {k: v for k, v in metrics.items() if not any(word in k for word in measured)} == plain


def test_the_overlay_draws_the_outline_the_metrics_measure():
    """One outline rule: predict's overlay edge is exactly the contour HD95 and NSD start from,
    the reference rule above included (a mask cut by the image's edge has an outline there)."""
    from busiseg.data.images import outline as busiseg_outline
    from busiseg.inference.predict import overlay

    mask = disc(9) | square(0, 30, side=10)  # the square touches the top edge
    drawn = np.asarray(overlay(np.zeros(mask.shape, np.uint8), mask))
    edge = (drawn == [255, 40, 40]).all(axis=2)
    assert edge[0, 30:40].all()
    assert np.array_equal(edge, busiseg_outline(mask))
    assert np.array_equal(edge, outline(mask))
    assert np.array_equal(busiseg_outline(np.stack([mask, ~mask]))[0], edge)


def test_evaluate_reports_lesion_sizes_and_the_long_axis_error_in_px_and_mm(tmp_path):
    """Each image's predicted and true long axis in original pixels (96 × 64 originals cached
    at 32 × 32: a cache pixel is 3 × 2 of them) and in mm where the pixel size is known; the
    mean absolute long-axis error over the lesion images, in mm over those with a size."""
    p = parse_params({"split": {"folds": 3}, "evaluate": {"bootstrap": 100}})
    m = folded(tmp_path, spacing=True)
    m.pixel_mm = np.full((len(m.cache.case_ids), 2), np.nan)
    m.pixel_mm[::2] = 0.1  # every other image states 0.1 mm pixels
    result = evaluate_folds(p, m)
    metrics = result["metrics"]
    for prefix, table, pred, idx in (("", result["per_image"], result["test_pred"],
                                      result["test_idx"]),
                                     ("cv_", result["cv_per_image"], result["cv_pred"],
                                      result["cv_idx"])):
        true = m.truth(list(idx))
        want = np.array([lesion_size(t, (3.0, 2.0)).long_axis for t in true])
        got = np.array([lesion_size(q, (3.0, 2.0)).long_axis for q in pred])
        assert np.allclose(table["true_long_axis_px"], want, atol=1e-4)
        assert np.allclose(table["long_axis_error_px"], got - want, atol=1e-3)
        lesion = true.reshape(len(true), -1).any(axis=1)
        assert metrics[f"{prefix}long_axis_mae_px"] == pytest.approx(
            np.abs(got - want)[lesion].mean(), abs=1e-5)
        known = ~np.isnan(m.pixel_mm[list(idx), 0])
        assert np.allclose(table["long_axis_mm"][known], got[known] * 0.1, atol=1e-3)
        assert table["long_axis_mm"][~known].isna().all()
        use = lesion & known
        if not use.any():  # no lesion image with a size: no mm figure at all (never cv here)
            assert f"{prefix}long_axis_mae_mm" not in metrics and prefix == ""
            continue
        assert metrics[f"{prefix}n_long_axis_mm"] == int(use.sum())
        assert metrics[f"{prefix}long_axis_mae_mm"] == pytest.approx(
            np.abs(got - want)[use].mean() * 0.1, abs=1e-5)
        k = f"{prefix}long_axis_mae_px"
        assert metrics[f"{k}_ci_low"] <= metrics[k] <= metrics[f"{k}_ci_high"]


def test_sizes_sit_beside_the_test_figures_not_in_place_of_them(tmp_path):
    """score_test's per-image table gains the size columns; its calibration table stays the
    reliability bins (the two are different tables that once shared a name)."""
    p = parse_params({"evaluate": {"bootstrap": 0}})
    m = folded(tmp_path, spacing=True)
    result = score_test(p, m, MaskSettings())
    assert {"dice", "hd95", "long_axis_px", "true_long_axis_px"} <= set(result["per_image"])
    assert result["reliability"] and all(set(row) == {"bin", "confidence", "lesion_rate",
                                                      "images"} for row in result["reliability"])
