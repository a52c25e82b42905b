"""Scale-out on existing engines: DVC's experiment queue with threads and GPUs per worker, and one
training run on several processes (torchrun + DistributedDataParallel, gloo on CPU here)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    REPO,
    TIMING_KEYS,
    built_pipeline,
    copy_built,
    dvc,
    set_params,
    tiny_data,
)

from busiseg.errors import BusisegError
from busiseg.evaluation.plots import read_live_curves
from busiseg.params import parse_params
from busiseg.runtime import distributed
from busiseg.runtime.placement import QueueSlot, cpu_cores, cpu_threads, gpu_index, queue_slot

TRAIN_STAGE = REPO / "stages" / "train.py"


# ---- placement: threads and GPUs per queue worker and per process ------------------------------


def test_threads_are_shared_among_queue_workers_and_processes():
    cores = cpu_cores()
    assert cpu_threads(0, 1, QueueSlot()) == 0  # alone: PyTorch's default
    assert cpu_threads(3, 2, QueueSlot(1, 4)) == 3  # an explicit train.threads always wins
    assert cpu_threads(0, 1, QueueSlot(1, 2)) == max(1, cores // 2)
    assert cpu_threads(0, 2, QueueSlot(2, 2)) == max(1, cores // 4)


def test_every_process_of_every_worker_gets_its_own_gpu():
    two_by_two = [gpu_index(rank, 2, QueueSlot(worker, 2), gpus=4)
                  for worker in (1, 2) for rank in (0, 1)]
    assert two_by_two == [0, 1, 2, 3]
    assert [gpu_index(0, 1, QueueSlot(w, 3), gpus=2) for w in (1, 2, 3)] == [0, 1, 0]


FAKE_WORKER = """
import subprocess, sys, time
# named like DVC's worker: dvc exp queue-worker dvc-exp-<repo hash>-<number>@localhost
if sys.argv[2].endswith("-2@localhost"):
    print(subprocess.run([sys.executable, "-c", sys.argv[3]], capture_output=True, text=True,
                         check=True).stdout, flush=True)
else:
    time.sleep(60)
