"""Where and how tensors are computed: device, mixed precision, threads, seeds.

Training, evaluation and prediction each name their own device setting; the policy for turning
that setting into a device and a precision is written once, here.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

from busiseg.errors import BusisegError


def pick_device(name: str, param: str = "train.device") -> torch.device:
    """auto prefers a GPU; asking for one that is not there fails naming the param to change."""
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


def show_progress(setting: str) -> bool:
    """A progress bar only where a person watches: never in CI logs or redirected output."""
    if setting != "auto":
        return setting == "on"
    return sys.stderr.isatty() and not os.environ.get("CI")


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    """Stored beside every measurement: a timing means nothing without the machine it ran on."""
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
