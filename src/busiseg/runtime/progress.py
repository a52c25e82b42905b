"""Progress bars where a person watches: on a terminal, never in CI logs or redirected output
(`auto`), or as the stage's `progress` param says (`on`, `off`). Torch-free, so the data stages
can use it without importing torch."""

from __future__ import annotations

import os
import sys


def show_progress(setting: str) -> bool:
    if setting != "auto":
        return setting == "on"
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or None when it would not be shown (callers then skip updating it)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
