"""DICOM ultrasound read wherever an image is read: every ultrasound file in pydicom's test data
(pydicom's own and the pydicom-data package) decodes, or is a named problem that names its
decoder; multi-frame files give one image per frame; the pixel size in mm comes from
PixelSpacing or the ultrasound regions, and is left out when they disagree; nothing that
identifies a patient reaches the manifest or the report."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ultrasound_dicoms, write_png

from busiseg.data import dicom
from busiseg.data.cache import Reading, preprocess
from busiseg.data.images import load_image, open_image, to_gray
from busiseg.data.ingest import IngestError, IngestOptions, ingest, report_dict
from busiseg.errors import BusisegError
from busiseg.params import LayoutParams

data_store = pytest.importorskip("data_store")
STORE = Path(data_store.__file__).parent / "data"
OWN = Path(pydicom.data.__file__).parent / "test_files"
UNDECODABLE = {"JPGLosslessP14SV1_1s_1f_8b.dcm": "pylibjpeg-libjpeg"}  # JPEG lossless, GPL
REGION_MM = 0.262287877  # OBXXXX1A's 2D region: PhysicalDeltaX/Y 0.0262… cm


def identifying(path: Path) -> list[str]:
    """The file's patient, study and institution values, to look for where they must not be."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    keys = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName",
            "ReferringPhysicianName", "AccessionNumber")
    return [str(ds.get(k)) for k in keys if len(str(ds.get(k) or "")) >= 4]


FILES = ultrasound_dicoms()


