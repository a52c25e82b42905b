"""The model card: what a trained model is, what it was trained and scored on, how well it does
(every headline figure with its interval), which settings predict applies and why, how to make
it again, and what it must not be used for. Markdown with Hugging Face's model-card metadata
header, so model hubs and readers of `dvc artifacts get` see the same facts the metrics hold.

Every number is copied from the stage outputs (metrics/*.json), never recomputed, so the card
cannot disagree with `dvc metrics show`.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path

from busiseg import __version__
from busiseg.data.classes import ALL_CLASSES
from busiseg.params import DataParams, Params, override_value

BUSI_PAPER = ("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
              "Data in Brief 28 (2020) 104863. https://doi.org/10.1016/j.dib.2019.104863")

# (key in metrics/eval.json without its cv_ prefix, what it is); each with its interval if any
HEADLINE = (
    ("dice", "lesion Dice (per-image mean over images with a lesion)"),
    ("iou", "lesion IoU (per-image mean over images with a lesion)"),
    ("dice_all", "Dice over all images (normals: 1 if left empty, else 0)"),
    ("detect_sensitivity", "detection sensitivity (lesion images given a mask)"),
    ("detect_specificity", "detection specificity (normal images left empty)"),
    ("detect_auroc", "detection AUROC of the lesion score"),
    ("detect_specificity_at_sens95", "detection specificity at sensitivity ≥ 0.95 (the best cut "
     "on the lesion score)"),
    ("detect_ece", "calibration error of the lesion score (ECE)"),
    ("aurc", "area under the risk-coverage curve of the confidence (lower is better)"),
    ("hd95", "95 % Hausdorff distance (original pixels, lesion images)"),
    ("nsd", "normalised surface Dice (lesion images)"),
    ("long_axis_mae_px", "long-axis error, mean absolute (original pixels, lesion images)"),
    ("malignant_auroc", "malignancy AUROC of p_malignant (benign vs malignant lesions)"),
    ("malignant_sensitivity", "malignancy sensitivity at the cut chosen out of fold"),
    ("malignant_specificity", "malignancy specificity at the cut chosen out of fold"),
    ("malignant_ece", "calibration error of p_malignant (ECE)"),
)

LIMITATIONS_BUSI = (
    "BUSI comes from one hospital (Baheya Hospital, Cairo), one scanner family (LOGIQ E9 and E9 "
    "Agile) and one collection (2018, women aged 25 to 75): nothing here says how the model does "
    "on other hospitals, scanners or populations; score it on such data first (params.yaml "
    "`external:`).",
    "BUSI holds near-duplicate frames of one patient; they are kept on one side of every split "
    "(duplicate groups), so the figures are not inflated by them, but BUSI has no patient ids.",
    "Lesion Dice counts images with a lesion only. Dice over all images also scores the normal "
    "scans: an empty mask on a normal image counts 1, any mask on it 0, so it depends on how "
    "many normals the data hold (BUSI: 133 of 780 images).",
)

LIMITATIONS_OTHER = (
    "Trained and scored on one dataset: nothing here says how the model does on data from other "
    "hospitals, scanners or populations; score it on such data first (params.yaml "
    "`external:`).",
    "Lesion Dice counts images with a lesion only. Dice over all images also scores the normal "
    "images: an empty mask on one counts 1, any mask on it 0, so it depends on how many normals "
    "the data hold.",
)

LIMITATIONS_DEMO = (
    "These data are SYNTHETIC: busiseg's demo generator draws shapes in noise. The figures only "
    "show the pipeline runs; they say nothing about real ultrasound images.",
)

INTENDED_USE = (
    "Research and teaching only: segmenting breast lesions in ultrasound images to study "
    "methods. It is not a medical device, has no regulatory clearance, and must not be used to "
    "diagnose, screen or decide the care of any person.")
INTENDED_USE_MALIGNANCY = (
    "Its p_malignant reproduces the dataset's benign/malignant labels, for research on methods: "
    "it is never a diagnosis, and no decision about a person may rest on it.")


# the params sections the package stage declares in dvc.yaml (a test holds the two together):
# every one that changes the model or its scores, not plot's
SECTIONS = ("demo", "data", "preprocess", "split", "model", "train", "augment", "classify",
            "evaluate")


def is_demo(p: Params) -> bool:
    return p.data.raw_dir == DataParams().raw_dir


def is_busi(p: Params, ingest: dict) -> bool:
    """BUSI's own text (its hospital, scanner, paper) only for data that look like it: the busi
    layout, its three classes, its 780 images."""
    return (not is_demo(p) and p.data.layout == "busi" and ingest.get("n_images") == 780
            and all(ingest.get(f"n_images_{c}") for c in ("benign", "malignant", "normal")))


def reproduce_command(p: Params) -> str:
    """`dvc exp run` with every param that differs from busiseg's defaults (the committed
    params.yaml's), quoted for the shell and for DVC's override grammar; `dvc repro` when none
    differ. The data folder is the reader's own copy: a placeholder, not this machine's path."""
    args = []
    for section in SECTIONS:
        value, default = getattr(p, section), getattr(Params(), section)
        for key, v in asdict(value).items():
            if v != getattr(default, key):
                if (section, key) == ("data", "raw_dir"):
                    v = f"PATH/TO/{Path(v).name or 'DATA'}"
                args += ["-S", f"{section}.{key}="
                         + ("null" if v is None else override_value(v))]
    return shlex.join(["uv", "run", "dvc", "exp", "run", *args]) if args else "uv run dvc repro"


def _setting(value) -> str:
    """A setting as a reader says it: on/off, not Python's True/False/None."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)) and value:  # the expected-Dice curve's (x, y) knots
        return (f"{len(value)} knots: expected Dice {value[0][1]} at confidence {value[0][0]} "
                f"up to {value[-1][1]} at {value[-1][0]}")
    return "off" if value is None else str(value)


