"""Progress bars: on a terminal, never under CI, or as the stage's progress param says; the
data stages count their files."""

from __future__ import annotations

import sys

from busiseg.data.images import process_map
from busiseg.runtime import progress


def test_bars_show_on_a_terminal_only_and_never_under_ci(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    assert progress.show_progress("auto") and not progress.show_progress("off")
    monkeypatch.setenv("CI", "true")
    assert not progress.show_progress("auto") and progress.show_progress("on")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delenv("CI")
    assert not progress.show_progress("auto")


def test_a_data_stage_bar_counts_every_file_and_changes_no_result(monkeypatch):
    counted = []

    class Bar:
        def update(self, n):
            counted.append(n)

        def close(self):
            counted.append("closed")

    import busiseg.data.images as images

    monkeypatch.setattr(images, "bar", lambda total, desc, enabled: Bar() if enabled else None)
    items = list(range(70))
    assert process_map(abs, items, workers=1, progress=True) == items
    assert counted == [1] * 70 + ["closed"]
    counted.clear()
    assert process_map(abs, items, workers=2, progress=True) == items  # processes too
    assert counted == [1] * 70 + ["closed"]
    counted.clear()
    assert process_map(abs, items, workers=2, progress=False) == items and counted == []
