"""The label audit and duplicate frames: doubts about readable cases that a file check cannot
see. A class that contradicts its mask, the same frame under two classes, colour marks burned
into a grey frame, and duplicate or near-duplicate frames (which the split keeps together).
Ingest applies the policy (data.label_mismatch, ...) to what is found here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from busiseg.data.classes import LESION_CLASSES


@dataclass
class Finding:
    """A label or content doubt about a readable case; the audit policy says what it costs."""

    case_id: str
    file: str
    # label_mismatch | cross_class_duplicate | burned_marks | converted | binarised | open_outline
    kind: str
    detail: str
    action: str = "kept"  # kept | skipped | masked


@dataclass
class AuditPolicy:
    label_mismatch: str = "warn"  # warn | skip | error
    cross_class_duplicates: str = "warn"
    burned_marks: str = "warn"  # also mask: keep the case, paint the marks over (data.py)


def dhash(gray: np.ndarray, side: int = 8) -> int:
    """Difference hash: robust to re-encoding, resizing and small intensity changes."""
    small = Image.fromarray(gray).resize((side + 1, side), Image.Resampling.BOX)
    a = np.asarray(small, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def components(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """The connected components of items 0..n-1 joined by `pairs`, each numbered by the first
    item it holds (so groups read in file order)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = (list(side) for side in zip(*pairs)) if pairs else ([], [])
    graph = coo_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n, n))
    labels = connected_components(graph, directed=False)[1] if n else []
    number: dict[int, int] = {}
    return [number.setdefault(int(label), len(number)) for label in labels]


def duplicate_groups(cases: list, max_hamming: int) -> tuple[list[int], list[dict]]:
    """Groups of exact (same pixels) and near (dHash distance ≤ max_hamming) duplicates."""
    n = len(cases)
    pairs: list[tuple[int, int]] = []
    by_pixels: dict[str, int] = {}
    for i, c in enumerate(cases):
        pairs.append((by_pixels.setdefault(c.pixel_sha256, i), i))
    dist = None
    if max_hamming >= 0 and n > 1:
        h = np.array([c.dhash for c in cases], dtype=np.uint64)
        x = (h[:, None] ^ h[None, :]).view(np.uint8).reshape(n, n, 8)
        dist = np.unpackbits(x, axis=2).sum(axis=2)
        ii, jj = np.nonzero(np.triu(dist <= max_hamming, k=1))
        pairs += zip(ii.tolist(), jj.tolist())
    group_ids = components(n, pairs)
    members: dict[int, list[int]] = defaultdict(list)
    for i, gid in enumerate(group_ids):
        members[gid].append(i)
    groups = []
    for gid, idx in sorted(members.items()):
        if len(idx) > 1:
            exact = len({cases[i].pixel_sha256 for i in idx}) == 1
            maxd = 0 if dist is None else int(dist[np.ix_(idx, idx)].max())
            groups.append({"group": gid, "kind": "exact" if exact else "near",
                           "max_hamming": maxd, "cases": [cases[i].case_id for i in idx],
                           "classes": sorted({cases[i].cls for i in idx})})
    return group_ids, groups


AUDIT_KINDS = {  # finding kind -> (metrics key, the AuditPolicy field that decides its fate)
    "label_mismatch": ("audit_label_mismatch", "label_mismatch"),
    "cross_class_duplicate": ("audit_cross_class_duplicates", "cross_class_duplicates"),
    "burned_marks": ("audit_burned_marks", "burned_marks"),
    "converted": ("audit_converted_images", None),
    "binarised": ("audit_binarised_masks", None),
    "open_outline": ("audit_open_outlines", None),  # closed along the image edge
    "mask_resampled": ("audit_resampled_masks", None),  # data.mask_resize: resample
    "no_pixel_size": ("audit_no_pixel_size", None),  # a DICOM that states no usable pixel size
}


def audit_cases(cases: list, groups: list[dict]) -> list[Finding]:
    """Label and content doubts about readable cases, in manifest order."""
    findings: list[Finding] = []
    by_id = {c.case_id: c for c in cases}
    cross_class = {}
    for g in groups:
        if len(g["classes"]) > 1:
            for cid in g["cases"]:
                others = ", ".join(f"{o} ({by_id[o].cls})" for o in g["cases"] if o != cid)
                cross_class[cid] = (f"{g['kind']} duplicate group spanning "
                                    f"{' and '.join(g['classes'])}: also {others}")
    for c in cases:
        findings += [Finding(c.case_id, n.file, n.kind, n.message) for n in c.notes]
        if c.cls in LESION_CLASSES and c.lesion_pixels == 0:
            findings.append(Finding(c.case_id, c.image, "label_mismatch",
                                    f"class {c.cls} but its masks mark no lesion"))
        elif c.cls not in LESION_CLASSES and c.lesion_pixels > 0:
            findings.append(Finding(c.case_id, c.image, "label_mismatch",
                                    f"class {c.cls} but its masks mark {c.lesion_pixels} "
                                    "lesion pixels"))
        if c.case_id in cross_class:
            findings.append(Finding(c.case_id, c.image, "cross_class_duplicate",
                                    cross_class[c.case_id]))
        if c.mark_pixels:
            findings.append(Finding(c.case_id, c.image, "burned_marks",
                                    f"{c.mark_pixels} coloured pixels burned into the grey image "
                                    "(calipers, arrows or text)"))
    return findings


def audit_counts(findings: list[Finding]) -> dict:
    """Cases per finding kind (masks for binarised), and cases the audit dropped."""
    counts = {}
    for kind, (key, _) in AUDIT_KINDS.items():
        hits = [f for f in findings if f.kind == kind]
        per_file = kind in ("binarised", "mask_resampled")
        counts[key] = len(hits) if per_file else len({f.case_id for f in hits})
    counts["audit_skipped"] = len({f.case_id for f in findings if f.action == "skipped"})
    return counts
