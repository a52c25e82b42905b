"""One way to file a research measurement under docs/results/: the figures with the commit that
made them, the command that makes them again and the machine they ran on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from busiseg.runtime.device import machine

RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results"


def file_record(folder: str, name: str, record: dict, command: str) -> Path:
    """docs/results/FOLDER/NAME.json: `record` with code_commit, command and machine added."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=RESULTS.parents[1]).stdout.strip()
    full = {**record, "code_commit": commit, "command": command, "machine": machine()}
    path = RESULTS / folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2) + "\n")
    print(json.dumps(full, indent=2))
    print(f"wrote {path}")
    return path
