"""Lesion sizes as a radiologist reports them (BI-RADS): the area, the longest diameter (long
axis) and the longest diameter perpendicular to it (short axis), in pixels and, where the pixel
size is known, in millimetres.

A mask is the union of its pixels as squares, so the diameters are measured between pixel
corners on the convex hull of those squares (a lesion one pixel wide is about a pixel across), and
the calipers a sonographer lays across a lesion span its convex outline, concavities included.
Distances are taken in the pixel size's unit, so an image whose pixels are not square (a cache
squashed to a square, an anisotropic scan) measures the lesion, not its picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SIZE_COLUMNS = ("area_px", "long_axis_px", "short_axis_px", "area_mm2", "long_axis_mm",
                "short_axis_mm")  # size_row's columns


@dataclass(frozen=True)
class LesionSize:
    area: float  # in squared units of the pixel size
    long_axis: float
    short_axis: float


EMPTY = LesionSize(0.0, 0.0, 0.0)


def lesion_size(mask: np.ndarray, pixel: tuple[float, float] = (1.0, 1.0)) -> LesionSize:
    """Area, long and short axis of everything marked in `mask` (H×W), with pixels of
    `pixel` = (height, width); all zero for an empty mask, which is a lesion of no size."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return EMPTY
    dy, dx = float(pixel[0]), float(pixel[1])
    hull = _hull(_corners(mask) * np.array([dy, dx]))
    long_axis, direction = _longest_chord(hull)
    return LesionSize(float(mask.sum()) * dy * dx, long_axis,
                      _perpendicular_chord(hull, direction))


def _corners(mask: np.ndarray) -> np.ndarray:
    """(row, column) corners of the pixels on the mask's outline: the hull of the squares."""
    from scipy import ndimage

    edge = mask & ~ndimage.binary_erosion(mask)
    rows, cols = np.nonzero(edge)
    offsets = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    points = np.stack([rows, cols], axis=1)[:, None, :] + offsets[None]
    return np.unique(points.reshape(-1, 2), axis=0)


def _hull(points: np.ndarray) -> np.ndarray:
    """The convex hull's vertices in order (Andrew's monotone chain: exact on the integer-valued
    corners scaled by the pixel size, and fine for the collinear points a rectangle gives)."""
    pts = sorted(map(tuple, points))

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _longest_chord(hull: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest distance between two hull vertices (the maximum Feret diameter) and its unit
    direction. Hulls of masks have hundreds of vertices, so all pairs are cheap."""
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.hypot(diff[..., 0], diff[..., 1])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    length = float(dist[i, j])
    direction = diff[i, j] / length if length > 0 else np.array([1.0, 0.0])
    return length, direction


def _perpendicular_chord(hull: np.ndarray, direction: np.ndarray) -> float:
    """The longest segment inside the hull perpendicular to `direction`: in coordinates along
    (u) and across (v) the long axis, the hull's extent in v at each u is largest at a vertex,
    where it is the gap between where the edges spanning that u cross it."""
    normal = np.array([-direction[1], direction[0]])
    u, v = hull @ direction, hull @ normal
    u0, v0, u1, v1 = u, v, np.roll(u, -1), np.roll(v, -1)
    at = u[:, None]  # one row per vertex's u, one column per edge
    spans = (np.minimum(u0, u1) - 1e-9 <= at) & (at <= np.maximum(u0, u1) + 1e-9)
    flat = np.abs(u1 - u0) < 1e-12
    t = np.where(flat, 0.0, (at - u0) / np.where(flat, 1.0, u1 - u0))
    cross = v0 + (v1 - v0) * t
    high = np.where(spans, np.where(flat, np.maximum(v0, v1), cross), -np.inf).max(axis=1)
    low = np.where(spans, np.where(flat, np.minimum(v0, v1), cross), np.inf).min(axis=1)
    return float(max((high - low).max(), 0.0))


def size_row(mask: np.ndarray, pixel: tuple[float, float],
             pixel_mm: tuple[float, float] | None, prefix: str = "") -> dict:
    """A table's size columns for one mask: in the pixels of `pixel` (the original image's, for
    a mask at another grid) and, with `pixel_mm` (an original pixel's size in mm), in mm; the
    mm columns are empty (NaN) where the size is unknown, so every row has the same columns."""
    px = lesion_size(mask, pixel)
    mm = (lesion_size(mask, (pixel[0] * pixel_mm[0], pixel[1] * pixel_mm[1]))
          if pixel_mm is not None else LesionSize(np.nan, np.nan, np.nan))
    return {f"{prefix}area_px": px.area, f"{prefix}long_axis_px": px.long_axis,
            f"{prefix}short_axis_px": px.short_axis, f"{prefix}area_mm2": mm.area,
            f"{prefix}long_axis_mm": mm.long_axis, f"{prefix}short_axis_mm": mm.short_axis}


def size_table(masks: np.ndarray, pixels: np.ndarray, pixel_mm: np.ndarray | None,
               prefix: str = "") -> pd.DataFrame:
    """`size_row` of each of N masks, with its pixel (N×2) and, with `pixel_mm` (N×2, NaN where
    unknown), its size in mm."""
    mm = np.full((len(masks), 2), np.nan) if pixel_mm is None else pixel_mm
    rows = [size_row(mask, tuple(px), None if np.isnan(size).any() else tuple(map(float, size)),
                     prefix) for mask, px, size in zip(masks, pixels, mm)]
    return pd.DataFrame(rows, columns=[f"{prefix}{c}" for c in SIZE_COLUMNS])


def size_tables(pred: np.ndarray, true: np.ndarray, pixels: np.ndarray,
                pixel_mm: np.ndarray | None) -> pd.DataFrame:
    """`size_table` of the predicted masks beside the true ones' (columns `true_…`)."""
    return pd.concat([size_table(pred, pixels, pixel_mm),
                      size_table(true, pixels, pixel_mm, "true_")], axis=1)
