"""Stage package: the trained model with evaluate's chosen settings inside, and its model card
beside it (the DVC artifact busiseg-model): what `dvc artifacts get` hands a colleague predicts
the masks evaluate scored, with no workspace around it."""

import json
from pathlib import Path

from busiseg.evaluation.card import model_card
from busiseg.evaluation.choose import provenance
from busiseg.files import atomic_write_text
from busiseg.inference.segment import MaskSettings
from busiseg.modeling.classifier import read_classifier
from busiseg.modeling.model_file import PACKAGED_NAME, package_model
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run

OUT = Path("models/busiseg-model")
CLASSIFIER = Path("models/classifier.pt")
METRICS = {"ingest": Path("metrics/ingest.json"), "split": Path("metrics/split.json"),
           "train": Path("metrics/train.json"), "eval": Path("metrics/eval.json")}


def main() -> None:
    p = load_params()
    remove_outputs(OUT)
    OUT.mkdir(parents=True)
    metrics = {k: json.loads(path.read_text()) for k, path in METRICS.items()}
    ev = metrics["eval"]
    held_out = (f"out of fold, {ev['cv_n_lesion_images'] + ev['cv_n_normal_images']} images"
                if "cv_dice" in ev else "the validation split")
    chosen = MaskSettings.from_eval(METRICS["eval"])
    sources = provenance(p.evaluate, chosen, held_out)
    settings = chosen.as_dict()
    classifier = read_classifier(CLASSIFIER)
    if classifier["kind"] == "none":
        classifier = None
    else:  # the cut and calibration evaluate chose out of fold: the card, predict
        for key in ("malignant_threshold", "malignant_temperature"):
            classifier[key] = metrics["eval"].get(key)
    blob = package_model("models/model.pt", OUT / PACKAGED_NAME, settings, sources, classifier)
    atomic_write_text(OUT / "README.md", model_card(p, blob, metrics, sources))
    gate = chosen.presence_rule + (f" at {chosen.presence_threshold}"
                                   if chosen.presence_threshold is not None else "")
    print(f"package: {OUT / PACKAGED_NAME} (threshold {settings['threshold']}, presence gate "
          f"{gate}) and its model card {OUT / 'README.md'}")


if __name__ == "__main__":
    run(main)
