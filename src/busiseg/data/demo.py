"""Synthetic stand-in for the BUSI dataset, so that a fresh clone runs the pipeline offline.

The real download (Al-Dhabyani et al. 2020) is not shipped with the repository, but every stage
only needs files that look like it. This module writes a deterministic dataset with the same folder
layout, file names and format quirks (grey and RGB images, 1-bit / RGB / RGBA masks, extra
``_mask_1`` / ``_mask_2`` lesions), so the loader meets every case it must handle, and with images
that are ultrasound-like enough for a U-Net to learn and for montages to read: speckle, tissue
layers, depth attenuation, dark lesions with class-typical outlines and posterior acoustic effects.

Only numpy and Pillow are used. Every case draws from its own ``SeedSequence([salt, seed, class,
case])``, so the same arguments give byte-identical PNGs and the cases of one class do not depend on
how many cases the other classes have. The image path avoids floating-point reductions (their
summation order may depend on the CPU's SIMD width) and per-pixel powers, so that outputs do not
drift between machines.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from busiseg.data.classes import CLASSES
from busiseg.errors import BusisegError

DATASET_DIRNAME = "Dataset_BUSI_with_GT"
_F = np.float32  # halves memory traffic; 8-bit output needs no more precision

_SALT = 0xB051  # keeps these streams apart from other code seeded with the same small integers
_RGB_FRACTION = 0.10  # the real download has 16 of 780 images in RGB; more here so tests see them
_MULTI_FRACTION = 0.08
_N_RGBA_MASKS = 2  # real: benign (4)_mask_1.png and benign (54)_mask_1.png
_MAX_PLACEMENT_TRIES = 64
_MARK_COLOURS = ((255, 255, 0), (255, 255, 0), (0, 255, 255))  # mostly yellow, like BUSI's marks

# Separable speckle kernels: the lateral resolution of a transducer is worse than the axial one,
# so speckle grains are wider than tall.
_KERNEL_X = np.array([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]) / 16.0
_KERNEL_Y = np.array([1.0, 2.0, 1.0]) / 4.0
# Display curve, a mild log-like compression as on a scanner; a lookup table is faster than a
# per-pixel power and cannot differ between math libraries.
_TONE = (np.linspace(0.0, 1.0, 4097) ** 0.8 * 255.0 + 0.5).astype(np.uint8)
# Mean of |blurred complex unit Gaussian|: Rayleigh mean sigma * sqrt(pi / 2), computed from the
# kernels instead of the data so normalisation involves no platform-dependent reduction.
_SPECKLE_MEAN = math.sqrt(float(np.sum(_KERNEL_X**2) * np.sum(_KERNEL_Y**2))) * math.sqrt(
    math.pi / 2
)


@dataclass(frozen=True)
class _CasePlan:
    """Per-case format decisions, drawn per class so quotas (≥ 1 multi-mask, RGBA) are exact."""

    n_lesions: int
    rgb: bool
    rgba_masks: frozenset[int]  # indices into the case's masks (0 = "_mask", 1 = "_mask_1", ...)


@dataclass(frozen=True)
class _Shape:
    """Star-shaped outline r(θ) in a rotated, vertically stretched frame.

    Ovals and spiculated masses are the same code with different harmonics and spikes, and the
    ``bound`` makes placement and cropping cheap.
    """

    base: float
    aspect: float  # height / width before rotation
    rot: float
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, amplitude, phase)
    spikes: tuple[tuple[float, float, float], ...] = ()  # (angle, height, half-width in rad)
    cx: int = 0
    cy: int = 0

    @property
    def bound(self) -> float:
        """Upper bound of the outline's distance from the centre."""
        wobble = sum(abs(a) for _, a, _ in self.harmonics)
        spike = max((height for _, height, _ in self.spikes), default=0.0)
        return self.base * (1.0 + wobble + spike) * max(1.0, self.aspect)

    def radius(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for order, amp, phase in self.harmonics:
            r += amp * np.cos(order * theta + phase)
        for angle, height, width in self.spikes:
            d = np.abs((theta - angle + math.pi) % (2 * math.pi) - math.pi)
            r += height * np.clip(1.0 - d / width, 0.0, None) ** 2
        return self.base * np.maximum(r, 0.4)  # a floor keeps the shape connected


@dataclass(frozen=True)
class _Lesion:
    """A hypoechoic region and how it changes the echoes around it."""

    shape: _Shape
    level: float  # echo strength inside, relative to tissue (< 1: darker)
    texture: float  # fraction of the tissue speckle contrast kept inside
    edge: float  # margin blur in px: sharp cyst walls, ill-defined carcinomas
    posterior: float  # > 1 enhancement, < 1 shadowing, applied below the lesion
    heterogeneity: float  # smooth internal variation, mostly in malignant masses


def generate_demo(
    out_dir: Path | str,
    n_benign: int = 40,
    n_malignant: int = 30,
    n_normal: int = 20,
    min_size: int = 160,
    max_size: int = 320,
    seed: int = 0,
) -> dict:
    """Write a synthetic BUSI-layout dataset to ``out_dir/Dataset_BUSI_with_GT`` (recreated).

    The folder is deleted first, so files from an earlier, larger run never survive into DVC's
    view of the data. Returns summary counts: n_images, n_masks, n_multi_mask (images with more
    than one mask), n_rgb_images, n_rgba_masks and n_benign / n_malignant / n_normal.
    """
    counts = {"n_benign": n_benign, "n_malignant": n_malignant, "n_normal": n_normal}
    _validate(counts, min_size, max_size, seed)
    root = _fresh_root(Path(out_dir))
    summary = {
        "n_images": 0,
        "n_masks": 0,
        "n_multi_mask": 0,
        "n_rgb_images": 0,
        "n_rgba_masks": 0,
        **{name: int(n) for name, n in counts.items()},
    }
    for class_index, cls in enumerate(CLASSES):
        n_cases = counts[f"n_{cls}"]
        for number, plan in enumerate(_plan_class(cls, n_cases, seed, class_index), start=1):
            rng = _rng(seed, class_index, number)
            _write_case(rng, root / cls, f"{cls} ({number})", cls, plan, min_size, max_size)
            n_masks = max(plan.n_lesions, 1)
            summary["n_images"] += 1
            summary["n_masks"] += n_masks
            summary["n_multi_mask"] += int(n_masks > 1)
            summary["n_rgb_images"] += int(plan.rgb)
            summary["n_rgba_masks"] += len(plan.rgba_masks)
    return summary


# --- arguments and layout ---------------------------------------------------------------------


def _validate(counts: dict[str, int], min_size: int, max_size: int, seed: int) -> None:
    """Stop with one line naming the params key, before anything on disk is touched."""
    values = {**counts, "min_size": min_size, "max_size": max_size, "seed": seed}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise BusisegError(f"demo.{name} must be an integer, got {value!r}")
    for name, value in counts.items():
        if value < 0:
            raise BusisegError(f"demo.{name} must be ≥ 0, got {value}")
    if sum(counts.values()) < 1:
        raise BusisegError("demo.n_benign + demo.n_malignant + demo.n_normal must be ≥ 1, got 0")
    if min_size < 32:
        raise BusisegError(f"demo.min_size must be ≥ 32, got {min_size}")
    if max_size > 2048:
        raise BusisegError(f"demo.max_size must be ≤ 2048, got {max_size}")
    if max_size < min_size:
        raise BusisegError(f"demo.max_size must be ≥ demo.min_size ({min_size}), got {max_size}")
    if seed < 0:
        raise BusisegError(f"demo.seed must be ≥ 0, got {seed}")


def _fresh_root(out_dir: Path) -> Path:
    root = out_dir / DATASET_DIRNAME
    if root.is_symlink() or root.is_file():
        root.unlink()
    elif root.exists():
        shutil.rmtree(root)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
    return root


def _rng(seed: int, class_index: int, number: int) -> np.random.Generator:
    """Case streams use number ≥ 1 and class plans 0: SeedSequence pads with zeros, so a shorter
    key would collide with a longer one that ends in 0."""
    return np.random.default_rng(np.random.SeedSequence([_SALT, seed, class_index, number]))


def _plan_class(cls: str, n: int, seed: int, class_index: int) -> list[_CasePlan]:
    """Decide which cases carry the format quirks, with the quotas the loader's tests rely on."""
    rng = _rng(seed, class_index, 0)
    n_rgb = round(_RGB_FRACTION * n)
    if n >= 5:
        n_rgb = max(1, n_rgb)
    rgb = {int(i) for i in rng.choice(n, size=n_rgb, replace=False)}
    extra = [0] * n
    rgba: dict[int, frozenset[int]] = {}
    if cls != "normal" and n > 0:
        n_multi = round(_MULTI_FRACTION * n)
        if cls == "benign":
            n_multi = max(1, n_multi)
        multi = [int(i) for i in rng.choice(n, size=n_multi, replace=False)]
        for i in multi:
            extra[i] = 1
        if cls == "benign":
            if n >= 3:
                extra[multi[0]] = 2  # the real download has exactly one "_mask_2"
            for i in multi[:_N_RGBA_MASKS]:
                rgba[i] = frozenset({1})
    return [
        _CasePlan(
            n_lesions=0 if cls == "normal" else 1 + extra[i],
            rgb=i in rgb,
            rgba_masks=rgba.get(i, frozenset()),
        )
        for i in range(n)
    ]


def _write_case(
    rng: np.random.Generator,
    folder: Path,
    stem: str,
    cls: str,
    plan: _CasePlan,
    min_size: int,
    max_size: int,
) -> None:
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    grey, masks = _render(rng, cls, plan.n_lesions, h, w)
    if plan.rgb:
        union = np.logical_or.reduce(masks) if masks else np.zeros((h, w), dtype=bool)
        Image.fromarray(_annotate(rng, grey, union)).save(folder / f"{stem}.png")
    else:
        Image.fromarray(grey).save(folder / f"{stem}.png")
    if not masks:  # every normal mask in the real download is an all-zero RGB image
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(folder / f"{stem}_mask.png")
    for k, mask in enumerate(masks):
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        _mask_image(mask, rgba=k in plan.rgba_masks).save(folder / f"{stem}{suffix}.png")


def _mask_image(mask: np.ndarray, rgba: bool) -> Image.Image:
    if not rgba:
        return Image.fromarray(mask)  # bool array -> mode "1", as most BUSI masks are
    value = mask.astype(np.uint8) * 255
    alpha = np.full_like(value, 255)
    return Image.fromarray(np.dstack([value, value, value, alpha]))


def _annotate(rng: np.random.Generator, grey: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Grey copied to RGB plus small coloured crosses off the lesion, like BUSI's RGB images."""
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    h, w = grey.shape
    for _ in range(int(rng.integers(1, 4))):
        arm = int(rng.integers(2, 5))
        colour = _MARK_COLOURS[int(rng.integers(len(_MARK_COLOURS)))]
        for _ in range(32):
            y, x = int(rng.integers(arm, h - arm)), int(rng.integers(arm, w - arm))
            m = arm + 3
            if not lesions[max(0, y - m) : y + m + 1, max(0, x - m) : x + m + 1].any():
                rgb[y, x - arm : x + arm + 1] = colour
                rgb[y - arm : y + arm + 1, x] = colour
                break
    return rgb


# --- image synthesis --------------------------------------------------------------------------


def _render(
    rng: np.random.Generator, cls: str, n_lesions: int, h: int, w: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One B-mode frame and its lesion masks (first lesion first)."""
    top = int(rng.integers(0, max(1, int(0.06 * h))))  # gel / stand-off band above the skin
    echo = _tissue(rng, h, w, top)
    lesions = _lesions(rng, cls, n_lesions, h, w, top)
    speckle = 1.0 + rng.uniform(0.5, 0.7) * (_speckle(rng, h, w) - 1.0)  # compounded, milder
    inner = _smooth_noise(rng, h, w, h // 16, w // 16)
    posterior = np.ones((h, w), dtype=_F)
    masks = []
    for lesion in lesions:
        depth = _depth(lesion.shape, h, w)
        alpha = np.clip(0.5 + depth / lesion.edge, 0.0, 1.0)
        mask = depth >= 0.0
        level = lesion.level * np.clip(1.0 + lesion.heterogeneity * inner, 0.3, 1.6)
        echo = echo * (1.0 - alpha) + level * alpha
        speckle = speckle * (1.0 - alpha) + (1.0 + lesion.texture * (speckle - 1.0)) * alpha
        posterior *= _posterior(mask, lesion.posterior)
        masks.append(mask)
    attenuation = np.exp(-rng.uniform(1.0, 2.0) * np.arange(h, dtype=_F) / h)
    signal = echo * speckle * posterior * attenuation[:, None] * _vignette(rng, w)[None, :]
    gain = rng.uniform(0.32, 0.45)
    level = (np.clip(gain * signal, 0.0, 1.0) * (len(_TONE) - 1) + 0.5).astype(np.intp)
    return _TONE[level], masks


def _tissue(rng: np.random.Generator, h: int, w: int, top: int) -> np.ndarray:
    """Echo strength of healthy breast tissue.

    Breast tissue is stratified parallel to the skin, so the texture is made of horizontally
    stretched noise (layers, short bright fibres), a few curved bright fasciae, slow regional
    variation and darker fat lobules; normal cases thereby are structured rather than blank.
    """
    layers = 0.3 * _smooth_noise(rng, h, w, h // 10, w // 50)
    region = 0.25 * _smooth_noise(rng, h, w, 3, 3)
    fibres = 0.6 * np.maximum(_smooth_noise(rng, h, w, h // 4, w // 20), 0.0) ** 2
    echo = np.maximum(1.0 + layers + region, 0.45) + fibres + _fasciae(rng, h, w, top)
    for _ in range(int(rng.integers(1, 5))):
        lobule = _Shape(
            base=rng.uniform(0.03, 0.1) * w,
            aspect=rng.uniform(0.35, 0.8),
            rot=rng.uniform(-0.3, 0.3),
            cx=int(rng.integers(0, w)),
            cy=int(rng.integers(top, h)),
        )
        alpha = np.clip(0.5 + _depth(lobule, h, w) / rng.uniform(3.0, 6.0), 0.0, 1.0)
        echo *= 1.0 - rng.uniform(0.25, 0.5) * alpha
    echo[:top] *= 0.08
    return echo


def _fasciae(rng: np.random.Generator, h: int, w: int, top: int) -> np.ndarray:
    """Bright curved lines: the skin line at the top of the tissue and a few deeper fasciae."""
    rows = np.arange(h, dtype=_F)[:, None]
    x = np.arange(w, dtype=_F)
    out = np.zeros((h, w), dtype=_F)
    depths = [float(top) + 1.0] + [rng.uniform(top + 0.1 * h, 0.9 * h) for _ in range(3)]
    for i, y0 in enumerate(depths):
        sway = 0.0 if i == 0 else rng.uniform(0.01, 0.06) * h
        period = w * rng.uniform(0.6, 2.0)
        curve = y0 + sway * np.sin(2 * math.pi * x / period + rng.uniform(0, 2 * math.pi))
        strength = 1.5 if i == 0 else rng.uniform(0.3, 1.0)
        along = np.maximum(_smooth_noise(rng, 1, w, 2, w // 40)[0] + 0.5, 0.0)  # broken line
        width = rng.uniform(0.8, 2.0)
        y0_band = max(0, int(curve.min() - 4 * width))
        y1_band = min(h, int(curve.max() + 4 * width) + 2)
        dy = (rows[y0_band:y1_band] - curve) / width  # exp only where the line is visible
        out[y0_band:y1_band] += strength * along * np.exp(-(dy * dy))
    return out


def _speckle(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fully developed speckle with unit mean.

    The magnitude of a blurred complex Gaussian field: grains are spatially correlated like a real
    transducer's point-spread function, yet the amplitude stays Rayleigh-distributed.
    """
    re = _blur(rng.standard_normal((h, w), dtype=_F))
    im = _blur(rng.standard_normal((h, w), dtype=_F))
    return np.sqrt(re * re + im * im) / _SPECKLE_MEAN


def _vignette(rng: np.random.Generator, w: int) -> np.ndarray:
    """Dark lateral margins, where some probes lose contact with the skin."""
    if rng.random() < 0.5:
        return np.ones(w, dtype=_F)
    margin = rng.uniform(0.02, 0.08) * w
    x = np.arange(w, dtype=_F)
    t = np.clip(np.minimum(x, w - 1 - x) / margin, 0.0, 1.0)
    return 0.15 + 0.85 * t * t * (3.0 - 2.0 * t)


# --- lesions ----------------------------------------------------------------------------------


def _lesions(rng: np.random.Generator, cls: str, n: int, h: int, w: int, top: int) -> list[_Lesion]:
    """Draw and place ``n`` separate lesions; extra ones are smaller, as in the real data."""
    placed: list[_Lesion] = []
    taken = np.zeros((h, w), dtype=bool)
    for k in range(n):
        scale = 1.0 if k == 0 else rng.uniform(0.4, 0.8)
        lesion = _benign(rng, w, scale) if cls == "benign" else _malignant(rng, w, scale)
        shape = _place(rng, lesion.shape, h, w, top, taken)
        placed.append(replace(lesion, shape=shape))
        taken |= _dilate(_depth(shape, h, w) >= 0.0, 3)
    return placed


def _benign(rng: np.random.Generator, w: int, scale: float) -> _Lesion:
    """Smooth, wider-than-tall oval: cyst (near-anechoic, sharp wall) or fibroadenoma."""
    diameter = rng.uniform(0.06, 0.30) * w * scale
    shape = _Shape(
        base=max(3.0, diameter / 2),
        aspect=rng.uniform(0.45, 0.95),
        rot=rng.uniform(-math.pi / 4, math.pi / 4),
        harmonics=tuple((k, rng.uniform(0.0, 0.04), rng.uniform(0, 2 * math.pi)) for k in (2, 3)),
    )
    cyst = rng.random() < 0.5
    return _Lesion(
        shape=shape,
        level=rng.uniform(0.03, 0.12) if cyst else rng.uniform(0.2, 0.4),
        texture=rng.uniform(0.3, 0.6),
        edge=rng.uniform(0.8, 1.6),
        posterior=rng.uniform(1.15, 1.5) if rng.random() < 0.5 else 1.0,
        heterogeneity=0.0 if cyst else 0.15,
    )


def _malignant(rng: np.random.Generator, w: int, scale: float) -> _Lesion:
    """Irregular, lobulated and spiculated mass, often taller than wide and shadowing."""
    spikes = tuple(
        (rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.6), rng.uniform(0.04, 0.15))
        for _ in range(int(rng.integers(0, 8)))
    )
    harmonics = tuple((k, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * math.pi)) for k in range(2, 9))
    diameter = rng.uniform(0.10, 0.30) * w * scale
    shape = _Shape(
        base=max(3.0, diameter / 2 / 1.3),
        aspect=rng.uniform(0.7, 1.5),
        rot=rng.uniform(-math.pi / 6, math.pi / 6),
        harmonics=harmonics,
        spikes=spikes,
    )
    return _Lesion(
        shape=shape,
        level=rng.uniform(0.15, 0.45),
        texture=rng.uniform(0.4, 0.8),
        edge=rng.uniform(1.5, 3.5),
        posterior=rng.uniform(0.35, 0.75) if rng.random() < 0.65 else 1.0,
        heterogeneity=0.35,
    )


def _place(
    rng: np.random.Generator, shape: _Shape, h: int, w: int, top: int, taken: np.ndarray
) -> _Shape:
    """Random centre in the mid depths, away from earlier lesions; shrinks when space is short.

    Centres are whole pixels, so the centre pixel is always inside and no mask is ever empty.
    """
    candidate = shape
    for attempt in range(_MAX_PLACEMENT_TRIES):
        if attempt and attempt % 8 == 0:
            shape = replace(shape, base=max(2.0, shape.base * 0.8))
        b = shape.bound + 2.0
        cx = _uniform_in(rng, b, w - 1 - b, w)
        cy = _uniform_in(rng, top + b, 0.85 * h - b, h)
        candidate = replace(shape, cx=cx, cy=cy)
        if not taken.any() or not (taken & (_depth(candidate, h, w) >= 0.0)).any():
            return candidate
    return _squeeze_in(rng, shape, h, w, taken)


def _squeeze_in(
    rng: np.random.Generator, shape: _Shape, h: int, w: int, taken: np.ndarray
) -> _Shape:
    """Last resort in crowded small images: a 2-px disc at a random free pixel, so extra lesions
    stay separate even when no random placement fits."""
    disc = replace(shape, base=2.0, aspect=1.0, harmonics=(), spikes=())
    free = ~_dilate(taken, 2)  # the disc lies within 2 px (Chebyshev) of its centre
    free[:2] = free[-2:] = False
    free[:, :2] = free[:, -2:] = False
    ys, xs = np.nonzero(free)
    if len(ys) == 0:  # no room at all: overlap rather than fail
        return replace(disc, cx=w // 2, cy=h // 2)
    i = int(rng.integers(len(ys)))
    return replace(disc, cx=int(xs[i]), cy=int(ys[i]))


def _uniform_in(rng: np.random.Generator, lo: float, hi: float, size: int) -> int:
    """A whole pixel in [lo, hi], or anywhere inside the image when that range is empty."""
    if hi < lo:
        lo, hi = 1.0, size - 2.0
    return int(round(rng.uniform(lo, hi)))


def _depth(shape: _Shape, h: int, w: int) -> np.ndarray:
    """Approximate distance in px inside the outline: > 0 inside, < 0 outside, -inf far away.

    Only a window around the shape is evaluated, which keeps big images fast.
    """
    r = int(math.ceil(shape.bound)) + 4
    y0, y1 = max(shape.cy - r, 0), min(shape.cy + r + 1, h)
    x0, x1 = max(shape.cx - r, 0), min(shape.cx + r + 1, w)
    out = np.full((h, w), -np.inf, dtype=_F)
    if y0 >= y1 or x0 >= x1:
        return out
    dy, dx = np.mgrid[y0 - shape.cy : y1 - shape.cy, x0 - shape.cx : x1 - shape.cx].astype(_F)
    c, s = math.cos(shape.rot), math.sin(shape.rot)
    u = c * dx + s * dy
    v = (c * dy - s * dx) / shape.aspect
    rad = np.sqrt(u * u + v * v)
    out[y0:y1, x0:x1] = (shape.radius(np.arctan2(v, u)) - rad) * min(1.0, shape.aspect)
    return out


def _posterior(mask: np.ndarray, factor: float) -> np.ndarray:
    """Enhancement or shadow in the columns behind the lesion, from its lower edge downwards."""
    h, w = mask.shape
    if factor == 1.0:
        return np.ones((h, w), dtype=_F)
    covered = mask.any(axis=0)
    bottom = h - 1 - np.argmax(mask[::-1], axis=0)
    start = np.where(covered, bottom, bottom[covered].max()).astype(_F)
    span = int(covered.sum())
    profile = _box_1d(covered.astype(_F), max(1, span // 8))
    ramp = np.clip((np.arange(h, dtype=_F)[:, None] - start[None, :]) / 4.0, 0.0, 1.0)
    return 1.0 + (factor - 1.0) * profile[None, :] * ramp


# --- small numeric helpers --------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, gh: int, gw: int) -> np.ndarray:
    """Unit-variance-ish smooth noise: a coarse Gaussian grid upsampled with smoothstep weights,
    far cheaper than blurring full-resolution noise with a wide kernel."""
    grid = rng.standard_normal((max(2, gh), max(2, gw)), dtype=_F)
    r0, rt = _interp_axis(h, grid.shape[0])
    c0, ct = _interp_axis(w, grid.shape[1])
    rows = grid[r0] * (1.0 - rt)[:, None] + grid[r0 + 1] * rt[:, None]
    return rows[:, c0] * (1.0 - ct) + rows[:, c0 + 1] * ct


def _interp_axis(n: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.linspace(0.0, g - 1.0, n, dtype=_F)
    i0 = np.minimum(pos.astype(int), g - 2)
    t = pos - i0.astype(_F)
    return i0, t * t * (3.0 - 2.0 * t)


def _blur(a: np.ndarray) -> np.ndarray:
    return _convolve(_convolve(a, _KERNEL_X, axis=1), _KERNEL_Y, axis=0)


def _convolve(a: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Shifted-slice sums: a fixed summation order, so results do not vary between machines."""
    r = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="reflect")
    n = a.shape[axis]

    def tap(i: int) -> np.ndarray:
        return p[:, i : i + n] if axis == 1 else p[i : i + n, :]

    out = float(kernel[r]) * tap(r)
    for i in range(r):  # symmetric kernel: add mirrored taps first, half the multiplications
        pair = tap(i) + tap(2 * r - i)
        pair *= float(kernel[i])
        out += pair
    return out


def _box_1d(a: np.ndarray, radius: int) -> np.ndarray:
    """Moving average via a cumulative sum, which is sequential and thus reproducible."""
    c = np.concatenate([[0.0], np.cumsum(np.pad(a, radius, mode="edge"))])
    return (c[2 * radius + 1 :] - c[: -2 * radius - 1]) / (2 * radius + 1)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation by separable shifts, enough to keep lesions a few pixels apart."""
    out = mask.copy()
    for s in range(1, radius + 1):
        out[s:] |= mask[:-s]
        out[:-s] |= mask[s:]
    rows = out.copy()
    for s in range(1, radius + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out
