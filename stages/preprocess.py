"""Stage preprocess: resize images and union masks into one uint8 tensor cache."""

import sys
import time

from busiseg.data.cache import Reading, preprocess
from busiseg.data.manifest import read_manifest_rows
from busiseg.errors import BusisegError
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run
from busiseg.runtime.progress import show_progress

CACHE = "data/cache.npz"


def main() -> None:
    params = load_params()
    # dvc.yaml passes --size only for DVC's run cache (see there); params.yaml is the source
    if sys.argv[1:] not in ([], ["--size", str(params.preprocess.size)]):
        raise BusisegError(f"stages/preprocess.py got {' '.join(sys.argv[1:])!r} but params.yaml "
                           f"has preprocess.size {params.preprocess.size}; run `dvc repro`")
    remove_outputs(CACHE)
    manifest = read_manifest_rows("data/manifest.csv")
    start = time.perf_counter()
    reading = Reading.from_params(params)
    info = preprocess(manifest, params.data.raw_dir, params.preprocess.size, CACHE, reading,
                      params.preprocess.workers, show_progress(params.data.progress))
    print(f"preprocess: {info['n_images']} images at {info['size']}x{info['size']} "
          f"in {time.perf_counter() - start:.1f}s -> {CACHE}")


if __name__ == "__main__":
    run(main)
