from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_case, write_png
from PIL import Image

from busiseg.data.cache import load_cache, preprocess, resize_pair
from busiseg.data.images import mask_to_bool
from busiseg.data.ingest import ingest
from busiseg.data.split import make_split, split_metrics
from busiseg.errors import BusisegError


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "LA"])
def test_mask_modes_decode_to_the_same_lesion(tmp_path: Path, mode: str):
    lesion = np.zeros((20, 30), bool)
    lesion[5:12, 8:20] = True
    p = write_png(tmp_path / "m.png", (lesion * 255).astype(np.uint8), mode)
    assert Image.open(p).mode == mode
    np.testing.assert_array_equal(mask_to_bool(Image.open(p), p), lesion)


def test_rgba_mask_lesion_ignores_opaque_alpha(tmp_path: Path):
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 3] = 255  # as in the real benign (4)_mask_1.png: opaque everywhere
    arr[2:5, 2:5, :3] = 255
    p = tmp_path / "m.png"
    Image.fromarray(arr, "RGBA").save(p)
    assert mask_to_bool(Image.open(p), p).sum() == 9


def test_union_of_masks_and_binary_resize(small_busi: Path, tmp_path: Path):
    # benign (1) has two masks in the fixture: the cache holds their union
    make_case(small_busi, "benign", 9, size=(120, 90), n_masks=3, mask_mode="RGBA")
    manifest = ingest(small_busi).manifest
    out = tmp_path / "cache.npz"
    info = preprocess(manifest, small_busi, 32, out, workers=1)
    cache = load_cache(out)
    assert info["n_images"] == len(manifest) == len(cache.case_ids)
    assert cache.case_ids == manifest["case_id"].tolist()
    assert tuple(cache.images.shape) == (len(manifest), 1, 32, 32)
    assert load_cache(out, 32).size == 32
    with pytest.raises(BusisegError, match="holds 32x32 images but preprocess.size is 64"):
        load_cache(out, 64)  # a stale cache of another size is refused, not trained on
    assert set(np.unique(cache.masks.numpy())) <= {0, 1}
    i = cache.case_ids.index("benign (1)")
    j = cache.case_ids.index("benign (2)")
    assert cache.masks[i].sum() > 1.5 * cache.masks[j].sum()  # two discs vs one
    k = cache.case_ids.index("normal (1)")
    assert cache.masks[k].sum() == 0


def test_resize_keeps_masks_strictly_binary():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (301, 457), dtype=np.uint8)
    mask = np.zeros((301, 457), bool)
    mask[50:200, 100:300] = True
    for size in (32, 96, 256, 512):
        img, m = resize_pair(image, mask, size)
        assert img.shape == m.shape == (size, size) and img.dtype == np.uint8
        assert set(np.unique(m)) == {0, 1}
        assert abs(m.mean() - mask.mean()) < 0.03


def test_a_large_cache_round_trips_exactly(small_busi: Path, tmp_path: Path):
    """How fast it loads is bench/bench.py's (`data`); here, that it loads what was written."""
    manifest = ingest(small_busi).manifest
    big = pd.concat([manifest] * 40, ignore_index=True)
    big["case_id"] = [f"c{i}" for i in range(len(big))]
    out = tmp_path / "cache.npz"
    preprocess(big, small_busi, 128, out, workers=1)
    cache = load_cache(out, size=128)
    assert cache.case_ids == big["case_id"].tolist()
    assert cache.images.shape == cache.masks.shape == (len(big), 1, 128, 128)
    n = len(manifest)
    assert torch.equal(cache.images[:n], cache.images[n:2 * n])  # the same images, same order
    assert cache.masks.max() == 1 and 0 < cache.masks.float().mean() < 0.5


def _manifest(n_per_class=(40, 20, 12)) -> pd.DataFrame:
    rows = []
    for cls, n in zip(("benign", "malignant", "normal"), n_per_class):
        rows += [{"case_id": f"{cls} ({i})", "class": cls} for i in range(1, n + 1)]
    df = pd.DataFrame(rows)
    df["dup_group"] = range(len(df))
    return df


def test_split_is_stratified_and_deterministic():
    m = _manifest()
    a = make_split(m, 0.8, 0.1, 0.1, seed=3)
    b = make_split(m, 0.8, 0.1, 0.1, seed=3)
    c = make_split(m, 0.8, 0.1, 0.1, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    metrics = split_metrics(a)
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == len(m)
    for cls, n in (("benign", 40), ("malignant", 20), ("normal", 12)):
        assert abs(metrics[f"n_test_{cls}"] - 0.1 * n) <= 1
        assert abs(metrics[f"n_val_{cls}"] - 0.1 * n) <= 1


def test_split_keeps_duplicate_groups_together():
    m = _manifest()
    m.loc[m.index[:10], "dup_group"] = 0  # ten copies of one frame
    m.loc[m.index[40:43], "dup_group"] = 40
    for seed in range(5):
        s = make_split(m, 0.8, 0.1, 0.1, seed=seed)
        assert s.groupby("dup_group")["split"].nunique().max() == 1
        assert split_metrics(s)["n_groups_across_splits"] == 0


def test_folds_are_stratified_grouped_deterministic_and_cover_every_non_test_case_once():
    m = _manifest()
    m.loc[m.index[:6], "dup_group"] = 0  # six copies of one benign frame
    m.loc[m.index[45:48], "dup_group"] = 45  # three of one malignant frame
    s = make_split(m, 0.8, 0.1, 0.1, seed=0, folds=5)
    pd.testing.assert_frame_equal(s, make_split(m, 0.8, 0.1, 0.1, seed=0, folds=5))
    assert not s["fold"].equals(make_split(m, 0.8, 0.1, 0.1, seed=1, folds=5)["fold"])
    assert set(s.loc[s["split"] == "test", "fold"]) == {-1}
    assert set(s["split"]) == {"cv", "test"}
    cv = s[s["split"] == "cv"]
    assert set(cv["fold"]) == {0, 1, 2, 3, 4} and len(cv) + (s["split"] == "test").sum() == len(m)
    assert cv.groupby("dup_group")["fold"].nunique().max() == 1  # a group stays in one fold
    # class-stratified over groups: each fold holds about a fifth of each class's groups
    groups = cv.drop_duplicates("dup_group")
    for cls in groups["class"].unique():
        per_fold = groups[groups["class"] == cls]["fold"].value_counts().reindex(range(5),
                                                                               fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1, cls
    # the test split is the one K = 0 holds out, so single-split and CV runs share test images
    single = make_split(m, 0.8, 0.1, 0.1, seed=0)
    assert set(s.loc[s["split"] == "test", "case_id"]) == set(
        single.loc[single["split"] == "test", "case_id"])
    metrics = split_metrics(s)
    assert metrics["n_cv"] == len(cv) and metrics["n_groups_across_folds"] == 0
    assert sum(metrics[f"n_fold_{k}"] for k in range(5)) == len(cv)


def test_split_too_small_is_a_clear_error():
    from busiseg.errors import BusisegError

    with pytest.raises(BusisegError, match="split"):
        make_split(_manifest((3, 1, 1)), 0.8, 0.1, 0.1, seed=0)
