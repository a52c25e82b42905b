"""Stage classify: the image classifier beside the mask model (classify.kind), its members
trained fold by fold on train's cache and split; with classify.kind none, a file that says so."""

from pathlib import Path

from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json

MODEL = Path("models/classifier.pt")
METRICS = Path("metrics/classify.json")


def main() -> None:
    p = load_params()
    remove_outputs(MODEL, METRICS)
    if p.classify.kind == "none":
        from busiseg.modeling.classifier import save_none

        save_none(MODEL)
        write_json(METRICS, {"kind": "none", "members": 0})
        print("classify: classify.kind none: no classifier (the mask model's lesion score)")
        return
    from busiseg.training.classify import train_classifier

    summary = train_classifier(p, "data/cache.npz", "data/split.csv", MODEL)
    write_json(METRICS, {"kind": p.classify.kind, **summary})
    print(f"classify: {summary['members']} member(s) in {summary['wall_seconds']} s -> {MODEL}")


if __name__ == "__main__":
    run(main)
