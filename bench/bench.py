"""busiseg benchmark harness: prints a table and writes JSON to bench/results/.

    uv run python bench/bench.py train --size 256 --base 16     # busiseg vs conventional
    uv run python bench/bench.py data --raw-dir PATH --size 256  # ingest + preprocess wall time
    uv run python bench/bench.py repro                           # no-op `dvc repro`
    uv run python bench/bench.py evaluate                        # evaluate stage, test split
    uv run python bench/bench.py evaluate --run DIR --against CHECKOUT  # two versions, alternating
    uv run python bench/bench.py members --run DIR               # members scored in one pass
    uv run python bench/bench.py memory --size 256               # peak RSS of the train stage
    uv run python bench/bench.py loss --size 128                 # step time with the empty term
    uv run python bench/bench.py predict --sizes 96 128          # PyTorch vs ONNX Runtime
    uv run python bench/bench.py models --sizes 128 256          # step time + memory per model
    uv run python bench/bench.py levers                          # speed levers of a CV fold

Timings are medians of repeated runs after warm-up; the two training paths are interleaved round
by round in one process so that both see the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from busiseg.runtime.device import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"



def torchvision_transform(p):
    """busiseg.training.augment's recipe one sample at a time with torchvision.transforms.v2: the
    per-sample baseline the train benchmark compares the batched augmentation against."""
    from torchvision.transforms import v2

    ops: list = []
    if p.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p.hflip))
    if p.vflip > 0:
        ops.append(v2.RandomVerticalFlip(p.vflip))
    if p.rotate > 0 or p.scale > 0 or p.shift > 0:
        ops.append(v2.RandomAffine(degrees=p.rotate, translate=(p.shift, p.shift),
                                   scale=(1 - p.scale, 1 + p.scale)))
    if p.elastic > 0:
        ops.append(v2.ElasticTransform(alpha=p.elastic * 8, sigma=8.0))
    if p.brightness > 0 or p.contrast > 0:
        ops.append(v2.ColorJitter(brightness=p.brightness, contrast=p.contrast))
    if p.blur > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.5, 1.5))], p=p.blur))
    return v2.Compose(ops)


def save(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "machine": machine(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def dataset(raw_dir: str | None, tmp: Path) -> Path:
    """The real data when given, else a demo set with BUSI-like image sizes (400–600 px)."""
    if raw_dir:
        return Path(raw_dir)
    from busiseg.data.demo import generate_demo

    generate_demo(tmp, n_benign=60, n_malignant=30, n_normal=20, min_size=400, max_size=600)
    return tmp / "Dataset_BUSI_with_GT"


def prepare(raw_dir: str | None, size: int, tmp: Path):
    """The raw folder, its manifest and its tensor cache at `size`, preprocessed into `tmp`."""
    from busiseg.data.cache import load_cache, preprocess
    from busiseg.data.ingest import ingest

    raw = dataset(raw_dir, tmp)
    manifest = ingest(raw).manifest
    preprocess(manifest, raw, size, tmp / "cache.npz")
    return raw, manifest, load_cache(tmp / "cache.npz")


def peak_rss_kb() -> int:
    """This process's peak RSS. Linux's ru_maxrss starts a child at its parent's RSS (the
    high-water mark survives fork and exec), so a child measured that way reports its parent;
    VmHWM belongs to the process's own memory map."""
    status = Path("/proc/self/status")
    if status.is_file():
        return int(next(line.split()[1] for line in status.read_text().splitlines()
                        if line.startswith("VmHWM")))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # macOS: bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ train


