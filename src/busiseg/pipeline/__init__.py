"""The plumbing of the DVC pipeline: how a stage script runs (one-line errors, atomic outputs)
and which project files each stage's code is (its import closure, the deps in dvc.yaml)."""
