"""Lesion sizes on hand-made shapes whose diameters are known: ellipses with axes a and b at
several angles, a rotated rectangle (its largest Feret diameter is the diagonal), pixels that
are not square, and an empty mask."""

from __future__ import annotations

import numpy as np
import pytest

from busiseg.inference.sizes import SIZE_COLUMNS, lesion_size, size_row

N = 300


def rotated(theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along and across a direction at `theta`, centred in an N×N image."""
    yy, xx = np.mgrid[:N, :N] - N / 2 + 0.5
    c, s = np.cos(theta), np.sin(theta)
    return xx * c + yy * s, -xx * s + yy * c


def ellipse(a: float, b: float, theta: float) -> np.ndarray:
    u, v = rotated(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


@pytest.mark.parametrize("a, b", [(100, 40), (60, 60), (120, 25)])
@pytest.mark.parametrize("theta", [0.0, 0.3, np.pi / 4, 1.2, np.pi / 2])
def test_an_ellipse_measures_its_axes(a, b, theta):
    size = lesion_size(ellipse(a, b, theta))
    # measured between pixel corners: at most about a pixel and a half over the true diameter
    assert 2 * a - 0.5 <= size.long_axis <= 2 * a + 1.5
    assert 2 * b - 0.5 <= size.short_axis <= 2 * b + 1.5
    assert size.area == pytest.approx(np.pi * a * b, rel=0.01)


@pytest.mark.parametrize("theta", [0.2, 0.5, 1.0])
def test_a_rotated_rectangle_measures_its_diagonal_and_the_chord_across_it(theta):
    w, h = 160, 60
    u, v = rotated(theta)
    size = lesion_size((np.abs(u) <= w / 2) & (np.abs(v) <= h / 2))
    diagonal = np.hypot(w, h)
    assert diagonal - 0.5 <= size.long_axis <= diagonal + 2
    # the longest chord perpendicular to the diagonal crosses the centre: h·diagonal / w
    assert size.short_axis == pytest.approx(h * diagonal / w, abs=2)


def test_pixels_of_any_shape_measure_the_lesion_not_its_picture():
    circle = ellipse(60, 60, 0.0)  # a circle 120 px across, squashed to half height
    squashed = circle[::2]
    size = lesion_size(squashed, (2.0, 1.0))  # each row 2 units tall
    assert size.long_axis == pytest.approx(120, abs=2.5)
    assert size.short_axis == pytest.approx(120, abs=2.5)
    scaled = lesion_size(circle, (0.1, 0.1))  # mm
    assert scaled.long_axis == pytest.approx(lesion_size(circle).long_axis * 0.1)
    assert scaled.area == pytest.approx(circle.sum() * 0.01)


def test_empty_and_tiny_masks():
    empty = lesion_size(np.zeros((10, 10), bool))
    assert (empty.area, empty.long_axis, empty.short_axis) == (0, 0, 0)
    bar = lesion_size(np.ones((1, 5), bool))
    assert bar.long_axis == pytest.approx(np.hypot(5, 1)) and bar.area == 5
    row = size_row(np.ones((3, 3), bool), (1.0, 1.0), None)
    assert tuple(row) == SIZE_COLUMNS and row["long_axis_px"] == pytest.approx(np.hypot(3, 3))
    assert np.isnan(row["long_axis_mm"])
    row = size_row(np.ones((3, 3), bool), (2.0, 2.0), (0.5, 0.5))
    assert row["long_axis_mm"] == pytest.approx(np.hypot(3, 3)) and row["area_mm2"] == 9