class ConventionalDataset(torch.utils.data.Dataset):
    """The usual tutorial pipeline: decode and resize PNGs per item, per-sample transforms."""

    def __init__(self, manifest, raw: Path, size: int, transform):
        self.rows = manifest.to_dict("records")
        self.raw, self.size, self.transform = raw, size, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors

        row = self.rows[i]
        img = Image.open(self.raw / row["image"]).convert("L").resize((self.size, self.size))
        mask = np.zeros((self.size, self.size), bool)
        for m in row["masks"].split("|"):
            mask |= np.asarray(Image.open(self.raw / m).convert("L").resize(
                (self.size, self.size), Image.Resampling.NEAREST)) > 0
        x = tv_tensors.Image(torch.from_numpy(np.asarray(img, np.float32) / 255)[None])
        y = tv_tensors.Mask(torch.from_numpy(mask.astype(np.float32))[None])
        x, y = self.transform(x, y)
        return (x - 0.5) / 0.25, y


def bench_train(args) -> None:
    from busiseg.modeling.registry import build_model
    from busiseg.params import AugmentParams
    from busiseg.runtime.device import amp_dtype, pick_device
    from busiseg.training.augment import augment_batch
    from busiseg.training.losses import SegLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    aug = AugmentParams()
    with tempfile.TemporaryDirectory() as tmp:
        raw, manifest, cache = prepare(args.raw_dir, args.size, Path(tmp))
        images, masks = cache.images.to(device), cache.masks.to(device)
        loss_fn = SegLoss()

        def make(channels_last: bool):
            torch.manual_seed(0)
            model = build_model(args.arch, base=args.base, depth=args.depth)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(device, memory_format=fmt).train()
            return model, torch.optim.AdamW(model.parameters(), 1e-3), fmt

        fast_model, fast_opt, fmt = make(args.channels_last)
        fast_fwd = torch.compile(fast_model) if args.compile else fast_model
        dtype = amp_dtype(args.amp, device)
        gen = torch.Generator().manual_seed(0)
        timings = {"busiseg": [], "busiseg_data": [], "conventional": []}

        def fast_step() -> tuple[float, float]:
            t0 = time.perf_counter()
            idx = torch.randint(0, len(images), (args.batch,), generator=gen).to(device)
            x, y = augment_batch(images[idx].float() / 255, masks[idx].float(), aug, gen)
            x = ((x - 0.5) / 0.25).contiguous(memory_format=fmt)
            sync(device)
            t1 = time.perf_counter()
            if dtype:
                with torch.autocast(device.type, dtype=dtype):
                    out = fast_fwd(x)
            else:
                out = fast_fwd(x)
            loss = loss_fn(out, y)
            fast_opt.zero_grad(set_to_none=True)
            loss.backward()
            fast_opt.step()
            sync(device)
            return time.perf_counter() - t0, t1 - t0

        conv_model, conv_opt, _ = make(False)
        loader = torch.utils.data.DataLoader(
            ConventionalDataset(manifest, raw, args.size, torchvision_transform(aug)),
            batch_size=args.batch, shuffle=True, drop_last=True)
        conv_iter = iter(loader)

        def conv_step() -> float:
            nonlocal conv_iter
            t0 = time.perf_counter()
            try:
                x, y = next(conv_iter)
            except StopIteration:
                conv_iter = iter(loader)
                x, y = next(conv_iter)
            x, y = x.to(device), y.to(device)
            loss = loss_fn(conv_model(x.as_subclass(torch.Tensor)), y.as_subclass(torch.Tensor))
            conv_opt.zero_grad(set_to_none=True)
            loss.backward()
            conv_opt.step()
            sync(device)
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            fast_step()
            conv_step()
        for _ in range(args.rounds):
            for _ in range(args.steps):
                total, data = fast_step()
                timings["busiseg"].append(total)
                timings["busiseg_data"].append(data)
            for _ in range(args.steps):
                timings["conventional"].append(conv_step())
    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "device": str(device),
        "busiseg_images_per_s": round(args.batch / med["busiseg"], 2),
        "conventional_images_per_s": round(args.batch / med["conventional"], 2),
        "speedup": round(med["conventional"] / med["busiseg"], 2),
        "busiseg_step_s": round(med["busiseg"], 4),
        "busiseg_data_fraction": round(med["busiseg_data"] / med["busiseg"], 4),
        "conventional_step_s": round(med["conventional"], 4),
        "n_steps_each": len(timings["busiseg"]),
    }
    save(args.name or f"train_{args.arch}{args.base}_{args.size}_{device.type}", result)


