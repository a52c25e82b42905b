"""Scale-out measurements (issue #21): writes JSON to bench/results/.

    uv run python bench/scale_out.py queue              # 2 queued experiments: -j 1 vs -j 2
    uv run python bench/scale_out.py ddp --cache C --manifest M --size 128 --epochs 10
                                                        # 1 process x 2 threads vs 2 x 1 (DDP)

queue: the default demo pipeline in a clone of this repository (sharing its DVC cache, so only
train, evaluate and plot run), two experiments that differ in train.seed (no run-cache hit),
timed from `dvc queue start` until both have succeeded; configurations run one after another.
ddp: the train stage on a given cache (the real BUSI's, say), one run per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import REPO, save


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def bench_queue(args) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        sh(["git", "clone", "-q", str(REPO), str(repo)], REPO)
        sh([*dvc, "cache", "dir", "--local", str(REPO / ".dvc" / "cache")], repo, env)
        sh([*dvc, "checkout", "-q"], repo, env)
        seed = 100
        for name, jobs, threads in args.configs:
            names = []
            for _ in range(2):
                seed += 1
                names.append(f"{name}-s{seed}")
                sh([*dvc, "exp", "run", "--queue", "-n", names[-1], "-S", f"train.seed={seed}",
                    "-S", f"train.threads={threads}", "-S", f"train.epochs={args.epochs}"],
                   repo, env)
            t0 = time.perf_counter()
            sh([*dvc, "queue", "start", "-j", str(jobs)], repo, env)
            while True:
                status = sh([*dvc, "queue", "status"], repo, env)
                if not any(s in status for s in ("Queued", "Running")):
                    break
                time.sleep(1)
            wall = time.perf_counter() - t0
            if status.count("Success") < len(rows) + 2:
                sys.exit(f"an experiment failed:\n{status}")
            shown = json.loads(sh([*dvc, "exp", "show", "--json"], repo, env))
            trains = [_train_metrics(shown, n) for n in names]
            rows.append({"config": name, "jobs": jobs, "train.threads": threads,
                         "wall_s": round(wall, 1),
                         "threads_used": [m["threads"] for m in trains],
                         "train_seconds": [m["seconds"] for m in trains]})
            print(rows[-1], flush=True)
            time.sleep(12)  # idle workers exit after 10 s: the next -j starts afresh
    save(args.name or "queue", {"epochs": args.epochs, "rows": rows})


def _train_metrics(shown: list, name: str) -> dict:
    for base in shown:
        for exp in base.get("experiments") or []:
            if exp.get("name") == name:
                data = exp["revs"][0]["data"]
                return data["metrics"]["metrics/train.json"]["data"]
    raise SystemExit(f"experiment {name} not in dvc exp show")


def bench_ddp(args) -> None:
    from busiseg.data.manifest import read_manifest
    from busiseg.data.split import make_split

    rows = []
    for name, processes, threads, seed in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "data").mkdir()
            os.symlink(Path(args.cache).resolve(), work / "data" / "cache.npz")
            params = yaml.safe_load((REPO / "params.yaml").read_text())
            s = params["split"]
            make_split(read_manifest(args.manifest), s["train"], s["val"], s["test"], s["seed"],
                       0).to_csv(work / "data" / "split.csv", index=False)
            params["preprocess"]["size"] = args.size
            params["train"].update(epochs=args.epochs, processes=processes, threads=threads,
                                   seed=seed)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=work,
                           check=True)
            wall = time.perf_counter() - t0
            m = json.loads((work / "metrics" / "train.json").read_text())
            live = json.loads((work / "dvclive" / "train" / "metrics.json").read_text())
        rows.append({"config": name, "processes": processes, "threads": threads, "seed": seed,
                     "wall_s": round(wall, 1), "train_seconds": m["seconds"],
                     "images_per_s": m["images_per_s"], "final_val_dice": live["val_dice"],
                     "best_val_dice": m["best_val_dice"], "best_epoch": m["best_epoch"]})
        print(rows[-1], flush=True)
    save(args.name or f"ddp_{args.size}", {"epochs": args.epochs, "cache": args.cache,
                                           "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("queue")
    q.add_argument("--epochs", type=int, default=20)
    q.add_argument("--name", default=None)
    q.set_defaults(func=bench_queue, configs=[("j1", 1, 0), ("j2", 2, 0), ("j2-threads2", 2, 2)])
    d = sub.add_parser("ddp")
    d.add_argument("--cache", required=True, help="a data/cache.npz")
    d.add_argument("--manifest", required=True, help="the data/manifest.csv it was made from")
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--name", default=None)
    d.set_defaults(func=bench_ddp, configs=[("1x2", 1, 2, 0), ("2x1", 2, 1, 0),
                                            ("1x2-seed1", 1, 2, 1)])
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
