"""The speed levers of a cross-validation fold on the CPU, side by side: `bench.py levers`.

Each setting trains the recipe's network (smp U-Net on EfficientNet-Lite0, 128 px, batch 8,
AdamW, the per-image Dice loss, the recipe's batched augmentation) for a fixed number of steps in
fresh processes; settings are interleaved round by round so that all see the same machine, and
each figure is the median over rounds. A setting of P processes runs P of them at once, released
together after their warm-up, and counts their summed images/s (folds side by side). Kernels are
set per process through ONEDNN_MAX_CPU_ISA, as train.cpu_isa does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = (256, 128, 64, 32, 16)  # smp's default decoder widths
SETTINGS = {  # name: (kernels, processes, threads each, amp, decoder widths, compile)
    "recorded (AVX2 pin, 1x2)": ("AVX2", 1, 2, "off", FULL, False),
    "native kernels": ("native", 1, 2, "off", FULL, False),
    "bf16 autocast": ("native", 1, 2, "bf16", FULL, False),
    "2 processes x 1 thread": ("native", 2, 1, "off", FULL, False),
    "5 processes x 1 thread": ("native", 5, 1, "off", FULL, False),
    "decoder 128..8": ("native", 1, 2, "off", (128, 64, 32, 16, 8), False),
    "decoder 64..8": ("native", 1, 2, "off", (64, 32, 16, 16, 8), False),
    "torch.compile": ("native", 1, 2, "off", FULL, True),
    "2x1 + decoder 128..8": ("native", 2, 1, "off", (128, 64, 32, 16, 8), False),
}
BASE = "recorded (AVX2 pin, 1x2)"


def worker(spec: dict) -> None:
    """One training process: build, warm up, wait for the parent's go, time, report JSON."""
    import torch

    torch.set_num_threads(spec["threads"])
    from busiseg.modeling.archs import SmpModel
    from busiseg.params import AugmentParams, TrainParams
    from busiseg.runtime.device import autocast
    from busiseg.training.augment import augment_batch
    from busiseg.training.losses import SegLoss

    torch.manual_seed(0)
    size, bs = spec["size"], 8
    model = SmpModel(decoder="unet", decoder_channels=tuple(spec["decoder"]))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SegLoss.from_params(TrainParams(dice_reduction="image"))
    aug = AugmentParams(rotate=15.0, scale=0.15, shift=0.1, brightness=0.2, contrast=0.2,
                        gamma=0.2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, size, size), dtype=torch.uint8, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.stack([((yy - 40 - i) ** 2 + (xx - 60) ** 2 < 400 + 20 * i)[None]
                         for i in range(64)]).to(torch.uint8)
    dtype = torch.bfloat16 if spec["amp"] == "bf16" else None
    fwd = torch.compile(model) if spec["compile"] else model

    def step(i: int) -> None:
        idx = torch.arange(i * bs, (i + 1) * bs) % len(images)
        x, y = augment_batch(images[idx].float() / 255, masks[idx].float(), aug, gen)
        x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
        with autocast(torch.device("cpu"), dtype):
            out = fwd(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t0 = time.perf_counter()
    for i in range(spec["warmup"]):
        step(i)
    warm = time.perf_counter() - t0
    print("ready", flush=True)
    sys.stdin.readline()  # every process of the setting starts timing together
    t0 = time.perf_counter()
    for i in range(spec["steps"]):
        step(i)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.inference_mode():
        x = ((images[:48].float() / 255 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
        model(x[:16])
        t0 = time.perf_counter()
        for chunk in x.split(16):
            with autocast(torch.device("cpu"), dtype):
                model(chunk)
        val_s = time.perf_counter() - t0
    print(json.dumps({"train_images_per_s": spec["steps"] * bs / train_s,
                      "val_images_per_s": 48 / val_s, "warmup_s": warm}), flush=True)


def run_setting(name: str, steps: int, warmup: int, size: int) -> dict:
    isa, procs, threads, amp, decoder, compiled = SETTINGS[name]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    spec = {"threads": threads, "amp": amp, "decoder": list(decoder), "compile": compiled,
            "steps": steps, "warmup": warmup + (2 if compiled else 0), "size": size}
    children = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env) for _ in range(procs)]
    for c in children:
        if c.stdout.readline().strip() != "ready":
            raise SystemExit(f"bench levers: a worker of {name!r} failed")
    for c in children:
        c.stdin.write("go\n")
        c.stdin.flush()
    results = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    return {"train_images_per_s": sum(r["train_images_per_s"] for r in results),
            "val_images_per_s": sum(r["val_images_per_s"] for r in results),
            "warmup_s": max(r["warmup_s"] for r in results)}


def levers(rounds: int, steps: int, warmup: int, size: int, only: list[str] | None) -> dict:
    names = [n for n in SETTINGS if not only or n == BASE or any(o in n for o in only)]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            runs[name].append(run_setting(name, steps, warmup, size))
            print(f"round {r + 1}/{rounds}  {name:26s} "
                  f"{runs[name][-1]['train_images_per_s']:6.1f} images/s", flush=True)
    base = statistics.median(x["train_images_per_s"] for x in runs[BASE])
    table = {}
    for name in names:
        ips = [x["train_images_per_s"] for x in runs[name]]
        val = statistics.median(x["val_images_per_s"] for x in runs[name])
        med = statistics.median(ips)
        # one fold's epoch: ~559 training images and ~140 validation images (BUSI, 5 folds)
        val_share = (140 / val) / (559 / med + 140 / val)
        isa, procs, threads, amp, decoder, compiled = SETTINGS[name]
        table[name] = {"kernels": isa, "processes": procs, "threads": threads, "amp": amp,
                       "decoder_channels": list(decoder), "compile": compiled,
                       "train_images_per_s": round(med, 2),
                       "train_images_per_s_runs": [round(v, 2) for v in ips],
                       "speedup": round(med / base, 3),
                       "val_share_of_epoch": round(val_share, 3),
                       "warmup_s": round(statistics.median(x["warmup_s"] for x in runs[name]),
                                         1)}
    return table


def print_table(table: dict) -> None:
    print(f"\n{'setting':26s} {'images/s':>9s} {'speed-up':>9s} {'val share':>10s}  runs")
    for name, row in table.items():
        print(f"{name:26s} {row['train_images_per_s']:9.1f} {row['speedup']:8.2f}x "
              f"{row['val_share_of_epoch']:9.1%}  {row['train_images_per_s_runs']}")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    worker(json.loads(sys.argv[2]))
