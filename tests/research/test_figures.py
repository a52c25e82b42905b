"""Every figure the README, docs/results.md and the committed model cards state is one that a JSON
record under docs/results/ holds: a number typed by hand, or left behind when its run was re-made,
fails here.

A figure is a decimal with two or more places (Dice, intervals, differences), or any number of
minutes (a time, which must be some record's seconds / 60). The check is by value: the record
holding it is not named in the text, so it cannot tell two records apart that hold the same value;
it catches figures that no record holds at all."""

from __future__ import annotations

import functools
import json
import re

import pytest
from conftest import REPO

RESULTS = REPO / "docs" / "results"
FIGURE = re.compile(r"(?<![\w.])([+\-−]?\d+\.(\d+))(\s*min\b)?")
TIMES = re.compile(r"(\d+\.\d(?:\s*(?:\+|to|and)\s*\d+\.\d)+)\s*min\b")  # "53.0 to 72.9 min"
# numbers that are no measured figure: versions, a DOI
NOT_A_FIGURE = re.compile(r"(torch|Python|version|busiseg) $|doi\.org/$|doi:$")
DOCUMENTS = ["README.md", "docs/results.md", *sorted(
    str(p.relative_to(REPO)) for p in (RESULTS / "cards").glob("*.md"))]


def _leaves(x, key: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, k)
    elif isinstance(x, list):
        if len(x) > 3 and all(isinstance(v, (int, float)) for v in x):
            return  # a curve (per epoch, per image): no figure a document states
        for v in x:
            yield from _leaves(v, key)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield key, float(x)


@functools.cache
def recorded() -> tuple[set[float], set[float]]:
    """Every number the records hold, and every time they hold, in minutes."""
    values, minutes = set(), set()
    for path in RESULTS.rglob("*.json"):
        for key, v in _leaves(json.loads(path.read_text())):
            values.add(v)
            if "second" in key or key.endswith("_s"):
                minutes.add(v / 60)
    return values, minutes


def unbacked(text: str, values: set[float], minutes: set[float]) -> list[str]:
    out = []
    for m in TIMES.finditer(text):  # every number of a list of times is a time
        for token in re.findall(r"\d+\.\d", m.group(1)):
            if not any(round(v, 1) == float(token) for v in minutes):
                out.append(f"line {text[:m.start()].count(chr(10)) + 1}: {token} min")
    for m in FIGURE.finditer(text):
        token, places, is_time = m.group(1), len(m.group(2)), bool(m.group(3))
        if (places < 2 and not is_time) or NOT_A_FIGURE.search(text[max(0, m.start() - 20):
                                                                    m.start()]):
            continue
        d = float(token.replace("−", "-"))
        pool = minutes if is_time else values
        if not any(round(v, places) == round(d, places) or
                   (not is_time and round(-v, places) == round(d, places)) for v in pool):
            line = text[:m.start()].count("\n") + 1
            out.append(f"line {line}: {token}{' min' if is_time else ''}")
    return out


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_stated_figure_is_held_by_a_record(document):
    values, minutes = recorded()
    missing = unbacked((REPO / document).read_text(), values, minutes)
    assert not missing, (f"{document} states figures no record under docs/results/ holds: "
                         + "; ".join(missing))


def test_the_check_finds_a_figure_no_record_holds():
    values, minutes = {0.771151, -0.012522, 3178.9}, {3178.9 / 60}
    assert unbacked("cv_dice **0.771** [0.751, 0.792], 53.0 min, 0.013 less, torch 2.15",
                    values, minutes) == ["line 1: 0.751", "line 1: 0.792"]
    assert unbacked("52.9 min", values, minutes) == ["line 1: 52.9 min"]
    assert unbacked("52.1 to 53.0 min", values, minutes) == ["line 1: 52.1 min"]
