"""Every recorded preset pins what changes its weights (the threads of each training process and
the CPU kernels), and the pins are what its record ran with: a changed default that would move a
recorded figure fails here, not in a user's re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from busiseg.params import parse_params
from busiseg.research import protocol
from busiseg.research.presets import PINS, PRESETS, apply_overrides, exp_command, load_presets
from busiseg.runtime.placement import QueueSlot, cpu_threads
from busiseg.training import cross_validation

RESULTS = REPO / "docs" / "results"
ISA = {"AVX2": "avx2", "AVX512": "avx512"}  # a record's kernel_isa -> the train.cpu_isa pin
# Records written before records named their kernels (machine.kernel_isa); their presets pin
# AVX2, which docs/reproducibility.md states for them. Every newer record must name its kernels.
KERNELS_UNRECORDED = {"busi-cpu", "busi-cpu-empty", "busi-cpu-image-dice", "busi-cpu-long",
                      "busi-cpu-long-empty", "busi-cpu-long-res", "piece-blur_noise",
                      "piece-elastic", "piece-focal_dice", "piece-no_deep_supervision",
                      "piece-poly", "piece-tversky", "zoo-attention_unet", "zoo-compact",
                      "zoo-res_unet", "zoo-unet", "zoo-unet_plus_plus"}


def recorded_runs() -> list[tuple[str, str, dict, dict]]:
    """(preset, record file, run, record) for every run filed under a preset: the protocol's
    records (README rows, cards) and HC18's."""
    out = []
    for path in sorted((RESULTS / "protocol").glob("*.json")) + sorted(
            (RESULTS / "protocol" / "noise").glob("*.json")):
        rec = json.loads(path.read_text())
        out += [(rec["preset"], path.name, run, rec) for run in rec["runs"].values()]
    hc18 = json.loads((RESULTS / "hc18" / "hc18-400-s0.json").read_text())
    # its -cv5 rows are the same presets run with -S split.folds=5
    out += [(name.removesuffix("-cv5"), "hc18-400-s0.json", run, hc18)
            for name, run in hc18["runs"].items()]
    return out


def ran_with(run: dict, rec: dict) -> tuple[int, str | None]:
    """The threads a training process used and the kernels it ran, as the record says them: the
    run's train.json where it holds them, else the machine the record names."""
    train, machine = run.get("train", {}), rec["machine"]
    return (train.get("threads") or machine["threads"],
            train.get("kernel_isa") or machine.get("kernel_isa"))


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(f.split("=", 1) for f in cmd[cmd.index("-S") + 1::2])


PRESET_SET = load_presets(PRESETS, REPO / "params.yaml")


@pytest.mark.parametrize("preset,record,run,rec", recorded_runs(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_recorded_preset_s_printed_command_pins_what_its_record_ran_with(preset, record, run,
                                                                           rec):
    assert preset in PRESET_SET, f"{record} files runs under {preset}, which presets.yaml lacks"
    printed = flags(exp_command(PRESET_SET[preset], 0, "DATA"))
    threads, kernels = ran_with(run, rec)
    assert printed.get("train.threads") == str(threads), (
        f"{preset}'s command must pin train.threads={threads}, the threads its record ran with")
    if kernels is None:
        assert preset in KERNELS_UNRECORDED, f"{record} must name the kernels its run used"
        kernels = "AVX2"
    assert printed.get("train.cpu_isa") == ISA[kernels], (
        f"{preset}'s command must pin train.cpu_isa={ISA[kernels]}, the kernels of its record")
    if "pins" in rec:  # the record's own statement of its pins agrees with the preset's
        assert {k: str(v) for k, v in rec["pins"].items() if k in PINS} == {
            k: printed[k] for k in PINS if k in printed}


def test_every_recorded_preset_is_tested_and_the_unrecorded_list_holds_no_stale_name():
    presets = {r[0] for r in recorded_runs()}
    assert {"busi-lite0-cv5", "busi-lite0-fast-cv5", "hc18-lite0", "hc18-res-unet"} <= presets
    assert presets >= KERNELS_UNRECORDED


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("preset", sorted({r[0] for r in recorded_runs()}))
def test_the_pinned_threads_reach_every_training_process_on_any_machine(preset, cores,
                                                                        monkeypatch):
    """Whatever the fold placement does on a machine of this many cores, each training process
    (each fold side by side, or the one process of a single split) computes with the pinned
    threads: the placement changes the time, never the numbers."""
    monkeypatch.setattr(cross_validation, "cpu_cores", lambda: cores)
    monkeypatch.setattr("busiseg.runtime.placement.cpu_cores", lambda: cores)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    p = parse_params(apply_overrides(base, {**PRESET_SET[preset].overrides,
                                            "train.device": "cpu"}))
    workers = cross_validation.fold_workers(p.train, p.split.folds) if p.split.folds else 1
    for slot in (QueueSlot(), QueueSlot(1, 2, 0)):  # alone, and one of two dvc queue workers
        assert cpu_threads(p.train.threads, workers, slot) == p.train.threads != 0


def test_record_refuses_a_workspace_without_the_preset_s_pins(tmp_path: Path, monkeypatch):
    """`protocol record` files a run only when params.yaml has every override, pins included."""
    preset = PRESET_SET["busi-lite0-cv5"]
    params = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()),
                             {"data.raw_dir": "DATA", **preset.overrides, "split.seed": 0,
                              "train.seed": 0, "train.threads": 0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(protocol, "REPO", tmp_path)
    with pytest.raises(SystemExit, match="train.threads=0.*needs 2"):
        protocol.record(preset, 0, "DATA", None)
