"""How the GPU figures were made on a lent GPU machine that has no dvc and no network: the bench
train variants, then preset runs (the train and evaluate stage scripts, as `dvc exp run` would
call them) in parallel, each in its own copy of the repo, gathered into $OUT/results.json.

    python3 bench/device/pack.py data/cache.npz .gpu/c256/pack.npz   # here, per size; + split.csv
    python3 bench/device/runner.py [bench] [runs]                     # there, after installing the
                                                                      # smp and Lite0 wheels in SITE
Where dvc exists, run the presets with `python -m busiseg.research.protocol run PRESET` instead.
"""
import glob
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = os.getcwd()
OUT = os.environ.get("OUT", "/tmp/out")
SITE = os.environ.get("SITE", "/tmp/site")
T0 = time.time()
DEADLINE = float(os.environ.get("DEADLINE", "900"))  # seconds from start; runs still going: killed
results = {"started": time.strftime("%H:%M:%S"), "bench": {}, "runs": {}}


def save():
    results["elapsed_s"] = round(time.time() - T0, 1)
    Path(f"{OUT}/results.json").write_text(json.dumps(results, indent=1))


def env(src):
    return dict(os.environ, PYTHONPATH=f"{SITE}:{REPO}/bench/device/shim:{src}",
                PYTHONUNBUFFERED="1")


def unpack(name):
    dest = f"/tmp/cache_{name}"
    if os.path.exists(f"{dest}/cache.npz"):
        return dest
    os.makedirs(dest, exist_ok=True)
    d = np.load(f".gpu/{name}/pack.npz")
    shape = tuple(d["shape"])
    diff = np.frombuffer(lzma.decompress(d["images_xz"].tobytes()), np.uint8).reshape(shape)
    img = np.cumsum(diff, axis=-1, dtype=np.uint8)
    np.savez(f"{dest}/cache.npz", format=d["format"], images=img, masks=d["masks"],
             case_ids=d["case_ids"], classes=d["classes"])
    shutil.copy(f".gpu/{name}/split.csv", f"{dest}/split.csv")
    return dest


def setp(params, key, value):
    node = params
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    assert last in node, key
    node[last] = value


def start_run(name, preset, extra, cache, threads):
    sys.path.insert(0, f"{REPO}/src")
    from busiseg.research.presets import load_presets
    overrides = dict(load_presets()[preset].overrides)
    overrides.update({"split.seed": 0, "train.seed": 0, "train.threads": threads,
                      "train.progress": "off", **extra})
    work = f"/tmp/runs/{name}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(f"{work}/data")
    for part in ("src", "stages"):
        shutil.copytree(part, f"{work}/{part}")
    params = yaml.safe_load(Path("params.yaml").read_text())
    for k, v in overrides.items():
        setp(params, k, v)
    Path(f"{work}/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    src = unpack(cache)
    for f in ("cache.npz", "split.csv"):
        os.symlink(f"{src}/{f}", f"{work}/data/{f}")
    cmd = f"({sys.executable} stages/train.py && {sys.executable} stages/evaluate.py) > log 2>&1"
    proc = subprocess.Popen(cmd, shell=True, cwd=work, env=env(f"{work}/src"))
    results["runs"][name] = {"preset": preset, "extra": extra, "overrides": overrides,
                             "t_start": round(time.time() - T0, 1)}
    return proc


def collect(name, proc):
    work = f"/tmp/runs/{name}"
    r = results["runs"][name]
    r["rc"], r["t_end"] = proc.returncode, round(time.time() - T0, 1)
    for key, path in (("train", "metrics/train.json"), ("eval", "metrics/eval.json")):
        if os.path.exists(f"{work}/{path}"):
            r[key] = json.loads(Path(f"{work}/{path}").read_text())
    hist = {}
    for fold_dir in sorted(glob.glob(f"{work}/dvclive/train/fold_*")) or [f"{work}/dvclive/train"]:
        tsv = f"{fold_dir}/plots/metrics/val_dice.tsv"
        if os.path.exists(tsv):
            rows = Path(tsv).read_text().split("\n")[1:]
            hist[os.path.basename(fold_dir)] = [float(x.split("\t")[1]) for x in rows if x]
    r["val_dice_history"] = hist
    r["log_tail"] = Path(f"{work}/log").read_text()[-3000:]


def bench(tag, *flags, timeout=120):
    cmd = [sys.executable, "bench/bench.py", "train", "--device", "cuda", "--size", "256",
           "--batch", "16", "--steps", "10", "--rounds", "3", "--warmup", "3", "--name", tag,
           *flags]
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env(f"{REPO}/src"), capture_output=True, text=True,
                           timeout=timeout)
        path = Path(f"bench/results/{tag}.json")
        results["bench"][tag] = json.loads(path.read_text()) if path.exists() else \
            {"error": (p.stdout + p.stderr)[-2000:]}
    except subprocess.TimeoutExpired:
        results["bench"][tag] = {"error": f"timeout {timeout}s"}
    results["bench"][tag]["wall_s"] = round(time.time() - t, 1)
    save()


def main():
    os.makedirs(OUT, exist_ok=True)
    what = sys.argv[1:] or ["bench", "runs"]
    if "bench" in what:
        bench("gpu_fp32_cl", "--amp", "off")
        bench("gpu_bf16_cl", "--amp", "bf16")
        bench("gpu_bf16_nocl", "--amp", "bf16", "--no-channels-last")
        bench("gpu_bf16_cl_compile", "--amp", "bf16", "--compile", timeout=180)
    if "runs" in what:
        plan = json.loads(os.environ["PLAN"]) if "PLAN" in os.environ else PLAN
        procs = {name: start_run(name, *spec) for name, spec in plan.items()}
        save()
        while any(p.poll() is None for p in procs.values()):
            time.sleep(2)
            if time.time() - T0 > DEADLINE:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                results["killed_at_deadline"] = True
                break
        for name, p in procs.items():
            p.wait()
            collect(name, p)
        save()
    for name in results["runs"]:
        r = results["runs"][name]
        scores = {k: r.get("eval", {}).get(k) for k in ("cv_dice", "dice", "dice_ci_low",
                                                         "dice_ci_high")}
        print(name, r.get("rc"), r.get("t_end"), scores, r.get("train", {}).get("seconds"))
    for tag, b in results["bench"].items():
        print(tag, {k: b.get(k) for k in ("busiseg_images_per_s", "conventional_images_per_s",
                                          "busiseg_data_fraction", "error", "wall_s")})


# name: (preset, extra overrides, packed cache under .gpu/, CPU threads per run)
PLAN = {
    "lite0-128": ("busi-lite0-cv5", {}, "c128", 3),
    "lite0-scratch-128": ("busi-lite0-scratch-cv5", {}, "c128", 3),
    "lite0-256": ("busi-gpu-lite0-cv5", {}, "c256", 3),
    "lite0-scratch-256": ("busi-gpu-lite0-scratch-cv5", {}, "c256", 3),
}

if __name__ == "__main__":
    main()
