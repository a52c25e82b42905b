"""Where a training process runs on a shared machine: its rank, its CPU threads and its GPU.

Several runs share one machine in two ways: DVC's experiment queue (`dvc queue start -j N` runs N
experiments at once) and torchrun (`train.processes` processes for one run). Each process takes
cores / (queue workers × processes) threads, and GPU number (worker − 1) × processes + local rank,
so N workers × P processes use N × P distinct GPUs, without the user naming any of them.
DVC passes no worker number to a stage: it is read from the `dvc exp queue-worker` process that
runs it (its node name ends in the worker's number), and the worker count from its live siblings.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from busiseg.errors import BusisegError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ALONE = Ranks()  # a process that is the whole run


def current() -> Ranks:
    """This process's place, from the variables torchrun sets (one process when there are none)."""
    env = os.environ
    if "LOCAL_RANK" not in env:
        return Ranks()
    return Ranks(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                 int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


WORKER_NODE = re.compile(r"dvc-exp-([0-9a-f]+)-(\d+)@")


@dataclass(frozen=True)
class QueueSlot:
    worker: int = 1  # 1-based, as `dvc queue start` numbers its workers
    workers: int = 1  # live workers of the same queue (the N of `-j N`)
    pid: int | None = None  # the worker's process

    def check_worker_alive(self) -> None:
        """A queue worker that died cannot collect its experiment's result, which DVC then shows
        as Running for ever: stop training rather than compute a result no one will see."""
        import psutil

        if self.pid is not None and not psutil.pid_exists(self.pid):
            name = os.environ.get("DVC_EXP_NAME", "NAME")
            raise BusisegError(f"the dvc queue worker running experiment {name} (worker "
                               f"{self.worker}) has died, so DVC cannot record its result; "
                               f"clear it with `dvc queue kill {name}`, then queue it again")


def queue_slot() -> QueueSlot:
    """This process's DVC queue worker, or a single slot when it does not run in a queue."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            match = _worker_node(proc)
            if match:
                siblings = {m.group(2) for p in psutil.process_iter()
                            if (m := _worker_node(p)) and m.group(1) == match.group(1)}
                return QueueSlot(int(match.group(2)), max(1, len(siblings)), proc.pid)
    except psutil.Error:
        pass
    return QueueSlot()


def _worker_node(proc) -> re.Match | None:
    import psutil

    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    if "queue-worker" not in cmdline:
        return None
    return next(filter(None, map(WORKER_NODE.match, cmdline)), None)


OVERSUBSCRIBE = 3  # one-thread training processes per core at most when all start at once


def cpu_cores() -> int:
    """Cores this process may use (a container or `taskset` may allow fewer than the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_threads(setting: int, processes: int, slot: QueueSlot) -> int:
    """train.threads, or (0) this process's share of the cores: two queue workers that each took
    every core would run both experiments slower than one after the other. 0 = PyTorch's own
    default, which a process alone on the machine keeps."""
    if setting or processes * slot.workers == 1:
        return setting
    return max(1, cpu_cores() // (processes * slot.workers))


def gpu_index(local_rank: int, processes: int, slot: QueueSlot, gpus: int) -> int:
    """Distinct GPUs for every process of every queue worker, shared round-robin when there are
    fewer GPUs than processes (CUDA_VISIBLE_DEVICES narrows the set, as everywhere)."""
    return ((slot.worker - 1) * processes + local_rank) % gpus


def worker_device(device, local_rank: int, processes: int, slot: QueueSlot):
    """The GPU this process computes on (see gpu_index); any other device as it is."""
    import torch

    if device.type != "cuda":
        return device
    gpu = torch.device("cuda", gpu_index(local_rank, processes, slot, torch.cuda.device_count()))
    torch.cuda.set_device(gpu)
    return gpu


def die_with_parent() -> None:
    """A training process whose parent was killed (SIGKILL leaves no time to stop it) would go
    on writing the checkpoint or file the resumed run reads: on Linux the kernel kills it too."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing as mp
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os._exit(1)
