"""The synthetic dataset must look to the loader exactly like the real BUSI download."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busiseg.data.demo import CLASSES, DATASET_DIRNAME, generate_demo
from busiseg.errors import BusisegError

SMALL = {
    "n_benign": 12,
    "n_malignant": 13,
    "n_normal": 5,
    "min_size": 48,
    "max_size": 80,
    "seed": 3,
}
NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?\.png$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo(out, **SMALL)
    return out / DATASET_DIRNAME, summary


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _cases(root: Path, cls: str) -> dict[str, list[Path]]:
    """Image stem -> its mask files, main mask first."""
    stems = sorted(p.stem for p in (root / cls).glob("*.png") if "_mask" not in p.name)
    return {
        s: sorted((root / cls).glob(f"{s}_mask*.png"), key=lambda p: (len(p.name), p.name))
        for s in stems
    }


def _mask_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation, computed independently of the generator's own helper."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, structure=np.ones((2 * radius + 1,) * 2, bool))


def test_layout_and_file_names(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    for cls in CLASSES:
        files = [p for p in (root / cls).iterdir()]
        assert all(p.is_file() for p in files)
        names = {p.name for p in files}
        for name in names:
            m = NAME.match(name)
            assert m and m.group(1) == cls, name
        n = SMALL[f"n_{cls}"]
        images = {f"{cls} ({i}).png" for i in range(1, n + 1)}
        assert {x for x in names if "_mask" not in x} == images
        assert {f"{cls} ({i})_mask.png" for i in range(1, n + 1)} <= names
        for name in names:
            m = NAME.match(name)
            assert m is not None
            if m.group(4):
                assert cls != "normal", name
                k = int(m.group(4))
                assert k in (1, 2), name
                previous = "_mask" if k == 1 else f"_mask_{k - 1}"
                assert f"{cls} ({m.group(2)}){previous}.png" in names


def test_summary_matches_files(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    all_files = [p for cls in CLASSES for p in (root / cls).iterdir()]
    masks = [p for p in all_files if "_mask" in p.name]
    per_case = [len(m) for cls in CLASSES for m in _cases(root, cls).values()]
    rgb = [p for p in all_files if "_mask" not in p.name and Image.open(p).mode == "RGB"]
    rgba = [p for p in masks if Image.open(p).mode == "RGBA"]
    assert (
        summary["n_images"] == len(all_files) - len(masks) == sum(SMALL[f"n_{c}"] for c in CLASSES)
    )
    assert summary["n_masks"] == len(masks)
    assert summary["n_multi_mask"] == sum(n > 1 for n in per_case)
    assert summary["n_rgb_images"] == len(rgb)
    assert summary["n_rgba_masks"] == len(rgba)
    assert {summary[f"n_{c}"] for c in CLASSES} == {SMALL[f"n_{c}"] for c in CLASSES}


def test_multi_mask_quotas(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    benign = _cases(root, "benign")
    assert sum(len(m) >= 2 for m in benign.values()) >= 1
    assert sum(len(m) == 3 for m in benign.values()) == 1
    assert all(len(m) <= 3 for m in benign.values())
    assert all(len(m) == 1 for m in _cases(root, "normal").values())


def test_image_and_mask_modes(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    image_modes, lesion_mask_modes = [], []
    for cls in CLASSES:
        for stem, masks in _cases(root, cls).items():
            image_modes.append(Image.open(root / cls / f"{stem}.png").mode)
            for path in masks:
                mode = Image.open(path).mode
                if cls == "normal":
                    assert mode == "RGB", path.name
                else:
                    lesion_mask_modes.append(mode)
    assert set(image_modes) == {"L", "RGB"}
    assert image_modes.count("L") > image_modes.count("RGB")
    assert set(lesion_mask_modes) == {"1", "RGBA"}
    assert lesion_mask_modes.count("1") > lesion_mask_modes.count("RGBA")


def test_rgb_images_are_grey_with_small_coloured_marks_off_the_lesion(
    dataset: tuple[Path, dict],
) -> None:
    root, _ = dataset
    seen = 0
    for cls in CLASSES:
        for stem, masks in _cases(root, cls).items():
            img = Image.open(root / cls / f"{stem}.png")
            if img.mode != "RGB":
                continue
            seen += 1
            a = np.asarray(img).astype(int)
            coloured = (a[..., 0] != a[..., 1]) | (a[..., 1] != a[..., 2])
            assert 0 < coloured.sum() < 0.02 * coloured.size
            lesion = np.logical_or.reduce([_mask_array(p) > 0 for p in masks])
            assert not (coloured & lesion).any()
    assert seen >= 2


def test_rgba_masks_are_opaque_white_on_black(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    paths = [
        p
        for cls in CLASSES
        for p in (root / cls).glob("*_mask*.png")
        if Image.open(p).mode == "RGBA"
    ]
    assert paths
    for path in paths:
        a = np.asarray(Image.open(path))
        assert (a[..., 3] == 255).all()
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        assert set(np.unique(a[..., 0]).tolist()) == {0, 255}


def test_sizes_vary_within_bounds_and_masks_match_images(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    sizes = set()
    for cls in CLASSES:
        for stem, masks in _cases(root, cls).items():
            size = Image.open(root / cls / f"{stem}.png").size
            sizes.add(size)
            assert all(SMALL["min_size"] <= s <= SMALL["max_size"] for s in size)
            for path in masks:
                assert Image.open(path).size == size, path.name
    assert len({w for w, _ in sizes}) > 1 and len({h for _, h in sizes}) > 1


def test_mask_values(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for cls in CLASSES:
        for masks in _cases(root, cls).values():
            for path in masks:
                values = set(np.unique(_mask_array(path)).tolist())
                assert values == ({0} if cls == "normal" else {0, 255}), path.name


def test_extra_masks_are_separate_lesions(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    n_checked = 0
    for cls in ("benign", "malignant"):
        for masks in _cases(root, cls).values():
            arrays = [_mask_array(p) > 0 for p in masks]
            for i in range(len(arrays)):
                for j in range(i + 1, len(arrays)):
                    assert not (arrays[i] & arrays[j]).any()
                    n_checked += 1
    assert n_checked >= 2


def test_lesions_are_darker_than_their_surroundings(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for cls in ("benign", "malignant"):
        for stem, masks in _cases(root, cls).items():
            img = np.asarray(Image.open(root / cls / f"{stem}.png").convert("L")).astype(float)
            lesion = np.logical_or.reduce([_mask_array(p) > 0 for p in masks])
            ring = _dilate(lesion, 10) & ~_dilate(lesion, 2)
            assert img[lesion].mean() < 0.9 * img[ring].mean(), stem


def test_normal_images_are_textured(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for stem in _cases(root, "normal"):
        img = np.asarray(Image.open(root / "normal" / f"{stem}.png").convert("L"))
        assert img.std() > 10, stem


def test_pngs_carry_no_metadata(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for data in _file_bytes(root).values():
        assert not any(chunk in data for chunk in (b"tIME", b"tEXt", b"zTXt", b"iTXt"))


def test_same_arguments_give_identical_bytes(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, summary = dataset
    assert generate_demo(tmp_path, **SMALL) == summary
    assert _file_bytes(tmp_path / DATASET_DIRNAME) == _file_bytes(root)


def test_other_classes_do_not_depend_on_n_benign(
    dataset: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = dataset
    generate_demo(tmp_path, **{**SMALL, "n_benign": 4})
    before, after = _file_bytes(root), _file_bytes(tmp_path / DATASET_DIRNAME)
    for cls in ("malignant", "normal"):
        mine = {k: v for k, v in after.items() if k.startswith(f"{cls}/")}
        assert mine and mine == {k: v for k, v in before.items() if k.startswith(f"{cls}/")}
    assert sum(k.startswith("benign/") and "_mask" not in k for k in after) == 4


def test_seed_changes_the_data(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    generate_demo(tmp_path, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert _file_bytes(tmp_path / DATASET_DIRNAME) != _file_bytes(root)


def test_regeneration_removes_stale_files(tmp_path: Path) -> None:
    root = tmp_path / DATASET_DIRNAME
    (root / "benign").mkdir(parents=True)
    (root / "benign" / "benign (99).png").write_bytes(b"stale")
    (root / "junk").mkdir()
    (tmp_path / "keep.txt").write_text("not ours")
    generate_demo(tmp_path, n_benign=3, n_malignant=0, n_normal=1, min_size=32, max_size=40)
    generate_demo(tmp_path, n_benign=1, n_malignant=0, n_normal=1, min_size=32, max_size=40)
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    assert sorted(p.name for p in (root / "benign").iterdir()) == [
        "benign (1).png",
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
    ]
    assert list((root / "malignant").iterdir()) == []
    assert (tmp_path / "keep.txt").read_text() == "not ours"


def test_smallest_images_still_get_separate_non_empty_lesions(tmp_path: Path) -> None:
    generate_demo(tmp_path, n_benign=6, n_malignant=30, n_normal=0, min_size=32, max_size=32)
    root = tmp_path / DATASET_DIRNAME
    for cls in ("benign", "malignant"):
        for masks in _cases(root, cls).values():
            arrays = [_mask_array(p) > 0 for p in masks]
            assert all(a.any() for a in arrays)
            assert not (np.sum(arrays, axis=0) > 1).any()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_benign": -1}, "n_benign"),
        ({"n_malignant": -2}, "n_malignant"),
        ({"n_normal": 1.5}, "n_normal"),
        ({"n_benign": 0, "n_malignant": 0, "n_normal": 0}, "n_benign"),
        ({"min_size": 8}, "min_size"),
        ({"max_size": 4096}, "max_size"),
        ({"min_size": 200, "max_size": 100}, "max_size"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_invalid_arguments_raise_one_line_errors(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(BusisegError, match=rf"^demo\.{name} ") as info:
        generate_demo(tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / DATASET_DIRNAME).exists()