def test_the_test_data_holds_the_files_the_issue_names():
    names = {p.name for p in FILES}
    assert len(FILES) >= 20
    assert {"US1_J2KR.dcm", "OBXXXX1A_rle_2frame.dcm", "color3d_jpeg_baseline.dcm",
            "US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm", "examples_ybr_color.dcm"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_ultrasound_dicom_reads_or_names_its_decoder(path: Path):
    if path.name in UNDECODABLE:
        with pytest.raises(BusisegError) as err:
            open_image(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert UNDECODABLE[path.name] in message and "re-download" not in message
        return
    refs = dicom.frames(path)
    count = int(pydicom.dcmread(path, stop_before_pixels=True, force=True)
                .get("NumberOfFrames", 1) or 1)
    assert len(refs) == count
    for ref in (refs[0], refs[-1]):
        img = open_image(ref)
        assert img.mode in ("L", "RGB")
        gray, note = to_gray(img, ref)
        assert gray.dtype == np.uint8 and gray.ndim == 2 and note.startswith("DICOM ")
        assert load_image(ref, channels=3).shape == (*gray.shape, 3)


def test_pixels_are_the_decoded_frame_by_the_stated_rules():
    rgb = STORE / "US1_UNCR.dcm"  # an uncompressed RGB frame whose preamble is a TIFF header
    want = pydicom.dcmread(rgb).pixel_array
    assert np.array_equal(load_image(rgb, channels=3), want)
    frames = STORE / "OBXXXX1A_rle_2frame.dcm"  # palette colour, RLE, two frames
    ds = pydicom.dcmread(frames)
    from pydicom.pixels import apply_color_lut

    second = apply_color_lut(ds.pixel_array[1], ds)  # 16-bit colour table entries
    expected = np.clip(np.rint(second.astype(np.float64) * 255 / 65535), 0, 255)
    assert np.array_equal(load_image(dicom.frame_ref(frames, 2), channels=3), expected)
    assert not np.array_equal(load_image(dicom.frame_ref(frames, 1)),
                              load_image(dicom.frame_ref(frames, 2)))


def test_a_cine_loop_is_read_once_for_all_its_frames_and_its_pixel_size(tmp_path: Path,
                                                                          monkeypatch):
    """Predict reads each frame, then the pixel size: one read of the file with its pixels
    (after the header read that counts its frames), and a file changed on disk is read anew."""
    loop = tmp_path / "loop.dcm"
    shutil.copy(STORE / "OBXXXX1A_rle_2frame.dcm", loop)
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(k) or real(*a, **k))
    refs = dicom.frames(loop)
    images = [load_image(ref, channels=3) for ref in refs]
    sizes = [dicom.pixel_size_mm(ref)[0] for ref in refs]
    assert len(refs) == 2 and sizes == [(REGION_MM, REGION_MM)] * 2
    assert [r["stop_before_pixels"] for r in reads] == [True, False]
    assert not np.array_equal(images[0], images[1])
    ds = real(loop, force=True)
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = 0.05  # now 0.5 mm a column
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY = 0.05
    ds.save_as(loop)
    assert dicom.pixel_size_mm(refs[0])[0] == pytest.approx((0.5, 0.5))
    assert len(reads) == 3


def test_frames_are_named_and_selected(tmp_path: Path):
    loop = STORE / "color3d_jpeg_baseline.dcm"  # 120 frames
    refs = dicom.frames(loop)
    assert len(refs) == 120 and dicom.image_stem(refs[2]) == "color3d_jpeg_baseline_f003"
    assert dicom.image_stem(STORE / "US1_UNCR.dcm") == "US1_UNCR"
    assert [dicom.image_stem(r) for r in dicom.frames(loop, "first")] == [
        "color3d_jpeg_baseline_f001"]
    assert [dicom.split_ref(r)[1] for r in dicom.frames(loop, "middle")] == [60]
    assert [dicom.split_ref(r)[1] for r in dicom.frames(loop, "2, 7,500")] == [2, 7]
    with pytest.raises(BusisegError, match="data.frames 'two'"):
        dicom.frames(loop, "two")
    with pytest.raises(BusisegError, match="has 120 frames, not 121"):
        open_image(dicom.frame_ref(loop, 121))


def test_pixel_size_from_spacing_or_regions_and_none_when_they_disagree(tmp_path: Path):
    assert dicom.pixel_size_mm(STORE / "OBXXXX1A.dcm") == ((REGION_MM, REGION_MM),
                                                            "ultrasound region")
    size, why = dicom.pixel_size_mm(STORE / "US1_UNCR.dcm")
    assert size is None and "no PixelSpacing" in why
    # ALOKA's dual view: two 2D regions at one pixel size, and a third without units
    assert dicom.pixel_size_mm(STORE / "gdcm-US-ALOKA-16.dcm")[0] == (0.382653065, 0.382653065)
    ds = pydicom.dcmread(STORE / "OBXXXX1A.dcm")
    other = copy.deepcopy(ds.SequenceOfUltrasoundRegions[0])  # a second 2D view, deeper
    other.PhysicalDeltaX = other.PhysicalDeltaY = 0.05
    ds.SequenceOfUltrasoundRegions.append(other)
    ds.save_as(tmp_path / "two_depths.dcm")
    size, why = dicom.pixel_size_mm(tmp_path / "two_depths.dcm")
    assert size is None and "different pixel sizes" in why
    ds.PixelSpacing = [0.1, 0.2]
    ds.save_as(tmp_path / "spaced.dcm")
    assert dicom.pixel_size_mm(tmp_path / "spaced.dcm") == ((0.1, 0.2), "PixelSpacing")


def flat_set(root: Path) -> Path:
    """A flat layout of DICOM images with PNG masks: a two-frame loop (a mask per frame, one of
    them exported at half size), an RGB frame without a pixel size, a file without a suffix and
    one that needs a decoder this install lacks."""
    raw = root / "raw"
    raw.mkdir()
    for name in ("US1_UNCR.dcm", "OBXXXX1A_2frame.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"):
        shutil.copy(STORE / name, raw / name)
    shutil.copy(STORE / "OBXXXX1A.dcm", raw / "PACS0001")
    for name, (h, w) in {"US1_UNCR": (480, 640), "OBXXXX1A_2frame_f001": (600, 800),
                         "OBXXXX1A_2frame_f002": (300, 400), "PACS0001": (600, 800),
                         "JPGLosslessP14SV1_1s_1f_8b": (64, 64)}.items():
        m = np.zeros((h, w), np.uint8)
        m[h // 3: h // 2, w // 3: w // 2] = 255
        write_png(raw / f"{name}_mask.png", m)
    return raw


def test_a_dicom_dataset_ingests_with_pixel_sizes_and_no_identifying_data(tmp_path: Path):
    raw = flat_set(tmp_path)
    lay = LayoutParams(raw_dir=str(raw), layout="flat", classes="none", on_problem="skip",
                       mask_resize="resample")
    result = ingest(raw, IngestOptions("skip", layout=lay, workers=1))
    rows = {r["case_id"]: r for r in result.rows}
    assert set(rows) == {"OBXXXX1A_2frame_f001", "OBXXXX1A_2frame_f002", "US1_UNCR", "PACS0001"}
    assert rows["OBXXXX1A_2frame_f002"]["image"] == "OBXXXX1A_2frame.dcm#f002"
    assert rows["PACS0001"]["pixel_height_mm"] == REGION_MM
    assert rows["US1_UNCR"]["pixel_width_mm"] == ""
    assert [p.kind for p in result.problems] == ["bad_image"]
    assert "pylibjpeg-libjpeg" in result.problems[0].message
    kinds = {(f.case_id, f.kind) for f in result.findings}
    assert ("OBXXXX1A_2frame_f002", "mask_resampled") in kinds
    assert ("US1_UNCR", "no_pixel_size") in kinds
    assert result.metrics["audit_resampled_masks"] == 1
    assert result.metrics["audit_no_pixel_size"] == 1
    info = preprocess(result.rows, raw, 32, tmp_path / "c.npz", Reading(mask_resize=True), 1)
    assert info["n_images"] == 4 and info["mean_lesion_fraction"] > 0
    said = json.dumps([result.rows, report_dict(result, str(raw))], default=str)
    for name in ("US1_UNCR.dcm", "OBXXXX1A.dcm"):
        for value in identifying(STORE / name):
            assert value not in said, value


def test_a_mask_at_another_size_is_an_error_unless_resampled(tmp_path: Path):
    raw = flat_set(tmp_path)
    (raw / "JPGLosslessP14SV1_1s_1f_8b.dcm").unlink()
    (raw / "JPGLosslessP14SV1_1s_1f_8b_mask.png").unlink()
    lay = LayoutParams(raw_dir=str(raw), layout="flat", classes="none")
    with pytest.raises(IngestError) as err:
        ingest(raw, IngestOptions(layout=lay, workers=1))
    assert "mask is 400x300 but its image is 800x600" in str(err.value)
    assert "data.mask_resize: resample" in str(err.value)
    write_png(raw / "US1_UNCR_mask.png", np.full((480, 600), 255, np.uint8))  # 1.25 vs 1.333
    lay = LayoutParams(raw_dir=str(raw), layout="flat", classes="none", mask_resize="resample")
    with pytest.raises(IngestError) as err:
        ingest(raw, IngestOptions(layout=lay, workers=1))
    assert "another aspect ratio" in str(err.value) and "OBXXXX1A" not in str(err.value)