"""


def test_a_stage_finds_its_queue_worker_and_the_worker_count(tmp_path: Path):
    assert queue_slot() == QueueSlot()  # not in a queue
    probe = ("from busiseg.runtime.placement import queue_slot; s = queue_slot(); "
             "print(s.worker, s.workers)")
    sibling = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, "queue-worker",
                                "dvc-exp-abc123-1@localhost"])
    other_repo = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, "queue-worker",
                                   "dvc-exp-ffffff-1@localhost"])
    try:
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", FAKE_WORKER, "queue-worker",
                              "dvc-exp-abc123-2@localhost", probe], capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == ["2", "2"]  # worker 2 of this repo's 2; the other repo's is not counted
    finally:
        sibling.kill()
        other_repo.kill()


# ---- one run on several processes -----------------------------------------------------------


def ddp_workdir(path: Path, **train) -> Path:
    """A stage working directory: a tiny cache and split, and params.yaml with train.* set."""
    (path / "data").mkdir(parents=True)
    tiny_data(path / "data", n=48)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["preprocess"]["size"] = 32
    params["model"].update(base=4, depth=2)
    params["train"].update({"epochs": 4, "batch_size": 6, "lr": 0.01, "warmup_epochs": 0,
                            "processes": 2, **train})
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def train_stage(workdir: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TRAIN_STAGE)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def digest(workdir: Path) -> str:
    return torch.load(workdir / "models" / "model.pt", weights_only=True)["digest"]


@pytest.mark.slow
def test_two_processes_train_write_once_and_resume_after_a_kill(tmp_path: Path, python_env):
    epochs = 8  # Ctrl-C lands at epoch 2, seconds before the last
    work = ddp_workdir(tmp_path / "w", epochs=epochs)
    out = train_stage(work, python_env)  # the uninterrupted reference
    assert out.stdout.count(f"epoch   1/{epochs}") == 1, out.stdout  # rank 0 alone reports
    assert "2 process(es)" in out.stdout
    reference = json.loads((work / "metrics" / "train.json").read_text())
    assert reference["processes"] == 2 and reference["epochs_run"] == epochs
    assert reference["threads"] == max(1, cpu_cores() // 2)
    curves = read_live_curves(work / "dvclive" / "train")
    assert curves["train_loss"].iloc[-1] < curves["train_loss"].iloc[0]
    reference_digest = digest(work)

    proc = subprocess.Popen([sys.executable, str(TRAIN_STAGE)], cwd=work, env=python_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:  # a fresh run: the finished run's marker is never resumed
        seen.append(line)
        if line.startswith(f"epoch   2/{epochs}"):
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and both ranks
            break
    seen.extend(proc.stdout)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(seen)
    assert "Traceback" not in "".join(seen)
    assert not (work / "models" / "model.pt").exists()
    assert not (work / "metrics" / "train.json").exists()
    resumed = train_stage(work, python_env)
    assert "resuming from epoch" in resumed.stdout, resumed.stdout
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    # two processes are as repeatable as one, across a kill
    assert metrics | dict.fromkeys(TIMING_KEYS) == reference | dict.fromkeys(TIMING_KEYS)
    assert digest(work) == reference_digest


@pytest.mark.slow
def test_cross_validation_folds_train_on_two_processes(tmp_path: Path, python_env):
    work = ddp_workdir(tmp_path / "w", epochs=2)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["split"]["folds"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    split = pd.read_csv(work / "data" / "split.csv")
    cv = split["split"] != "test"
    split.loc[cv, "split"] = "cv"
    split.loc[cv, "fold"] = [i % 2 for i in range(cv.sum())]
    split.to_csv(work / "data" / "split.csv", index=False)
    out = train_stage(work, python_env)
    assert out.stdout.count("fold 1 epoch   2/2") == 1, out.stdout
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    assert metrics["folds"] == 2 and metrics["processes"] == 2
    blob = torch.load(work / "models" / "model.pt", weights_only=True)
    assert blob["members"] == 2
    assert sorted(p.name for p in (work / "models" / "checkpoints").iterdir()) == \
        ["fold_0.ckpt", "fold_1.ckpt"]  # the members' own files went into the ensemble


@pytest.mark.slow
def test_a_failing_rank_ends_in_one_line(tmp_path: Path, python_env):
    work = ddp_workdir(tmp_path / "w")
    split = work / "data" / "split.csv"
    pd.read_csv(split).assign(split="test").to_csv(split, index=False)  # no train, no val
    out = train_stage(work, python_env, check=False)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "split.csv" in errors[0], \
        out.stderr


@pytest.mark.parametrize(("train", "fragment"), [
    ({"processes": 64}, "CPU cores; set train.processes ≤"),
    ({"processes": 2, "batch_size": 3}, "set train.batch_size to a multiple of 2, at least 4"),
    ({"processes": 2, "batch_size": 10, "device": "cpu"}, None),
    ({"processes": 2, "sync_bn": True}, "train.sync_bn needs CUDA"),
])
def test_requests_that_cannot_run_fail_before_any_process_starts(train, fragment):
    cfg = parse_params({"train": {"device": "cpu", **train}}).train
    if fragment is None:  # a request that can run
        distributed.check_request(cfg, torch.device("cpu"), distributed.ALONE)
        return
    with pytest.raises(BusisegError, match=fragment.replace("(", r"\(")):
        distributed.check_request(cfg, torch.device("cpu"), distributed.ALONE)


def test_sync_batchnorm_keeps_timm_encoders_activations():
    from busiseg.modeling.registry import build_model

    torch.manual_seed(0)
    model = build_model("smp_unet", encoder="tu-tf_efficientnet_lite0").eval()
    synced = distributed.sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert synced.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(synced(x), model(x), atol=1e-5)


def test_torchrun_world_size_must_match_the_param():
    cfg = parse_params({"train": {"device": "cpu", "processes": 1}}).train
    with pytest.raises(BusisegError, match="set -S train.processes=4"):
        distributed.check_request(cfg, torch.device("cpu"), distributed.Ranks(0, 0, 4, 4))


@pytest.mark.slow
def test_training_stops_when_its_queue_worker_dies(tmp_path: Path, python_env):
    work = ddp_workdir(tmp_path / "w", processes=1, epochs=200)
    launcher = ("import subprocess, sys; p = subprocess.Popen([sys.executable, sys.argv[3]], "
                "stdout=subprocess.DEVNULL, stderr=open(sys.argv[4], 'w')); "
                "print(p.pid, flush=True); p.wait()")
    env = python_env | {"DVC_EXP_NAME": "lr-small"}
    stderr = tmp_path / "stderr.txt"
    worker = subprocess.Popen([sys.executable, "-c", launcher, "queue-worker",
                               "dvc-exp-abc123-1@localhost", str(TRAIN_STAGE), str(stderr)],
                              cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    stage_pid = int(worker.stdout.readline())
    deadline = time.time() + 120
    while not (work / "models" / "checkpoints" / "run.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    worker.kill()  # the queue worker dies; its stage carries on as an orphan ...
    worker.wait()
    while _alive(stage_pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(stage_pid), "training went on without its queue worker"
    message = stderr.read_text().strip()
    assert message.startswith("error: the dvc queue worker running experiment lr-small") \
        and "dvc queue kill lr-small" in message and len(message.splitlines()) == 1, message
    assert not (work / "models" / "model.pt").exists()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the queue: two experiments at once -----------------------------------------------------


@pytest.mark.slow
def test_the_queue_runs_two_experiments_at_once(tmp_path: Path, tmp_path_factory, python_env):
    repo = copy_built(built_pipeline(tmp_path_factory, python_env), tmp_path / "repo")
    set_params(repo, train={"threads": 0})  # each its share of the cores
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(git + ["commit", "-qam", "threads: the share"], cwd=repo, check=True)
    # up to evaluate: what the assertions read (package and plot add nothing the queue changes)
    dvc(repo, python_env, "exp", "run", "--queue", "-n", "lr-small", "-S", "train.lr=0.001",
        "evaluate")
    dvc(repo, python_env, "exp", "run", "--queue", "-n", "two-proc", "-S", "train.processes=2",
        "evaluate")
    try:
        dvc(repo, python_env, "queue", "start", "-j", "2")
        deadline, asked = time.time() + 600, 0.0
        while time.time() < deadline:
            # a finished experiment leaves a git ref, cheap to look for; `dvc queue status`, a
            # process that costs the queued runs seconds of CPU, is asked every 15 s (a failure)
            refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
                                  cwd=repo, text=True, capture_output=True).stdout.split()
            done = {r.rsplit("/", 1)[-1] for r in refs} >= {"lr-small", "two-proc"}
            if done or time.time() - asked >= 15:
                asked = time.time()
                status = dvc(repo, python_env, "queue", "status").stdout
                if "Queued" not in status and "Running" not in status:
                    break
            time.sleep(1)
        assert status.count("Success") == 2, status
    finally:
        dvc(repo, python_env, "queue", "stop", "--kill", check=False)
    show = pd.read_csv(pd.io.common.StringIO(
        dvc(repo, python_env, "exp", "show", "--csv").stdout))
    runs = show.set_index("Experiment").loc[["lr-small", "two-proc"]]
    default_lr = yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"]
    assert runs["train.lr"].astype(float).tolist() == [0.001, default_lr]
    assert runs["processes"].astype(int).tolist() == [1, 2]
    assert runs["dice"].notna().all()  # each its own evaluation ...
    assert runs["train_loss"].nunique() == 2  # ... of its own training
    # both ran at once, each on its share of the cores
    assert runs["threads"].astype(int).tolist() == [max(1, cpu_cores() // 2),
                                                    max(1, cpu_cores() // 4)]



AGREE = """
import os, sys
import torch.distributed as dist
from busiseg.runtime import distributed
dist.init_process_group("gloo", init_method="file://" + sys.argv[2],
                        rank=int(os.environ["RANK"]), world_size=2)
ranks = distributed.current()
print(distributed.agree(int(sys.argv[1]), ranks), distributed.agree(7, ranks))
"""


def test_processes_that_resume_from_different_epochs_notice(python_env, tmp_path):
    store = tmp_path / "rendezvous"  # a file, not a port another process could take meanwhile
    procs = [subprocess.Popen(
        [sys.executable, "-c", AGREE, str(epoch), str(store)], stdout=subprocess.PIPE, text=True,
        env=python_env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
        for rank, epoch in ((0, 5), (1, 0))]  # rank 1 found no checkpoint, rank 0 epoch 5
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert outs == [["False", "True"], ["False", "True"]]