def bench_loss(args) -> None:
    """What the empty term costs a training step: the busi-cpu-image-dice loss against the same
    loss plus train.empty_weight, each on its own copy of one model, fed the same batches, in
    rounds whose order alternates (so neither always runs second)."""
    from busiseg.modeling.registry import build_model
    from busiseg.params import AugmentParams
    from busiseg.training.augment import augment_batch
    from busiseg.training.losses import LossSpec, SegLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    losses = {"image_dice": SegLoss(LossSpec(reduction="image")),
              "image_dice_empty": SegLoss(LossSpec(reduction="image",
                                                   empty_weight=args.empty_weight,
                                                   empty_topk=args.empty_topk))}
    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare(args.raw_dir, args.size, Path(tmp))[2]
    images, masks = cache.images, cache.masks
    models, opts = {}, {}
    for name in losses:
        torch.manual_seed(0)
        models[name] = build_model("unet", base=args.base).to(
            memory_format=torch.channels_last).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), 1e-3)
    gen, aug = torch.Generator().manual_seed(0), AugmentParams()
    timings = {name: [] for name in losses}

    def step(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = losses[name](models[name](x), y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - t0

    order = list(losses)
    for r in range(args.warmup + args.rounds):
        for name in order:
            for _ in range(args.steps):
                idx = torch.randint(0, len(images), (args.batch,), generator=gen)
                x, y = augment_batch(images[idx].float() / 255, masks[idx].float(), aug, gen)
                t = step(name, ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last),
                         y)
                if r >= args.warmup:
                    timings[name].append(t)
        order.reverse()
    med = {k: statistics.median(v) for k, v in timings.items()}
    base, empty = med["image_dice"], med["image_dice_empty"]
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "empty_term_ms_per_step": round((empty - base) * 1000, 1),
        "ratio": round(empty / base, 3),
        "n_steps_each": len(timings["image_dice"]),
    }
    print(f"step, median of {result['n_steps_each']}: image Dice {base * 1000:.1f} ms, "
          f"+ empty term {empty * 1000:.1f} ms ({result['ratio']}×)")
    save(args.name or f"loss_empty_{args.size}", result)


# ------------------------------------------------------------------------------------ stages


def _run_stage(repo: Path, *stage: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, *stage], cwd=repo, check=True, capture_output=True)
    return time.perf_counter() - t


