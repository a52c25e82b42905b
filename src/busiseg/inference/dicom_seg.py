"""A predicted lesion mask as a DICOM Segmentation (SEG), so a PACS or viewer can store it beside
the ultrasound image it came from and overlay it there, with the model that drew it on record.

highdicom builds the SEG. Ultrasound images rarely carry the spatial attributes highdicom indexes
multi-frame segmentations by (Frame of Reference, per-frame plane positions), so for those the
geometry is made up in memory: see `_reference_image`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from busiseg.errors import BusisegError, first_line
from busiseg.files import atomic_path

# a derived series: numbered high so that it sorts after the scanner's own series
SERIES_NUMBER = 901
SERIES_DESCRIPTION = "busiseg lesion mask"
# type 2 attributes highdicom copies from the source: present, even if empty, in a valid SEG
_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
# retired ultrasound SOP classes (1990s files), which highdicom has no IOD tables for
_SUCCESSOR = {
    "1.2.840.10008.5.1.4.1.1.6": UltrasoundImageStorage,
    "1.2.840.10008.5.1.4.1.1.3": UltrasoundMultiFrameImageStorage,
}


def write_dicom_seg(
    source: Path, masks: dict[int, np.ndarray], out: Path, *, model_digest: str, version: str
) -> Path:
    """Write a BINARY SEG with one segment, "lesion", for the frames of `source` in `masks`.

    `masks` maps 0-based frame indices to boolean Rows×Columns masks. Only the frames given are
    written, each referencing its source frame (ReferencedFrameNumber); an empty mask is written
    too, because "no lesion found" is an answer, while a frame left out is not claimed lesion-free:
    it has no SEG frame, and the SEG's Source Image Sequence lists only the frames segmented.

    The source file is never changed: a multi-frame image without per-frame geometry (every
    ultrasound cine loop) gets, on an in-memory copy of its header, a new Frame of Reference UID
    and a nominal pixel grid (1 mm spacing, frame k at z = k), which highdicom needs to index
    frames and which the SEG therefore carries; the SEG points at its source frames by number, so
    these positions relate it to nothing else. On that copy too, a file with several frames under
    a single-frame SOP class, or one under a retired SOP class, stands in as its current
    multi-frame/single-frame class (the SEG still names the true one), and patient/study
    attributes the file lacks are added empty.
    """
    source, out = Path(source), Path(out)
    if not model_digest or not version:
        raise BusisegError(f"{source}: a DICOM SEG needs the model's digest and version")
    image = _read_header(source)
    frames = int(image.get("NumberOfFrames") or 1)
    stack, wanted = _mask_stack(source, image, masks, frames)
    reference = _reference_image(image, frames)
    try:
        seg = hd.seg.Segmentation(
            source_images=[reference],
            pixel_array=stack,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_lesion_segment(model_digest, version)],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="busiseg",
            manufacturer_model_name="busiseg",
            software_versions=version,
            device_serial_number=model_digest[:16],  # the model is the device it names
            series_description=SERIES_DESCRIPTION,
            content_label="LESION",
            content_description=SERIES_DESCRIPTION,
            plane_positions=_plane_positions(reference, wanted) if frames > 1 else None,
            omit_empty_frames=False,
        )
        _name_sop_class(seg, reference.SOPClassUID, image.SOPClassUID)
        if len(wanted) < frames:
            _limit_reference(seg, wanted)
        with atomic_path(out) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError, ...
        reason = first_line(exc)
        if isinstance(exc, KeyError):  # its message is the bare key
            reason = f"no {reason} in the source or highdicom's tables"
        raise BusisegError(f"{source}: cannot write a DICOM SEG: {reason}") from exc
    return out


def _read_header(source: Path) -> Dataset:
    """The header alone: the SEG needs the source's identity and size, never its pixels, so
    a compressed source needs no decoder here."""
    try:
        return pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:
        raise BusisegError(f"{source}: not a readable DICOM file: {first_line(exc)}") from exc


def _mask_stack(
    source: Path, image: Dataset, masks: dict[int, np.ndarray], frames: int
) -> tuple[np.ndarray, list[int]]:
    """Checked here, not in highdicom, so that a wrong frame index or size is named in terms
    of the caller's own arguments."""
    if not masks:
        raise BusisegError(f"{source}: no frame masks given; predict at least one frame")
    for index in masks:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise BusisegError(f"{source}: frame index {index!r} is not an integer (0-based)")
        if not 0 <= index < frames:
            raise BusisegError(
                f"{source}: frame index {index} is outside the image's {frames} frame(s) (0-based)"
            )
    wanted = sorted(int(i) for i in masks)
    shape = (int(image.Rows), int(image.Columns))
    stack = []
    for index in wanted:
        mask = np.asarray(masks[index])
        if mask.shape != shape:
            raise BusisegError(
                f"{source}: mask of frame {index} is {mask.shape}, the image {shape} (rows, cols)"
            )
        if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
            raise BusisegError(f"{source}: mask of frame {index} is not binary (0/1 or bool)")
        stack.append(mask.astype(bool))
    return np.stack(stack), wanted


