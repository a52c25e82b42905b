"""One training run on several processes: torchrun and DistributedDataParallel.

`train.processes: N` makes the train stage start itself N times through torchrun's launcher, so
`dvc repro` and `dvc exp run -S train.processes=4` need nothing else; a stage already started by
`torchrun` (several machines, say) runs as the rank it was given. Every rank draws the same
batches and augmentation as one process would and keeps its equal slice of each batch: the run
sees the same images in the same order under the same schedule (loss and BatchNorm statistics
are per slice, so it agrees with one process within training noise). Rank 0 validates (and
tells the others the result, which drives the schedule and early stopping) and writes every file.
"""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from busiseg.errors import BusisegError
from busiseg.params import TrainParams
from busiseg.runtime.device import pick_device
from busiseg.runtime.placement import ALONE, Ranks, cpu_cores, current  # noqa: F401 (re-exported)


def check_request(cfg: TrainParams, device: torch.device, ranks: Ranks) -> None:
    """Requests that cannot run end here, before any process starts, with the param to change."""
    processes, cores = cfg.processes, cpu_cores()
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if ranks.world > 1 and ranks.world != processes:
        raise BusisegError(f"train.processes is {processes} but torchrun started {ranks.world} "
                           f"processes; set -S train.processes={ranks.world} so the experiment "
                           "records how it was trained")
    if processes == 1:
        return
    local = ranks.local_world if ranks.world > 1 else processes
    if device.type == "cuda" and local > gpus:
        raise BusisegError(f"train.processes is {processes} but this machine has {gpus} CUDA "
                           f"GPU(s); set train.processes ≤ {gpus} (one process per GPU)")
    if device.type == "cpu" and local > cores:
        raise BusisegError(f"train.processes is {processes} but this machine has {cores} CPU "
                           f"cores; set train.processes ≤ {cores}")
    if device.type not in ("cpu", "cuda"):
        raise BusisegError(f"train.processes > 1 needs train.device cpu or cuda, not "
                           f"{device.type}; set train.processes=1")
    check_batch(cfg.batch_size, Ranks(world=processes))
    if cfg.sync_bn and device.type != "cuda":
        raise BusisegError("train.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU "
                           "version); set train.sync_bn=false")


def check_batch(batch_size: int, ranks: Ranks) -> None:
    """Equal slices of at least 2 images: DDP weighs every process alike, BatchNorm needs 2."""
    if ranks.world > 1 and (batch_size % ranks.world or batch_size < 2 * ranks.world):
        raise BusisegError(f"a batch of {batch_size} images does not split into {ranks.world} "
                           f"equal slices of 2 or more; set train.batch_size to a multiple of "
                           f"{ranks.world}, at least {2 * ranks.world} (and no larger than the "
                           "train split)")


def sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics over all processes. timm's converter, because PyTorch's turns timm's
    BatchNormAct2d (norm + activation, in the smp encoders) into a bare norm, dropping the
    activation; it converts plain BatchNorm layers the same way."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def launch(cfg: TrainParams, script: Path) -> None:
    """Run `script` as train.processes ranks on this machine (what `torchrun --standalone` does).
    A failed rank has printed its own message; this adds one line, not torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_request(cfg, pick_device(cfg.device, "train.device"), ALONE)
    processes = cfg.processes

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        elastic_launch(config, sys.executable)(str(script))
    except SignalException:  # Ctrl-C or kill: the ranks stopped too (rank 0 said so)
        sys.exit(130)
    except ChildFailedError as exc:
        main = exc.failures.get(0)
        if main is not None and main.exitcode > 0:
            sys.exit(main.exitcode)  # rank 0 has said why, in one line
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            raise BusisegError(f"training process {rank} of {processes} failed (exit code "
                               f"{failure.exitcode}; its message is above)") from None
        raise BusisegError(f"training process {rank} of {processes} was killed by signal "
                           f"{-failure.exitcode}; `dvc repro` resumes from the last epoch "
                           "(models/checkpoints)") from None


def init(device: torch.device, ranks: Ranks) -> None:
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=ranks.rank, world_size=ranks.world)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """The model that trains: DistributedDataParallel averages the ranks' gradients in backward.
    (SyncBatchNorm, if asked for, is converted before the weights are loaded.)"""
    if ranks.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's slice of a batch every rank drew whole."""
    return batch if ranks.world == 1 else batch.tensor_split(ranks.world)[ranks.rank]


def mean(value: float, ranks: Ranks) -> float:
    if ranks.world == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / ranks.world


def from_main(obj, ranks: Ranks):
    """Rank 0's value on every rank (a validation result, say)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value, ranks: Ranks) -> bool:
    """Whether every rank holds the same value (every rank learns the answer)."""
    if ranks.world == 1:
        return True
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)