def bench_data(args) -> None:
    """Wall time of the ingest and preprocess stage scripts, as dvc runs them, median of reps."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        raw = dataset(args.raw_dir, Path(tmp) / "raw").resolve()
        work = Path(tmp) / "work"
        (work / "data").mkdir(parents=True)
        (work / "metrics").mkdir()
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["raw_dir"] = str(raw)
        params["preprocess"]["size"] = args.size
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        rows = []
        for _ in range(args.reps):
            ti = _run_stage(work, str(REPO / "stages" / "ingest.py"))
            tp = _run_stage(work, str(REPO / "stages" / "preprocess.py"))
            rows.append((ti, tp))
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        load = statistics.median(_time_cache_load(work / "data" / "cache.npz")
                                 for _ in range(args.reps))
    ing = statistics.median(r[0] for r in rows)
    pre = statistics.median(r[1] for r in rows)
    save(args.name or "data", {
        "raw_dir": str(args.raw_dir or "demo (110 images, 400-600 px)"), "size": args.size,
        "ingest_s": round(ing, 2), "preprocess_s": round(pre, 2),
        "ingest_plus_preprocess_s": round(ing + pre, 2), "cache_load_s": round(load, 3),
        "reps": args.reps,
        "peak_rss_mb_of_any_stage": round(peak, 1)})


def _time_cache_load(path: Path) -> float:
    """Loading the cache and touching every image, as training starts."""
    from busiseg.data.cache import load_cache

    t = time.perf_counter()
    load_cache(path).images.float().mean()
    return time.perf_counter() - t


def bench_repro(args) -> None:
    """No-op `dvc repro` in this repo (run the pipeline once first)."""
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        times.append(time.perf_counter() - t)
        if "Running stage" in out:
            raise SystemExit("dvc repro was not a no-op: run it once first, then benchmark")
    save(args.name or "repro_noop", {"median_s": round(statistics.median(times), 3),
                                     "runs_s": [round(t, 3) for t in times]})


def bench_evaluate(args) -> None:
    """The evaluate stage on a trained run (`--run`, a folder holding params.yaml, data/ and
    models/; default this repository). With `--against CHECKOUT`, that checkout's evaluate and
    this one's alternate round by round, each in its own copy of the run, and the two must
    write identical metrics and per-image tables."""
    run = Path(args.run).resolve() if args.run else REPO
    sides = {"this": REPO, **({"against": Path(args.against).resolve()} if args.against else {})}
    with tempfile.TemporaryDirectory() as tmp:
        work = {name: _evaluate_copy(run, Path(tmp) / name) for name in sides}
        env = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "ONEDNN_MAX_CPU_ISA": "AVX2"}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.reps):
            for name, checkout in sides.items():
                t = time.perf_counter()
                subprocess.run([sys.executable, str(checkout / "stages" / "evaluate.py")],
                               cwd=work[name], check=True, capture_output=True,
                               env={**os.environ, **env, "PYTHONPATH": str(checkout / "src")})
                times[name].append(time.perf_counter() - t)
        tables = [f"plots/evaluate/{f}" for f in (
            "per_image.csv", "cv_per_image.csv", "threshold.csv", "reliability.csv")]
        identical = (all((work["this"] / f).read_bytes() == (work["against"] / f).read_bytes()
                         for f in tables) and _figures(work["this"]) == _figures(work["against"])
                     if args.against else None)
    medians = {name: round(statistics.median(t), 2) for name, t in times.items()}
    save(args.name or "evaluate", {
        "run": str(run), "env": env, "median_s": medians["this"],
        "runs_s": [round(t, 2) for t in times["this"]],
        **({"against": str(sides["against"]), "against_median_s": medians["against"],
            "against_runs_s": [round(t, 2) for t in times["against"]],
            "speedup": round(medians["against"] / medians["this"], 3),
            "outputs_identical": identical} if args.against else {})})


def bench_members(args) -> None:
    """What evaluate spends scoring a fold ensemble's members on test: the ensemble's pass and
    then each member run again (how evaluate did it), against one pass that keeps the members'
    outputs (Loaded.predict_with_members); alternating round by round in one process, on a
    trained run's test split, with the outputs compared bit for bit."""
    from busiseg.evaluation.evaluate import load, subset
    from busiseg.params import load_params

    run = Path(args.run).resolve() if args.run else REPO
    m = load(load_params(run / "params.yaml"), run / "models" / "model.pt",
             run / "data" / "cache.npz", run / "data" / "split.csv")
    if not m.members:
        raise SystemExit(f"{run}: not a cross-validation run (no fold members)")
    idx, tta = subset(m.cache, m.split, "test")[0], True

    def twice():
        return m.predict(m.model, idx, tta), [m.predict(k, idx, tta) for k in m.members]

    def once():
        return m.predict_with_members(idx, tta)

    times: dict[str, list[float]] = {"ensemble then members": [], "one pass": []}
    results = {}
    for _ in range(args.reps):
        for name, how in (("ensemble then members", twice), ("one pass", once)):
            t = time.perf_counter()
            results[name] = how()
            times[name].append(time.perf_counter() - t)
    (a, a_members), (b, b_members) = results.values()
    identical = all(np.array_equal(x, y) for pair in [(a, b), *zip(a_members, b_members)]
                    for x, y in zip(*pair))
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    save(args.name or "evaluate_members", {
        "run": str(run), "test_images": len(idx), "members": len(m.members), "tta": tta,
        "threads": torch.get_num_threads(), "median_s": medians,
        "runs_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "speedup": round(medians["ensemble then members"] / medians["one pass"], 3),
        "outputs_identical": identical})