def _figure(m: dict, key: str) -> str:
    value = m.get(key)
    if value is None:
        return ""
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{value} [{low}, {high}]" if low is not None and high is not None else f"{value}"


def results_table(m: dict) -> list[str]:
    folds = "cv_dice" in m
    head = ["| figure | out of fold (95 % interval) | test (95 % interval) |",
            "| --- | --- | --- |"] if folds else ["| figure | test (95 % interval) |",
                                                  "| --- | --- |"]
    rows = []
    for key, what in HEADLINE:
        test, cv = _figure(m, key), _figure(m, f"cv_{key}") if folds else ""
        if test or cv:
            rows.append(f"| {what} | {cv or 'n/a'} | {test or 'n/a'} |" if folds
                        else f"| {what} | {test} |")
    return head + rows


def model_index(m: dict, name: str, dataset: str) -> list[str]:
    """Hugging Face's `model-index` block: the headline figures, machine-readable."""
    prefix = "cv_" if "cv_dice" in m else ""
    out = [f"- name: {name}", "  results:", "  - task:", "      type: image-segmentation",
           "    dataset:", f"      name: {dataset}", f"      type: {dataset.lower()}",
           "    metrics:"]
    for key, what in HEADLINE:
        if m.get(prefix + key) is not None:
            where = "out of fold" if prefix else "test"
            out += [f"    - type: {key}", f"      value: {m[prefix + key]}",
                    f"      name: {what.split(' (')[0]}, {where}"]
    return out


def training_machine(tr: dict) -> str:
    """What metrics/train.json says of where the model trained (older runs say less)."""
    parts = [f"{tr[k]} {what}" for k, what in (("processes", "process(es)"),
                                                ("threads", "thread(s)")) if tr.get(k)]
    parts += [f"{what} {tr[k]}" for k, what in (("kernel_isa", "kernels"), ("amp", "precision"))
              if tr.get(k)]
    seconds = tr.get("wall_seconds", tr.get("seconds"))
    return (f"{tr.get('device', 'cpu')}" + (f" ({', '.join(parts)})" if parts else "")
            + (f" in {seconds} s" if seconds is not None else ""))


def data_text(p: Params, ing: dict, busi: bool) -> str:
    classes = ", ".join(f"{ing[f'n_images_{c}']} {c}" for c in ALL_CLASSES
                        if ing.get(f"n_images_{c}"))
    where = ("Synthetic BUSI-layout demo images made by `busiseg.data.demo`" if is_demo(p) else
             f"BUSI ({BUSI_PAPER})" if busi else
             f"`{Path(p.data.raw_dir).name}` (`data.layout: {p.data.layout}`)")
    return (f"{where}: {ing.get('n_images')} images ({classes}), {ing.get('n_masks')} masks; "
            f"{ing.get('n_duplicate_groups', 0)} groups of duplicate frames "
            f"({ing.get('n_images_in_duplicate_groups', 0)} images), each kept in one split.")


