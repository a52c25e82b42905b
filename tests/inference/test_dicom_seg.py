"""A lesion mask written as a DICOM SEG reads back, frame for frame, referencing its source."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.seg import segread
from pydicom.data import get_testdata_file

from busiseg.errors import BusisegError
from busiseg.inference.dicom_seg import write_dicom_seg

# examples_ybr_color.dcm's patient name "PLA" has one component, which highdicom warns about
pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

DIGEST = "0123456789abcdef" * 4
VERSION = "0.1.0"


def pydicom_data(name: str) -> Path:
    """A file of the pydicom-data package, which the tests skip without (no download)."""
    data_store = pytest.importorskip("data_store")
    return Path(data_store.__file__).parent / "data" / name


def bundled(name: str) -> Path:
    """A file shipped inside pydicom itself; download=False keeps the tests offline."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not among pydicom's test files")
    return Path(path)


SOURCES = {
    "US1_UNCR.dcm": pydicom_data,  # RGB, one frame
    "OBXXXX1A.dcm": pydicom_data,  # palette colour, one frame
    "OBXXXX1A_2frame.dcm": pydicom_data,  # two frames under the single-frame US SOP class
    "examples_ybr_color.dcm": bundled,  # YBR_FULL_422 JPEG baseline, 30 frames
}


def source_file(name: str) -> Path:
    return SOURCES[name](name)


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def ellipse(rows: int, cols: int, frame: int) -> np.ndarray:
    """A different lesion in every frame, so a frame written in the wrong place shows."""
    y, x = np.mgrid[:rows, :cols]
    cy, cx = rows * (0.3 + 0.01 * frame), cols * (0.4 + 0.005 * frame)
    return ((y - cy) / (rows / 6)) ** 2 + ((x - cx) / (cols / 5 + frame)) ** 2 < 1


def read_back(seg_path: Path, source: pydicom.Dataset, frames: list[int]) -> np.ndarray:
    """The SEG's mask of each of `frames` (0-based), looked up by source frame as a viewer would."""
    seg = segread(seg_path)
    if int(source.get("NumberOfFrames") or 1) > 1:
        numbers = [k + 1 for k in frames]
        pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, numbers)
    else:
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])
    return pixels[..., 0].astype(bool)


def referenced_frames(seg: pydicom.Dataset) -> list[int]:
    return sorted(
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    )


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_frame_round_trips_and_references_its_source(name: str, tmp_path: Path) -> None:
    path = source_file(name)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    source = header(path)
    frames = int(source.get("NumberOfFrames") or 1)
    masks = {k: ellipse(source.Rows, source.Columns, k) for k in range(frames)}

    out = write_dicom_seg(path, masks, tmp_path / "seg.dcm", model_digest=DIGEST, version=VERSION)

    assert out == tmp_path / "seg.dcm"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the source is untouched
    got = read_back(out, source, list(range(frames)))
    assert got.shape == (frames, source.Rows, source.Columns)
    for k in range(frames):
        assert np.array_equal(got[k], masks[k]), f"frame {k}"

    seg = segread(out)
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "busiseg lesion mask"
    assert (seg.Manufacturer, seg.SoftwareVersions, seg.InstanceNumber) == ("busiseg", VERSION, 1)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    for ref in (seg.SourceImageSequence[0], series.ReferencedInstanceSequence[0]):
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID  # the true class, never a stand-in
    assert "ReferencedFrameNumber" not in seg.SourceImageSequence[0]  # it covers every frame
    if frames > 1:
        assert referenced_frames(seg) == list(range(1, frames + 1))

    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "lesion"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("busiseg", VERSION)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert f"model_sha256={DIGEST}" in algorithm.AlgorithmParameters


def test_an_empty_mask_is_written_as_an_answer(tmp_path: Path) -> None:
    path = source_file("US1_UNCR.dcm")
    source = header(path)
    empty = {0: np.zeros((source.Rows, source.Columns), dtype=bool)}

    out = write_dicom_seg(path, empty, tmp_path / "seg.dcm", model_digest=DIGEST, version=VERSION)

    seg = segread(out)
    assert seg.NumberOfFrames == 1
    assert not read_back(out, source, [0]).any()


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "OBXXXX1A_2frame.dcm"])
def test_a_subset_of_frames_references_those_frames_only(name: str, tmp_path: Path) -> None:
    path = source_file(name)
    source = header(path)
    rows, cols = source.Rows, source.Columns
    chosen = [3, 7, 20] if source.NumberOfFrames > 3 else [1]
    masks = {k: ellipse(rows, cols, k) for k in chosen}
    masks[chosen[-1]] = np.zeros((rows, cols), dtype=bool)  # a predicted frame with no lesion

    out = write_dicom_seg(path, masks, tmp_path / "seg.dcm", model_digest=DIGEST, version=VERSION)

    seg = segread(out)
    numbers = [k + 1 for k in chosen]
    # one SEG frame per predicted frame, none for the others: those are not claimed empty
    assert seg.NumberOfFrames == len(chosen)
    assert referenced_frames(seg) == numbers
    assert [int(n) for n in np.atleast_1d(seg.SourceImageSequence[0].ReferencedFrameNumber)] == (
        numbers
    )
    got = read_back(out, source, chosen)
    for i, k in enumerate(chosen):
        assert np.array_equal(got[i], masks[k]), f"frame {k}"


def test_wrong_masks_are_refused_in_one_line(tmp_path: Path) -> None:
    path = source_file("OBXXXX1A_2frame.dcm")
    rows, cols = header(path).Rows, header(path).Columns
    good = np.zeros((rows, cols), dtype=bool)
    cases = {
        "outside the image's 2 frame": {2: good},
        "is (10, 10)": {0: np.zeros((10, 10), dtype=bool)},
        "not binary": {0: np.full((rows, cols), 0.7)},
        "no frame masks": {},
    }
    for expected, masks in cases.items():
        with pytest.raises(BusisegError, match=re.escape(expected)) as caught:
            write_dicom_seg(path, masks, tmp_path / "s.dcm", model_digest=DIGEST, version=VERSION)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "s.dcm").exists()


def test_a_highdicom_failure_names_the_source_in_one_line(tmp_path: Path) -> None:
    source = pydicom.dcmread(source_file("US1_UNCR.dcm"))
    del source.SeriesInstanceUID  # a SEG must name the series it derives from
    broken = tmp_path / "broken.dcm"
    source.save_as(broken)
    mask = np.zeros((source.Rows, source.Columns), dtype=bool)

    with pytest.raises(BusisegError, match="cannot write a DICOM SEG") as caught:
        write_dicom_seg(broken, {0: mask}, tmp_path / "s.dcm", model_digest=DIGEST, version=VERSION)

    assert str(broken) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "s.dcm").exists()
