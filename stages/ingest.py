"""Stage ingest: pair every image with all its masks into data/manifest.csv, report problems."""

from busiseg.data.audit import AuditPolicy
from busiseg.data.ingest import IngestOptions, ingest, report_dict
from busiseg.data.manifest import write_manifest_rows
from busiseg.params import load_params
from busiseg.pipeline.stage import remove_outputs, run, write_json
from busiseg.runtime.progress import show_progress

MANIFEST = "data/manifest.csv"
REPORT = "data/ingest_report.json"
METRICS = "metrics/ingest.json"


def main() -> None:
    remove_outputs(MANIFEST, REPORT, METRICS)
    params = load_params()
    p, channels = params.data, params.preprocess.channels
    audit = AuditPolicy(p.label_mismatch, p.cross_class_duplicates, p.burned_marks)
    result = ingest(p.raw_dir, IngestOptions(p.on_problem, p.near_dup_hamming, p.workers, audit,
                                             layout=p, channels=channels,
                                             progress=show_progress(p.progress)))
    write_manifest_rows(MANIFEST, result.rows)
    write_json(REPORT, report_dict(result, p.raw_dir))
    write_json(METRICS, result.metrics)
    m = result.metrics
    classes = ", ".join(f"{v} {k.removeprefix('n_images_')}" for k, v in m.items()
                        if k.startswith("n_images_") and k != "n_images_in_duplicate_groups")
    print(f"ingest: {m['n_images']} images ({classes}), {m['n_masks']} masks, "
          f"{m['n_duplicate_groups']} duplicate groups")
    marks = (f"{m['audit_burned_marks']} with burned-in colour marks" if channels == 1 else
             "colour-mark audit off (preprocess.channels 3: colour is signal)")
    print(f"audit: {m['audit_label_mismatch']} label mismatches, "
          f"{m['audit_cross_class_duplicates']} images duplicated across classes, {marks}, "
          f"{m['audit_converted_images']} images converted, {m['audit_binarised_masks']} masks "
          f"binarised, {m['audit_open_outlines']} outlines closed along the frame; "
          f"{m['audit_skipped']} skipped (each named in {REPORT})")
    for problem in result.problems:
        print(f"skipped: {problem.message}")


if __name__ == "__main__":
    run(main)
