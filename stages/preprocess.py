"""Stage preprocess: resize images and union masks into one uint8 tensor cache."""

import time

from busiseg.data import read_manifest_rows
from busiseg.params import load_params
from busiseg.preprocess import preprocess
from busiseg.stage import remove_outputs, run

CACHE = "data/cache.npz"


def main() -> None:
    remove_outputs(CACHE)
    params = load_params()
    manifest = read_manifest_rows("data/manifest.csv")
    start = time.perf_counter()
    info = preprocess(manifest, params.data.raw_dir, params.preprocess.size, CACHE,
                      params.preprocess.workers)
    print(f"preprocess: {info['n_images']} images at {info['size']}x{info['size']} "
          f"in {time.perf_counter() - start:.1f}s -> {CACHE}")


if __name__ == "__main__":
    run(main)
