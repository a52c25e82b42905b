"""Where and how tensors are computed: device, mixed precision, threads, seeds.

Training, evaluation and prediction each name their own device setting; `place` turns it into a
device, a GPU of its own and a share of the cores the same way for all three.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from busiseg.errors import BusisegError
from busiseg.runtime.placement import QueueSlot, cpu_threads, queue_slot, worker_device

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str, param: str = "train.device") -> torch.device:
    """auto prefers a GPU; asking for one that is not there fails naming the param to change."""
    if name not in DEVICES:
        raise BusisegError(f"{param} is {name!r}; choose one of: {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BusisegError(f"{param} is 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not mps_ok:
        raise BusisegError(f"{param} is 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def place(setting: str, param: str, *, threads: int = 0, processes: int = 1,
          local_rank: int = 0, deterministic: bool = False, cpu_isa: str = "native",
          check: Callable[[torch.device], None] | None = None) -> tuple[torch.device, QueueSlot]:
    """The device a process computes on, and its DVC queue slot: `setting` (auto|cpu|cuda|mps,
    named `param` in errors) resolved, then this process's own GPU among the queue's workers and
    torchrun's processes, and its share of the CPU cores (`threads`, 0 = the share). `check`
    sees the device kind before a GPU is claimed; `cpu_isa` pins the CPU kernels (pin_kernels)."""
    pin_kernels(cpu_isa)
    slot = queue_slot()
    device = pick_device(setting, param)
    if check is not None:
        check(device)
    configure_threads_and_kernels(cpu_threads(threads, processes, slot), deterministic, device)
    return worker_device(device, local_rank, processes, slot), slot


KERNEL_PINS = {"avx2": "AVX2", "avx512": "AVX512_CORE"}  # oneDNN's names for train.cpu_isa


CAP_NAMES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # the cap, and its older name
_pinned: str | None = None  # the cap busiseg set in this process: oneDNN reads it only once


def pin_kernels(cpu_isa: str, source: str = "train.cpu_isa") -> None:
    """Cap oneDNN's instruction set (train.cpu_isa): kernels of different sets round differently,
    so a run reproduces bit for bit only with the same set. oneDNN reads the cap once, at the
    first convolution of the process, so this must come before any; `native` leaves it to the CPU
    (or to ONEDNN_MAX_CPU_ISA, as .ci/run sets it). A cap already in the environment is the
    user's: kept where it names the same set, refused where it contradicts the pin, since either
    silent choice would compute other numbers than the user or the record asked for; and one
    process cannot compute with two sets, so a second pin that differs from the first is refused
    too. A cap above the CPU's best does nothing: an AVX2-only machine runs AVX2 whatever the
    pin, and says so in its kernel_isa."""
    global _pinned
    if cpu_isa == "native":
        return
    want = KERNEL_PINS[cpu_isa]
    for name in CAP_NAMES:
        have = os.environ.get(name, "").strip()
        if not have or have.upper() == want:
            continue
        if name == CAP_NAMES[0] and have == _pinned:
            raise BusisegError(f"this process already computes with {have} kernels (pinned for "
                               f"an earlier model; oneDNN reads the cap once), but {source}="
                               f"{cpu_isa} needs {want}: run it in a process of its own")
        raise BusisegError(f"{name}={have} contradicts {source}={cpu_isa} (oneDNN's {want}); "
                           f"unset {name} or set it to {want}")
    os.environ[CAP_NAMES[0]] = _pinned = want


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU (measured slower)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads_and_kernels(threads: int, deterministic: bool,
                                  device: torch.device) -> None:
    """CPU runs are repeatable as they are; GPU kernels only when asked (they cost speed)."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def kernel_isa() -> str:
    """The instruction set CPU convolutions run with: oneDNN takes the CPU's best (AVX-512 where
    there is one, else AVX2, …) unless ONEDNN_MAX_CPU_ISA caps it. Runs with different kernels
    round differently, so results reproduce exactly only on the same kind."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    best = ("AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags
            else platform.machine())
    if cap.startswith("AVX2") and best == "AVX512":
        return "AVX2"
    return best


def machine() -> dict:
    """Stored beside every measurement: a timing means nothing without the machine it ran on,
    and an exact figure nothing without the kernels' instruction set."""
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "kernel_isa": kernel_isa(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
