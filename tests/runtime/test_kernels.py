"""train.cpu_isa: the CPU kernels a run computes with, pinned from the params file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_data

from busiseg.errors import BusisegError
from busiseg.modeling.model_file import load_model
from busiseg.params import parse_params
from busiseg.runtime.device import kernel_isa, pin_kernels
from busiseg.training.train import train

# a convolution's forward and backward, digested; the pin is set in-process, as train does.
# oneDNN's own verbose lines say which instruction set it dispatched: the pin is checked against
# what oneDNN did, not against busiseg's own reading of the flags.
PROBE = """
import hashlib, os, sys, torch
from busiseg.runtime import device
if sys.argv[1] == "sse41":  # below every real pin: shows the pin reaches oneDNN on any x86 CPU
    device.KERNEL_PINS["sse41"] = "SSE41"
device.pin_kernels(sys.argv[1])
torch.manual_seed(0); torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 16, 3, padding=1)
x = torch.randn(4, 8, 32, 32, requires_grad=True)
conv(x).square().sum().backward()
h = hashlib.sha256(x.grad.numpy().tobytes() + conv.weight.grad.numpy().tobytes())
print("probe", h.hexdigest()[:16], device.kernel_isa(), flush=True)
"""
ONEDNN_ISA = {"AVX2": "Intel AVX2", "AVX512": "Intel AVX-512", "SSE41": "Intel SSE4.1"}  # prefixes


def probe(pin: str, env: dict, cap: str | None = None) -> list[str]:
    """[weights digest, busiseg's kernel_isa(), oneDNN's dispatched ISA, its forward kernel]"""
    env = {k: v for k, v in env.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env["ONEDNN_VERBOSE"] = "1"
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-c", PROBE, pin], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    digest, isa = next(ln.split()[1:] for ln in out if ln.startswith("probe "))
    dispatched = next(ln.split("isa:", 1)[1] for ln in out if ",info,cpu,isa:" in ln)
    forward = next(ln.split(",")[6] for ln in out
                   if ",exec,cpu,convolution," in ln and "forward" in ln)
    return [digest, isa, dispatched, forward]


def avx512() -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512f" in text


def x86() -> bool:
    return os.uname().machine in ("x86_64", "AMD64")


def test_the_pin_is_what_onednn_dispatches(python_env):
    """-S train.cpu_isa=avx2 makes oneDNN dispatch AVX2 kernels (its own verbose output says so)
    and computes exactly what ONEDNN_MAX_CPU_ISA=AVX2 does (how the demo metrics and the older
    records were made); native honours a cap set outside. A pin that never reached oneDNN fails
    here on an AVX-512 CPU (native would dispatch AVX-512) and, through the SSE4.1 probe, on any
    x86 CPU."""
    if not x86():
        pytest.skip("oneDNN's x86 instruction sets only")
    pinned = probe("avx2", python_env)
    assert pinned[1] == "AVX2" and pinned[2] == ONEDNN_ISA["AVX2"]
    assert "avx2" in pinned[3]
    assert pinned == probe("native", python_env, cap="AVX2")
    lowered = probe("sse41", python_env)
    assert lowered[2].startswith(ONEDNN_ISA["SSE41"]) and "avx" not in lowered[3]
    if not avx512():
        pytest.skip("no AVX-512 here: the avx512 pin cannot differ from native")
    native = probe("native", python_env)
    assert native[1] == "AVX512" and native[2].startswith(ONEDNN_ISA["AVX512"])
    pinned512 = probe("avx512", python_env)  # AVX512_CORE: oneDNN names it apart from native's
    assert pinned512[2].startswith(ONEDNN_ISA["AVX512"])
    # the pin is this CPU's own fp32 kernels: the same digest and forward kernel
    assert (pinned512[0], pinned512[3]) == (native[0], native[3])
    assert native[0] != pinned[0]  # the kernel sets round differently: why the pin exists


def test_a_cap_the_user_set_is_kept_or_refused_never_replaced(monkeypatch):
    fresh_process(monkeypatch)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")  # oneDNN's older name for the cap
    with pytest.raises(BusisegError, match=r"^DNNL_MAX_CPU_ISA=AVX512_CORE contradicts"):
        pin_kernels("avx2")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    pin_kernels("avx2")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    pin_kernels("native")  # native takes the cap as it is
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    with pytest.raises(BusisegError, match=r"^ONEDNN_MAX_CPU_ISA=AVX512_CORE contradicts "
                       r"train.cpu_isa=avx2 \(oneDNN's AVX2\); unset ONEDNN_MAX_CPU_ISA or set "
                       r"it to AVX2$"):
        pin_kernels("avx2")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"


def test_one_process_computes_with_one_kernel_set(monkeypatch):
    """oneDNN reads the cap once: a second, different pin in one process (two models pinned
    differently) is refused, not silently computed with the first set."""
    fresh_process(monkeypatch)
    pin_kernels("avx2")
    pin_kernels("avx2")  # the same set again: fine
    with pytest.raises(BusisegError, match=r"^this process already computes with AVX2 kernels "
                       r"\(pinned for an earlier model; .*train.cpu_isa=avx512 needs "
                       r"AVX512_CORE: run it in a process of its own$"):
        pin_kernels("avx512")


def fresh_process(monkeypatch) -> None:
    """No cap in the environment and none pinned yet, both restored after the test."""
    from busiseg.runtime import device

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "unset")  # recorded, so the teardown restores it
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(device, "_pinned", None)


def test_a_trained_model_carries_its_pin_to_evaluate_and_predict(tmp_path, monkeypatch):
    fresh_process(monkeypatch)
    cache, split = tiny_data(tmp_path)
    p = parse_params({"preprocess": {"size": 32}, "model": {"base": 4, "depth": 2},
                      "train": {"epochs": 1, "threads": 1, "cpu_isa": "avx2"}})
    summary = train(p, cache, split, tmp_path / "m.pt", tmp_path / "ck", tmp_path / "live")
    assert summary["amp"] == "off"
    assert summary["kernel_isa"] == kernel_isa()
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    load_model(tmp_path / "m.pt")
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # the user's cap, against the model's
    with pytest.raises(BusisegError, match=r"m.pt's recorded train.cpu_isa=avx2"):
        load_model(tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["params"]["train"]["cpu_isa"] == \
        "avx2"


def test_a_wrong_pin_is_one_line():
    with pytest.raises(BusisegError, match=r"train.cpu_isa is 'avx1'; choose one of: native"):
        parse_params({"train": {"cpu_isa": "avx1"}})
