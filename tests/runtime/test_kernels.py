"""train.cpu_isa: the CPU kernels a run computes with, pinned from the params file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_data

from busiseg.modeling.model_file import load_model
from busiseg.params import parse_params
from busiseg.runtime.device import kernel_isa
from busiseg.training.train import train

# a convolution's forward and backward, digested; the pin is set in-process, as train does
PROBE = """
import hashlib, os, sys, torch
from busiseg.runtime.device import kernel_isa, pin_kernels
pin_kernels(sys.argv[1])
torch.manual_seed(0); torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 16, 3, padding=1)
x = torch.randn(4, 8, 32, 32, requires_grad=True)
conv(x).square().sum().backward()
h = hashlib.sha256(x.grad.numpy().tobytes() + conv.weight.grad.numpy().tobytes())
print(h.hexdigest()[:16], kernel_isa())
"""


def probe(pin: str, env: dict, cap: str | None = None) -> list[str]:
    env = {k: v for k, v in env.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-c", PROBE, pin], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def avx512() -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512f" in text


def test_the_pin_equals_the_environment_cap_it_stands_for(python_env):
    """-S train.cpu_isa=avx2 computes exactly what ONEDNN_MAX_CPU_ISA=AVX2 does (how the demo
    metrics and the older records were made), and native honours a cap set outside."""
    pinned = probe("avx2", python_env)
    assert pinned == probe("native", python_env, cap="AVX2")
    assert pinned[1] in ("AVX2", os.uname().machine)
    if not avx512():
        pytest.skip("no AVX-512 here: the avx512 pin cannot differ from native")
    native = probe("native", python_env)
    assert native[1] == "AVX512"
    assert probe("avx512", python_env) == native  # the pin is this CPU's own fp32 kernels
    assert native[0] != pinned[0]  # the kernel sets round differently: why the pin exists


def test_a_trained_model_carries_its_pin_to_evaluate_and_predict(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
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
    assert torch.load(tmp_path / "m.pt", weights_only=True)["params"]["train"]["cpu_isa"] == \
        "avx2"


def test_a_wrong_pin_is_one_line():
    from busiseg.errors import BusisegError

    with pytest.raises(BusisegError, match=r"train.cpu_isa is 'avx1'; choose one of: native"):
        parse_params({"train": {"cpu_isa": "avx1"}})
