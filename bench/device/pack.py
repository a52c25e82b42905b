"""Pack a tensor cache small enough to travel: images row-differenced then xz (lossless)."""
import lzma
import sys

import numpy as np

src, dst = sys.argv[1:3]
d = np.load(src)
img = d["images"]
diff = img.copy()
diff[..., 1:] = img[..., 1:] - img[..., :-1]  # uint8 wraps: cumsum(uint8) restores it exactly
blob = lzma.compress(diff.tobytes(), preset=6)
np.savez_compressed(dst, images_xz=np.frombuffer(blob, np.uint8), shape=np.array(img.shape),
                    masks=d["masks"], case_ids=d["case_ids"], classes=d["classes"],
                    format=d["format"])
back = np.cumsum(np.frombuffer(lzma.decompress(blob), np.uint8).reshape(img.shape), axis=-1,
                 dtype=np.uint8)
assert np.array_equal(back, img)
print(dst, len(blob) / 1e6, "MB of images")
