"""The golden run: the recommended recipe, shrunk, on a slice of the real BUSI, must reproduce its
pinned record exactly. A change that moves it is either a bug or a result to re-record
(`uv run python -m busiseg.research.golden --record`, then the recipes in docs/results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL_BUSI

from busiseg.research import golden


@pytest.mark.parametrize("recipe", sorted(golden.GOLDEN))
def test_the_record_is_pinned_to_kernels_every_x86_64_machine_has(recipe):
    record = json.loads(golden.GOLDEN[recipe][0].read_text())
    assert record["kernels_pinned"] == golden.KERNELS == "AVX2"
    assert record["pinned_env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    result = record["result"]
    assert result["ingest"]["n_images"] == sum(golden.SUBSET.values())
    assert len(result["model_digest"]) == 64 and "cv_dice" in result["eval"]


def test_the_side_by_side_golden_run_trains_five_one_thread_folds_at_once():
    """The fast recipe's placement, not a shrunk stand-in: its record must show five folds side
    by side with one thread each, as busi-lite0-fast-cv5 trains on a 2-core CPU."""
    train = json.loads(golden.GOLDEN["busi-lite0-fast-cv5"][0].read_text())["result"]["train"]
    assert (train["folds"], train["fold_workers"], train["threads"]) == (5, 5, 1)
    main = json.loads(golden.RECORD.read_text())["result"]["train"]
    assert (main["fold_workers"], main["threads"]) == (1, 2)


def test_differences_name_every_moved_value():
    want = {"eval": {"dice": 0.5, "cv_dice": 0.4}, "model_digest": "a"}
    assert golden.differences(want, want) == []
    got = {"eval": {"dice": 0.5, "cv_dice": 0.41, "new": 1}, "model_digest": "b"}
    assert golden.differences(got, want) == ["eval.cv_dice: 0.4 -> 0.41",
                                             "eval.new: (absent) -> 1", "model_digest: a -> b"]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_BUSI / "benign").is_dir(), reason="needs the real BUSI")
@pytest.mark.skipif(not golden.cpu_has("avx2"), reason="no AVX2: no golden reference here")
@pytest.mark.parametrize("recipe", sorted(golden.GOLDEN))
def test_the_golden_run_reproduces_its_record_exactly(tmp_path: Path, recipe: str):
    got = golden.run(REAL_BUSI, tmp_path, recipe)
    want = json.loads(golden.GOLDEN[recipe][0].read_text())["result"]
    moved = golden.differences(got, want)
    assert not moved, (f"the golden run of {recipe} moved (recorded -> now); fix the change, or "
                       "if it is intended re-record with `uv run python -m busiseg.research.golden"
                       " --record` and re-run the recipes it stands for:\n" + "\n".join(moved))
