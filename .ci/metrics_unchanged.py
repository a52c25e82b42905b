"""Fail when `dvc metrics diff` shows any change but timings: the default pipeline must reproduce
the committed metrics exactly (with the kernels .ci/run pins)."""

import json
import subprocess
import sys

TIMING = ("seconds", "images_per_s")

diff = json.loads(subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", "--json"],
                                 capture_output=True, text=True, check=True).stdout or "{}")
moved = [f"{path}: {key} {change.get('old')} -> {change.get('new')}"
         for path, keys in diff.items() for key, change in keys.items()
         if not key.endswith(TIMING)]
if moved:
    print("the default pipeline no longer reproduces the committed metrics:", *moved,
          sep="\n", file=sys.stderr)
    sys.exit(1)
print("metrics: identical to the committed ones (timings aside)")