def model_card(p: Params, blob: dict, metrics: dict, sources: dict) -> str:
    """`metrics`: the stage outputs by name (ingest, split, train, eval); `blob`: the packaged
    model file."""
    ev, tr, sp, ing = (metrics.get(k, {}) for k in ("eval", "train", "split", "ingest"))
    demo, busi = is_demo(p), is_busi(p, ing)
    dataset = "synthetic-demo" if demo else "BUSI" if busi else Path(p.data.raw_dir).name
    members = int(blob.get("members") or 0)
    name = f"busiseg-{blob['model']['arch']}" + (f"-{members}fold" if members else "")
    held = (f"{members}-fold cross-validation on the non-test images (out-of-fold figures: "
            "each image scored by the fold model that never trained on it; the ensemble on "
            "test)" if members else
            f"train {sp.get('n_train')} / val {sp.get('n_val')} / test {sp.get('n_test')}")
    limitations = LIMITATIONS_DEMO if demo else LIMITATIONS_BUSI if busi else LIMITATIONS_OTHER
    lines = [
        *front_matter(ev, name, dataset),
        f"# {name}",
        "",
        summary(blob),
        *section("Intended use", INTENDED_USE,
                 *(("", INTENDED_USE_MALIGNANCY) if "cv_malignant_auroc" in ev
                   or "malignant_auroc" in ev else ())),
        *section("Data", data_text(p, ing, busi)
                 + f" Split (seed {p.split.seed}): {held}; test: {sp.get('n_test')} images."),
        *section("Results", *results_table(ev), "",
                 f"Intervals: 95 % bootstrap over images ({p.evaluate.bootstrap} resamples). HD95 "
                 f"and NSD in pixels of the original images, NSD at a tolerance of "
                 f"{p.evaluate.surface_tolerance:g} pixels (docs/data.md). Nothing about the test "
                 "images was chosen on them."),
        *section("Settings predict applies", *settings_table(blob.get("settings", {}), sources)),
        *section("How it was made", f"Trained on {training_machine(tr)}, card written by busiseg "
                 f"{__version__}. Reproduce it from the busiseg repository at that version (bit "
                 "for bit on a CPU with the same kernels, `train.cpu_isa` or "
                 "`ONEDNN_MAX_CPU_ISA`: docs/reproducibility.md), with `data.raw_dir` your copy "
                 "of the data:", "", "```", reproduce_command(p), "```"),
        *section("Limitations", *(f"- {x}" for x in limitations)),
        *section("Citation", "busiseg (see CITATION.cff in its repository)"
                 + (f"; the data: {BUSI_PAPER}" if busi else "")),
        "",
    ]
    return "\n".join(lines)


def section(title: str, *body: str) -> list[str]:
    return ["", f"## {title}", "", *body]


def front_matter(ev: dict, name: str, dataset: str) -> list[str]:
    """The Hugging Face model-card header: licence, task, tags and the headline figures."""
    return ["---", "license: mit", "library_name: busiseg", "pipeline_tag: image-segmentation",
            "tags: [medical-imaging, ultrasound, breast-ultrasound, lesion-segmentation]",
            f"datasets: [{dataset}]", "model-index:", *model_index(ev, name, dataset), "---",
            ""]


def summary(blob: dict) -> str:
    arch, pre = blob["model"], blob["preprocess"]
    members = int(blob.get("members") or 0)
    what = (f"{arch['arch']}" + (f" on {arch['encoder']}" if "encoder" in arch else "")
            + (f", an ensemble of its {members} fold models" if members else ""))
    classifier = blob.get("classifier")
    if classifier:
        what += (f", beside an image classifier ({len(classifier['members'])} members of the "
                 f"{classifier['config']['encoder']} encoder) whose p_lesion is the lesion score"
                 + (" and whose p_malignant predict writes" if classifier.get("malignancy")
                    else ""))
    return (f"A lesion segmentation model for breast ultrasound: {what}, trained and scored by "
            "busiseg's DVC pipeline. Input: one "
            f"{'grey' if pre.get('channels', 1) == 1 else 'colour'} image of any size, resized "
            f"to {pre['size']}x{pre['size']}; output: a lesion mask at the image's size, a "
            "lesion score and a confidence. `model.pt` carries the weights and every setting "
            "below: `busiseg predict --model model.pt IMAGES --out DIR` gives the masks "
            "evaluate scored.")


def settings_table(settings: dict, sources: dict) -> list[str]:
    return ["| setting | value | where it came from |", "| --- | --- | --- |",
            *(f"| {k} | {_setting(settings[k])} | {sources[k]} |" for k in settings
              if k in sources)]