def _reference_image(image: Dataset, frames: int) -> Dataset:
    """The header as highdicom must see it. highdicom indexes a multi-frame SEG by plane
    position and refuses a multi-frame source without a Frame of Reference; it reads frames only
    from a multi-frame SOP class and knows no retired one; and it reads the patient/study
    attributes unconditionally."""
    reference = copy.deepcopy(image)  # Dataset.copy() is shallow: it would edit `image` too
    reference.SOPClassUID = _SUCCESSOR.get(reference.SOPClassUID, reference.SOPClassUID)
    for keyword in _PATIENT_STUDY:
        if keyword not in reference:
            setattr(reference, keyword, "")
    # ACR-NEMA times (HH:MM:SS), found in old ultrasound archives, are not DICOM TM values
    reference.StudyTime = str(reference.StudyTime or "").replace(":", "")
    if frames > 1 and "PerFrameFunctionalGroupsSequence" not in reference:
        reference.SOPClassUID = UltrasoundMultiFrameImageStorage
        _add_pixel_grid(reference, frames)
    return reference


def _add_pixel_grid(reference: Dataset, frames: int) -> None:
    """A nominal geometry, in a Frame of Reference of its own so it is never mistaken for the
    scanner's: rows along y, columns along x, 1 mm a pixel, frame k at z = k."""
    reference.FrameOfReferenceUID = hd.UID()
    reference.PositionReferenceIndicator = ""
    shared = Dataset()
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence("PATIENT", [1, 0, 0, 0, 1, 0])
    shared.PixelMeasuresSequence = hd.PixelMeasuresSequence([1.0, 1.0], 1.0, 1.0)
    reference.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(frames):
        item = Dataset()
        item.PlanePositionSequence = hd.PlanePositionSequence("PATIENT", [0.0, 0.0, float(k)])
        per_frame.append(item)
    reference.PerFrameFunctionalGroupsSequence = per_frame


def _plane_positions(reference: Dataset, wanted: list[int]) -> list[hd.PlanePositionSequence]:
    """Positions of the predicted frames only: highdicom matches them to source frames and
    writes each frame's ReferencedFrameNumber, which is how a subset of frames is referenced."""
    positions = hd.utils.get_plane_positions_of_image(reference)
    return [positions[index] for index in wanted]


def _limit_reference(seg: Dataset, wanted: list[int]) -> None:
    """Name the segmented frames in the SEG's Source Image Sequence too (Referenced Frame Number,
    required there when a reference does not apply to all frames), so that the SEG itself records
    that it says nothing about the frames left out. The item is copied because highdicom shares
    it with the Referenced Instance Sequence, whose items carry no frame numbers."""
    item = copy.deepcopy(seg.SourceImageSequence[0])
    item.ReferencedFrameNumber = [index + 1 for index in wanted]
    seg.SourceImageSequence = [item]


def _lesion_segment(model_digest: str, version: str) -> hd.seg.SegmentDescription:
    """Coded so that a receiving system knows what the segment is and which model drew it."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name="busiseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters={"model_sha256": model_digest},
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _name_sop_class(seg: Dataset, stand_in: str, actual: str) -> None:
    """Undo the stand-in SOP class in the SEG's references: they must name the class of the
    object actually stored, or a receiver cannot retrieve it."""
    if stand_in == actual:
        return
    for element in seg.iterall():
        if element.keyword == "ReferencedSOPClassUID" and element.value == stand_in:
            element.value = actual
