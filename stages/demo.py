"""Stage demo: generate the synthetic, BUSI-layout dataset the default pipeline runs on."""

from dataclasses import asdict

from busiseg.data.demo import generate_demo
from busiseg.params import load_params
from busiseg.pipeline.stage import run

OUT_DIR = "data/demo"


def main() -> None:
    params = load_params().demo
    summary = generate_demo(OUT_DIR, **asdict(params))
    print(f"demo: wrote {summary['n_images']} images and {summary['n_masks']} masks "
          f"to {OUT_DIR}/Dataset_BUSI_with_GT")


if __name__ == "__main__":
    run(main)
