"""Shared plumbing for the stage scripts: one-line errors, atomic JSON outputs."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from busiseg.errors import BusisegError
from busiseg.files import atomic_write_text
from busiseg.runtime.placement import current


def run(main: Callable[[], Any]) -> None:
    """Run a stage; user-fixable problems end as one line on stderr and exit 1, never a traceback.

    SIGTERM is turned into KeyboardInterrupt so that `kill` and Ctrl-C take the same clean path.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rank = current().rank  # torchrun's: rank 0 speaks for the others
    main_rank = rank == 0
    try:
        main()
    except BusisegError as exc:
        if not main_rank:  # rank 0 meets the same check: let it fail first and say why
            try:
                time.sleep(2)
            except KeyboardInterrupt:  # it did, and stopped us
                sys.exit(1)
        print(f"error: {exc}" if main_rank else f"error (training process {rank}): {exc}",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if main_rank:
            print("interrupted", file=sys.stderr)
        sys.exit(130)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def remove_outputs(*paths: str | Path) -> None:
    """Delete stale outputs first, so a failed run cannot leave last run's files looking fresh."""
    import shutil

    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