def _figures(work: Path) -> dict:
    """metrics/eval.json's figures, timings aside (the keys' order is no figure)."""
    return {k: v for k, v in json.loads((work / "metrics" / "eval.json").read_text()).items()
            if k not in ("seconds", "images_per_s")}


def _evaluate_copy(run: Path, dest: Path) -> Path:
    """What evaluate reads, linked from `run` (params.yaml copied), in a folder of its own."""
    (dest / "data").mkdir(parents=True)
    (dest / "models").mkdir()
    for f in ("data/cache.npz", "data/split.csv", "data/manifest.csv", "models/model.pt"):
        (dest / f).symlink_to(run / f)
    if (run / "models" / "classifier.pt").is_file():
        (dest / "models" / "classifier.pt").symlink_to(run / "models" / "classifier.pt")
    else:  # a run from before the classify stage: the mask model's own lesion score
        from busiseg.modeling.classifier import save_none

        save_none(dest / "models" / "classifier.pt")
    (dest / "params.yaml").write_bytes((run / "params.yaml").read_bytes())
    return dest


def bench_memory(args) -> None:
    """Peak RSS of a short train stage at the given size (a child process, so RSS is its own)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        raw = dataset(args.raw_dir, work / "raw").resolve()
        (work / "data").mkdir()
        (work / "metrics").mkdir()
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["raw_dir"] = str(raw)
        params["preprocess"]["size"] = args.size
        params["train"].update(epochs=1, batch_size=args.batch, progress="off")
        params["model"].update(base=args.base)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in ("ingest", "preprocess", "split"):
            _run_stage(work, str(REPO / "stages" / f"{stage}.py"))
        code = (f"import runpy, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                "sys.argv=['train.py']; "
                f"runpy.run_path({str(REPO / 'stages' / 'train.py')!r}, run_name='__main__'); "
                "from bench import peak_rss_kb; print('RSS', peak_rss_kb())")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, check=True,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
    rss = int(proc.stdout.strip().split("RSS")[-1]) / 1024
    save(args.name or f"memory_{args.size}", {"size": args.size, "base": args.base,
                                              "batch": args.batch, "peak_rss_mb": round(rss, 1),
                                              "one_epoch_stage_s": round(seconds, 1)})


def bench_predict(args) -> None:
    """Images/s through inference.probabilities, the path predict takes, with the same weights
    in PyTorch and in ONNX Runtime; the two alternate round by round in one process."""
    from busiseg.inference.onnx_model import export_onnx, load_onnx
    from busiseg.inference.segment import Feed, MaskSettings, probabilities
    from busiseg.modeling.model_file import weights_digest
    from busiseg.modeling.registry import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            torch.manual_seed(0)
            model = build_model(args.arch, base=args.base, depth=args.depth).eval()
            blob = {"preprocess": {"size": size, "input_mean": 0.5, "input_std": 0.25},
                    "model": model.config, "digest": weights_digest(model.state_dict())}
            path = Path(tmp) / f"m{size}.onnx"
            export_onnx(model, blob, MaskSettings(), path)
            onnx_forward, _ = load_onnx(path, threads=args.threads)
            images = torch.randint(0, 256, (args.images, 1, size, size), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
            paths = {"pytorch": model, "onnxruntime": onnx_forward}
            times: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(args.rounds + 1):  # round 0 warms up
                for name in (list(paths) if r % 2 else list(paths)[::-1]):
                    t = time.perf_counter()
                    probabilities(paths[name], images, Feed(0.5, 0.25, cpu, args.batch))
                    if r:
                        times[name].append(time.perf_counter() - t)
            row = {"size": size, "batch": args.batch, "images": args.images}
            for name, ts in times.items():
                row[f"{name}_images_per_s"] = round(args.images / statistics.median(ts), 1)
                row[f"{name}_runs_s"] = [round(t, 3) for t in ts]
            row["onnx_speedup"] = round(row["onnxruntime_images_per_s"]
                                        / row["pytorch_images_per_s"], 2)
            rows.append(row)
            print(f"{size}px: PyTorch {row['pytorch_images_per_s']} images/s, ONNX Runtime "
                  f"{row['onnxruntime_images_per_s']} images/s", flush=True)
    save(args.name or "predict", {"arch": args.arch, "base": args.base, "depth": args.depth,
                                  "rounds": args.rounds, "rows": rows})


MODELS = ["arch=unet,base=16", "arch=smp_unet,encoder=tu-tf_efficientnet_lite0"]


def _model_spec(spec: str) -> dict:
    """`arch=smp_unet,encoder=resnet18` -> build_model kwargs (ints where they look like ints)."""
    kw = dict(part.split("=", 1) for part in spec.split(","))
    return {k: int(v) if v.isdigit() else v for k, v in kw.items()}


def _train_step(model, opt, x, y, loss_fn) -> float:
    t = time.perf_counter()
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def bench_models(args) -> None:
    """Training step (forward, backward, AdamW) of each model on the same batches, the models
    alternating round by round in one process; then each model's peak RSS over a few steps in a
    process of its own, since RSS never shrinks within one."""
    from busiseg.modeling.registry import build_model
    from busiseg.training.losses import SegLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_rss_of:  # the child: a few steps, then report this process's peak
        size = args.sizes[0]
        model = build_model(**_model_spec(args.peak_rss_of)).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x, y = torch.randn(args.batch, 1, size, size), torch.rand(args.batch, 1, size, size)
        for _ in range(3):
            _train_step(model, opt, x, y.round(), SegLoss())
        print("RSS", peak_rss_kb())
        return
    rows = []
    for size in args.sizes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 1, size, size, generator=gen)
        y = (torch.rand(args.batch, 1, size, size, generator=gen) > 0.8).float()
        built = {}
        for spec in args.models:
            torch.manual_seed(0)
            model = build_model(**_model_spec(spec)).train()
            built[spec] = (model, torch.optim.AdamW(model.parameters(), 1e-3))
        times: dict[str, list[float]] = {spec: [] for spec in built}
        loss_fn = SegLoss()
        for r in range(args.rounds + 1):  # round 0 warms up
            for spec in (list(built) if r % 2 else list(built)[::-1]):
                ts = [_train_step(*built[spec], x, y, loss_fn) for _ in range(args.steps)]
                if r:
                    times[spec].extend(ts)
        for spec, (model, _) in built.items():
            code = [sys.executable, str(Path(__file__).resolve()), "models", "--sizes", str(size),
                    "--batch", str(args.batch), "--threads", str(args.threads),
                    "--peak-rss-of", spec]
            out = subprocess.run(code, check=True, capture_output=True, text=True).stdout
            row = {"model": spec, "size": size, "batch": args.batch,
                   "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                   "step_s": round(statistics.median(times[spec]), 4),
                   "steps_s": [round(t, 4) for t in times[spec]],
                   "peak_rss_mb": round(int(out.split("RSS")[-1]) / 1024, 1)}
            rows.append(row)
            print(f"{size}px {spec}: {row['params_m']} M params, step {row['step_s']} s "
                  f"(median of {len(times[spec])}), peak RSS {row['peak_rss_mb']} MB", flush=True)
    save(args.name or "models", {"batch": args.batch, "rounds": args.rounds, "rows": rows})


def bench_levers(args) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from levers import levers, print_table

    table = levers(args.rounds, args.steps, args.warmup, args.size, args.only)
    print_table(table)
    save(args.name or "levers_lite0_128", {"size": args.size, "batch": 8, "steps": args.steps,
                                           "rounds": args.rounds, "settings": table})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--raw-dir", default=None, help="BUSI-layout folder (default: demo)")
    common.add_argument("--name", default=None, help="result file name (bench/results/NAME.json)")
    common.add_argument("--reps", type=int, default=3)
    t = sub.add_parser("train", parents=[common])
    t.add_argument("--arch", default="unet")
    t.add_argument("--base", type=int, default=16)
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--steps", type=int, default=3, help="timed steps per path per round")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--warmup", type=int, default=2)
    t.set_defaults(func=bench_train)
    d = sub.add_parser("data", parents=[common])
    d.add_argument("--size", type=int, default=256)
    d.set_defaults(func=bench_data)
    sub.add_parser("repro", parents=[common]).set_defaults(func=bench_repro)
    ev = sub.add_parser("evaluate", parents=[common])
    ev.add_argument("--run", default=None, help="a trained run's folder (default: this repo)")
    ev.add_argument("--against", default=None, help="another checkout to alternate with")
    ev.set_defaults(func=bench_evaluate)
    mb = sub.add_parser("members", parents=[common])
    mb.add_argument("--run", default=None, help="a trained cross-validation run's folder")
    mb.set_defaults(func=bench_members)
    m = sub.add_parser("memory", parents=[common])
    m.add_argument("--size", type=int, default=256)
    m.add_argument("--base", type=int, default=16)
    m.add_argument("--batch", type=int, default=8)
    m.set_defaults(func=bench_memory)
    lo = sub.add_parser("loss", parents=[common])
    lo.add_argument("--size", type=int, default=128)
    lo.add_argument("--base", type=int, default=16)
    lo.add_argument("--batch", type=int, default=8)
    lo.add_argument("--empty-weight", type=float, default=1.0)
    lo.add_argument("--empty-topk", type=float, default=0.01)
    lo.add_argument("--threads", type=int, default=0)
    lo.add_argument("--steps", type=int, default=10, help="timed steps per loss per round")
    lo.add_argument("--rounds", type=int, default=6)
    lo.add_argument("--warmup", type=int, default=1)
    lo.set_defaults(func=bench_loss)
    pr = sub.add_parser("predict", parents=[common])
    pr.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    pr.add_argument("--arch", default="unet")
    pr.add_argument("--base", type=int, default=16)
    pr.add_argument("--depth", type=int, default=4)
    pr.add_argument("--batch", type=int, default=1, help="1: predict's one image at a time")
    pr.add_argument("--images", type=int, default=32)
    pr.add_argument("--rounds", type=int, default=5)
    pr.add_argument("--threads", type=int, default=0)
    pr.set_defaults(func=bench_predict)
    mo = sub.add_parser("models", parents=[common])
    mo.add_argument("--models", nargs="+", default=MODELS, help="build_model kwargs, k=v,k=v")
    mo.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    mo.add_argument("--batch", type=int, default=8)
    mo.add_argument("--threads", type=int, default=0)
    mo.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    mo.add_argument("--rounds", type=int, default=4)
    mo.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)
    mo.set_defaults(func=bench_models)
    lv = sub.add_parser("levers", parents=[common])
    lv.add_argument("--size", type=int, default=128)
    lv.add_argument("--steps", type=int, default=15, help="timed steps per process per round")
    lv.add_argument("--warmup", type=int, default=3)
    lv.add_argument("--rounds", type=int, default=3)
    lv.add_argument("--only", nargs="*", default=None, help="settings whose name contains one")
    lv.set_defaults(func=bench_levers)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
