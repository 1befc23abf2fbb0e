"""Derived-series writer: a processed `Volume` becomes a proper derived DICOM series.

One classic single-frame instance per slice (CT Image, MR Image, or Secondary Capture Storage after
the source modality), in the source's study, in a new series, with everything UID-like derived
deterministically: the same volume, pipeline and version give the same bytes; another pipeline,
version or label gives other UIDs.

What is kept from the source header (``volume.header``, the first slice's attributes): patient,
study, equipment, frame of reference, acquisition attributes, window, lossy-compression history.
What is removed, and why:
- private elements: the derived instance must not carry the source's private data;
- pixel data and everything describing stored values (rescale, smallest/largest value, Modality
  LUT, padding): they are recomputed. ``PixelPaddingValue`` is dropped rather than remapped: it names
  a *stored* value of the source's encoding, and after processing (smoothing across the field-of-view
  edge, a new slope/intercept) no stored value reliably means "padding" any more. Padded voxels keep
  whatever value the pipeline left there (e.g. -3024 HU) and simply display as air;
- multi-frame-only attributes (functional groups, NumberOfFrames, dimensions, concatenation): the
  output is always classic single-frame;
- per-slice values known for the first slice only (tube current and exposure, which vary per slice
  with dose modulation), the source's own references and derivation, creation stamps, counts of the
  source series (``ImagesInAcquisition``: a split volume has fewer), signatures, icon, overlays.

Rescale policy (`hu_rescale`): HU that fit int16 are stored signed with slope 1, intercept 0 (stored
value = HU, error <= 0.5 HU); HU spanning <= 65535 use slope 1 and an integer intercept (unsigned);
wider HU ranges and non-integer native units (MR) use slope = range / 65000 (unsigned); integer native
values that fit 16 bits are stored as they are (slope 1). Slope and intercept are chosen as values
their DS text represents exactly, so what a reader parses is what the writer quantised with.
Note: the classic MR Image IOD has no Rescale Slope/Intercept; they are written anyway (as most
vendors do) because float MR results cannot be stored without them.
"""

from __future__ import annotations

import collections
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage
from pydicom.valuerep import format_number_as_ds

from appliance import __version__
from appliance.fsutil import fsync_dir
from appliance.logging import get_logger
from appliance.volume import Volume

log = get_logger(__name__)

_SOP_CLASS_BY_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
_STORED_LEVELS = 65000.0  # of 65536: leaves a margin for DS rounding of slope and intercept
_MARGIN_LEVELS = 16

# Attributes recomputed for each derived instance, or wrong for it; see the module docstring.
_PIXEL_DATA = 0x7FE00010

_DROPPED = (
    # pixel data and stored-value description
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "PlanarConfiguration", "PixelAspectRatio",
    *(f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue") for p in ("Descriptor", "Data")),
    # multi-frame only
    "NumberOfFrames", "FrameIncrementPointer", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "DimensionOrganizationSequence", "DimensionIndexSequence",
    "DimensionOrganizationType", "ConcatenationUID", "SOPInstanceUIDOfConcatenationSource",
    "InConcatenationNumber", "InConcatenationTotalNumber", "ConcatenationFrameOffsetNumber",
    "RepresentativeFrameNumber", "StereoPairsPresent", "PresentationLUTShape", "PixelPresentation",
    "VolumetricProperties", "VolumeBasedCalculationTechnique", "ContentQualification",
    # per-slice values the header knows for its first slice only
    "XRayTubeCurrent", "XRayTubeCurrentInuA", "Exposure", "ExposureInuAs", "ExposureInmAs",
    # the source's own identity, references and history
    "SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID",
    "InstanceCoercionDateTime", "SourceImageSequence", "SourceInstanceSequence", "DerivationCodeSequence",
    "DerivationDescription", "ReferencedSeriesSequence", "StudiesContainingOtherReferencedInstancesSequence",
    "ImagesInAcquisition", "NumberOfSeriesRelatedInstances", "NumberOfStudyRelatedInstances",
    "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence",
    "OriginalAttributesSequence", "IconImageSequence", "DataSetTrailingPadding",
)

# Enhanced (multi-frame) sources keep some classic attributes in functional groups:
# (classic keyword, functional-group sequence, keyword inside it).
_LIFTED = (
    ("SliceThickness", "PixelMeasuresSequence", "SliceThickness"),
    ("WindowCenter", "FrameVOILUTSequence", "WindowCenter"),
    ("WindowWidth", "FrameVOILUTSequence", "WindowWidth"),
    ("KVP", "CTXRayDetailsSequence", "KVP"),
    ("EchoTime", "MREchoSequence", "EffectiveEchoTime"),
    ("RepetitionTime", "MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    ("FlipAngle", "MRTimingAndRelatedParametersSequence", "FlipAngle"),
    ("EchoTrainLength", "MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
)

# Type 2 attributes (present, may be empty) of the modules every output IOD includes.
_TYPE2_COMMON = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "PositionReferenceIndicator",
)
_TYPE2_BY_SOP_CLASS = {CTImageStorage: ("KVP", "AcquisitionNumber"), SecondaryCaptureImageStorage: (),
                       MRImageStorage: ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength")}


class DeriveError(Exception):
    """A volume that cannot become a derived series; ``reason`` is coded, ``detail`` for a field engineer."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _uid(uid_root: str, *fields: object) -> str:
    # generate_uid concatenates its entropy sources without a separator ("ab"+"c" == "a"+"bc"):
    # one JSON list keeps the fields apart.
    return str(generate_uid(prefix=uid_root, entropy_srcs=[json.dumps([str(f) for f in fields])]))


def derived_series_uid(source_series_uid: str, label: str, pipeline: str, version: str, uid_root: str) -> str:
    """SeriesInstanceUID of the series derived from ``source_series_uid`` (its part ``label``) by
    ``pipeline`` at ``version``: deterministic, distinct for any other of the four inputs."""
    return _uid(uid_root, "appliance.derived-series", source_series_uid, label, pipeline, version)


def _ds(value: float) -> str:
    """A number as DICOM DS text (at most 16 characters)."""
    return format_number_as_ds(float(value) + 0.0)  # + 0.0: no "-0.0"


def _ds_exact(value: float) -> float:
    """The float a reader parses from the DS text of ``value``."""
    return float(_ds(value))


def _finite_range(voxels: np.ndarray) -> tuple[float, float]:
    if voxels.size == 0:
        raise DeriveError("empty_volume", "the volume holds no voxels")
    lo, hi = float(np.min(voxels)), float(np.max(voxels))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DeriveError("non_finite_voxels", "the volume holds NaN or infinite values")
    return lo, hi


def _all_integral(voxels: np.ndarray, chunk: int = 1 << 22) -> bool:
    flat = np.ravel(voxels)
    return all(np.array_equal(c, np.rint(c)) for c in (flat[i : i + chunk] for i in range(0, flat.size, chunk)))


def hu_rescale(voxels: np.ndarray, units: str) -> tuple[float, float, bool]:
    """(slope, intercept, signed) so that stored = round((v - intercept) / slope) fits 16 bits
    (int16 when ``signed``, else uint16) and every v round-trips within slope / 2.

    ``voxels`` in ``units`` ("HU" for CT; any other string means the modality's native units).
    Slope and intercept are exactly representable as DS text. See the module docstring for the policy.
    """
    lo, hi = _finite_range(voxels)
    if units == "HU" and np.rint(lo) >= -32768 and np.rint(hi) <= 32767:
        return 1.0, 0.0, True
    if units == "HU" and np.floor(lo) + 65535 >= np.rint(hi):
        return 1.0, float(np.floor(lo)), False
    if units != "HU" and _all_integral(voxels):
        if lo >= 0 and hi <= 65535:
            return 1.0, 0.0, False
        if lo >= -32768 and hi <= 32767:
            return 1.0, 0.0, True
    if hi == lo:
        return 1.0, _ds_exact(lo), False
    # Intercept a little below the minimum (DS rounding must not put it above), then the slope
    # rounded up so the maximum lands near level 65000 + margin, well inside 65535.
    intercept = _ds_exact(lo - _MARGIN_LEVELS * (hi - lo) / _STORED_LEVELS - abs(lo) * 1e-9)
    slope = _ds_exact((hi - intercept) / (_STORED_LEVELS + _MARGIN_LEVELS) * (1 + 1e-9))
    return slope, intercept, False


def _stored(slice_values: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    lo, hi, dtype = (-32768, 32767, "<i2") if signed else (0, 65535, "<u2")
    stored = np.rint((slice_values.astype(np.float64) - intercept) / slope)
    return np.clip(stored, lo, hi).astype(dtype)


def _functional_group_value(header: Dataset, frame_number: int | None, sequence: str, keyword: str):
    """An attribute of an enhanced source's functional groups: the frame's own group wins."""
    groups = []
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame_number and frame_number <= len(per_frame):
        groups.append(per_frame[frame_number - 1])
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0] and items[0][keyword].value not in (None, ""):
            return copy.deepcopy(items[0][keyword].value)
    return None


def _classic_mr_sequence(header: Dataset) -> tuple[list[str], list[str]]:
    """ScanningSequence and SequenceVariant (Type 1 in the classic MR Image module) from an
    enhanced MR source's pulse-sequence attributes."""
    echo = str(header.get("EchoPulseSequence", ""))
    scanning = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(echo, ["RM"])
    if str(header.get("InversionRecovery", "")) == "YES":
        scanning.append("IR")
    if str(header.get("EchoPlanarPulseSequence", "")) == "YES":
        scanning.append("EP")
    variant = ["SS"] if str(header.get("SteadyStatePulseSequence", "NONE")) != "NONE" else ["NONE"]
    return scanning, variant


def _is_sequence(raw) -> bool:
    if raw.VR is not None:
        return raw.VR == "SQ"
    try:  # Implicit VR: the dictionary says
        return dictionary_VR(raw.tag) == "SQ"
    except KeyError:
        return False


def _base_dataset(volume: Volume, sop_class: str) -> Dataset:
    """The source header made into the shared part of every derived instance."""
    header = volume.header if volume.header is not None else Dataset()
    frame = volume.source.frame_numbers[0] if volume.source.frame_numbers else None
    lifted = {kw: _functional_group_value(header, frame, seq, inner) for kw, seq, inner in _LIFTED if kw not in header}
    mr_sequence = _classic_mr_sequence(header) if sop_class == MRImageStorage else None
    ds = Dataset()
    if header.original_encoding == (False, True):
        # The source's elements not decoded yet are copied as the bytes they are and written back
        # as such (the derived file is Explicit VR Little Endian too): no decode and re-encode of
        # ~100 elements per instance. Any other source encoding is decoded and re-encoded.
        ds.set_original_encoding(False, True, header.original_character_set)
    for tag in header.keys():  # a fresh copy: the assembler's header is shared and must not change
        if tag.is_private or tag.group == 0x0002 or tag.element == 0 or (tag.group & 0xFF00) in (0x5000, 0x6000):
            continue  # private data, file meta, group lengths, curves and overlays of the first slice
        elem = header.get_item(tag)
        if elem.is_raw and not _is_sequence(elem):  # immutable bytes: shared, never changed
            ds[tag] = elem
            continue
        elem = header[tag]
        if elem.VR == "SQ":  # decoded, copied deep, and without the private data inside
            elem = copy.deepcopy(elem)
            for item in elem.value:
                item.remove_private_tags()
            ds.add(elem)
        else:  # values are replaced here, never changed in place: a shallow copy will do
            ds.add(copy.copy(elem))
    for keyword in _DROPPED:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in lifted.items():
        if value is not None:
            setattr(ds, keyword, value)
    if mr_sequence is not None:
        if "ScanningSequence" not in ds:
            ds.ScanningSequence = mr_sequence[0]
        if "SequenceVariant" not in ds:
            ds.SequenceVariant = mr_sequence[1]
    if sop_class == SecondaryCaptureImageStorage and "ConversionType" not in ds:
        ds.ConversionType = "WSD"  # workstation: made from other images
    for keyword in (*_TYPE2_COMMON, *_TYPE2_BY_SOP_CLASS[sop_class]):
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _series_attributes(ds: Dataset, volume: Volume, pipeline: str, version: str, uid_root: str,
                       series_number_offset: int) -> None:
    src = volume.source
    source_type = ds.get("ImageType") or []
    source_type = [source_type] if isinstance(source_type, str) else list(source_type)
    ds.ImageType = ["DERIVED", "SECONDARY", *source_type[2:3]]
    ds.StudyInstanceUID = src.study_uid
    ds.Modality = src.modality or "OT"
    ds.SeriesInstanceUID = derived_series_uid(src.series_uid, volume.label, pipeline, version, uid_root)
    description, suffix = str(ds.get("SeriesDescription") or "").strip(), f" [{pipeline}]"[:64]
    ds.SeriesDescription = description[: 64 - len(suffix)] + suffix if description else suffix.strip()
    try:
        source_number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        source_number = 0
    ds.SeriesNumber = source_number + series_number_offset
    ds.DerivationDescription = f"appliance {pipeline} {version}"
    if "FrameOfReferenceUID" not in ds:  # the geometry needs one; stable for the source series
        ds.FrameOfReferenceUID = _uid(uid_root, "appliance.frame-of-reference", src.series_uid)


def _pixel_attributes(ds: Dataset, volume: Volume, rescale: tuple[float, float, bool], per_slice: bool) -> None:
    """Pixel description, rescale and plane geometry. ``per_slice``: ``ds`` was made from the
    slice's own source header, whose plane (orientation, pixel spacing, thickness, spacing between
    slices) is kept as the source wrote it, so that the instance depends on its slice alone."""
    slope, intercept, signed = rescale
    geom = volume.geometry
    _, rows, columns = volume.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
    if volume.units == "HU":
        ds.RescaleType = "HU"
    elif volume.units != "native":
        ds.RescaleType = volume.units[:16]
    elif ds.SOPClassUID == CTImageStorage:
        ds.RescaleType = "US"  # Type 1C in the CT Image module when the values are not HU
    if per_slice:
        if "ImageOrientationPatient" not in ds:
            ds.ImageOrientationPatient = [_ds(v) for v in geom.image_orientation]
        if "PixelSpacing" not in ds:
            ds.PixelSpacing = [_ds(geom.spacing_zyx[1]), _ds(geom.spacing_zyx[2])]
        if "SliceThickness" not in ds:
            ds.SliceThickness = None  # Type 2: present, empty when the source does not say
        return
    ds.ImageOrientationPatient = [_ds(v) for v in geom.image_orientation]
    ds.PixelSpacing = [_ds(geom.spacing_zyx[1]), _ds(geom.spacing_zyx[2])]
    if not ds.get("SliceThickness"):
        ds.SliceThickness = _ds(geom.spacing_zyx[0])
    ds.SpacingBetweenSlices = _ds(geom.spacing_zyx[0])


def _sop_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _source_image(volume: Volume, k: int) -> Dataset:
    """SourceImageSequence item of slice k: its source instance (and frame) and why it is referenced."""
    src = volume.source
    item = _sop_reference(src.sop_class_uid, src.sop_instance_uids[k])
    if src.frame_numbers:
        item.ReferencedFrameNumber = src.frame_numbers[k]
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    return item


def _referenced_series(volume: Volume, sop_instance_uids) -> Sequence:
    """Common Instance Reference module: the source series and the instances this instance references."""
    item = Dataset()
    item.SeriesInstanceUID = volume.source.series_uid
    item.ReferencedInstanceSequence = Sequence(
        [_sop_reference(volume.source.sop_class_uid, uid) for uid in dict.fromkeys(sop_instance_uids)]
    )
    return Sequence([item])


def derive_datasets(
    volume: Volume, pipeline: str, version: str, uid_root: str, series_number_offset: int = 1000
) -> list[Dataset]:
    """One Part-10-ready dataset (file_meta set, Explicit VR Little Endian) per slice, in volume
    order (k = 0..n-1).

    A volume assembled from source slices (``volume.slice_headers`` set, one to one with
    ``volume.source.sop_instance_uids``) gives instances that each depend on their own slice
    only: the slice's source header, its position, its InstanceNumber and a rescale chosen for
    its own voxels. So a slab of a series derives exactly the instances the whole series would:
    streaming and batch processing send the same bytes. Slice k references source instance
    ``sop_instance_uids[k]`` (and frame ``frame_numbers[k]`` for a multi-frame source).

    Any other volume (resampled, reconstructed) takes its plane geometry from
    ``volume.geometry`` (slice k at ``geometry.slice_position(k)``, mm, LPS), one rescale for the
    whole volume, references the source series as a whole, and its instance UIDs derive from the
    new series UID and the slice index.
    """
    voxels = np.asarray(volume.voxels)
    if voxels.ndim != 3:
        raise DeriveError("not_a_volume", f"voxels have shape {voxels.shape}, expected (z, y, x)")
    n = voxels.shape[0]
    src = volume.source
    one_to_one = len(src.sop_instance_uids) == n and (not src.frame_numbers or len(src.frame_numbers) == n)
    per_slice = one_to_one and volume.slice_headers is not None and len(volume.slice_headers) == n
    sop_class = _SOP_CLASS_BY_MODALITY.get(src.modality, SecondaryCaptureImageStorage)
    bases: dict[int, Dataset] = {}

    def base_for(header) -> Dataset:
        key = id(header)
        if key not in bases:
            one = Volume(voxels[:0], volume.geometry, volume.units, src, header=header, label=volume.label)
            base = _base_dataset(one, sop_class)
            base.SOPClassUID = sop_class
            _series_attributes(base, one, pipeline, version, uid_root, series_number_offset)
            bases[key] = base
        return bases[key]

    whole_rescale = None if per_slice else hu_rescale(voxels, volume.units)
    shared = collections.Counter(id(h) for h in volume.slice_headers) if per_slice else {}
    geom = volume.geometry
    normal = geom.normal
    whole_series = None if one_to_one else _referenced_series(volume, src.sop_instance_uids)
    out = []
    for k in range(n):
        rescale = hu_rescale(voxels[k], volume.units) if per_slice else whole_rescale
        # Per slice, each base serves one instance: no second copy (a multi-frame source's
        # frames share one header, so theirs is copied).
        header = volume.slice_headers[k] if per_slice else volume.header
        base = base_for(header)
        ds = base if per_slice and shared[id(header)] == 1 else copy.deepcopy(base)
        _pixel_attributes(ds, volume, rescale, per_slice)
        series_uid = str(ds.SeriesInstanceUID)
        if one_to_one:
            frame = src.frame_numbers[k] if src.frame_numbers else ""
            sop_uid = _uid(uid_root, "appliance.derived-instance", src.sop_instance_uids[k], frame,
                           pipeline, version, volume.label)
            ds.SourceImageSequence = Sequence([_source_image(volume, k)])
            ds.ReferencedSeriesSequence = _referenced_series(volume, [src.sop_instance_uids[k]])
        else:
            sop_uid = _uid(uid_root, "appliance.derived-instance", series_uid, "slice", k)
            ds.ReferencedSeriesSequence = copy.deepcopy(whole_series)
        ds.SOPInstanceUID = sop_uid
        number = _source_instance_number(ds) if per_slice and not src.frame_numbers else None
        ds.InstanceNumber = number if number is not None else k + 1
        position = (np.asarray(volume.slice_positions[k], dtype=np.float64)
                    if per_slice and volume.slice_positions is not None else geom.slice_position(k))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        if not per_slice or "SliceLocation" not in ds:
            ds.SliceLocation = _ds(float(position @ normal))
        ds[_PIXEL_DATA] = DataElement(_PIXEL_DATA, "OW", _stored(voxels[k], *rescale).tobytes())
        _resolve_ambiguous_vrs(ds)
        ds.file_meta = _file_meta(sop_class, sop_uid)
        out.append(ds)
    log.info("derive.series", source_series_uid=src.series_uid, derived_series_uid=str(out[0].SeriesInstanceUID) if out else None,
             label=volume.label, pipeline=pipeline, version=version, instances=n, sop_class=str(sop_class),
             rescale="per slice" if per_slice else list(whole_rescale[:2]), referenced_per_slice=one_to_one)
    return out


def _resolve_ambiguous_vrs(ds: Dataset) -> None:
    """Elements set here whose dictionary VR is ambiguous ("US or SS"...) get the one their
    dataset calls for. pydicom does this itself only when it decodes everything for writing,
    which a dataset written with its source's raw elements skips."""
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if not elem.is_raw and " or " in (elem.VR or ""):
            correct_ambiguous_vr_element(elem, ds, True)


def _source_instance_number(ds: Dataset) -> int | None:
    """The source slice's InstanceNumber (kept in the per-slice base), if it has a usable one."""
    try:
        value = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"APPLIANCE_{__version__}"[:16]
    return meta


def write_derived(datasets: list[Dataset], out_dir: Path) -> tuple[list[Path], set[str]]:
    """Write each dataset as ``<SOPInstanceUID>.dcm`` under ``out_dir`` (encoded once, in memory);
    returns the paths in slice order and the UIDs whose file already existed with other bytes
    (what a destination that has the old file must get again).

    Durability (one slab or series at a time): every file is written under a temporary name, then
    each is fsynced and renamed into place, then the directory is fsynced once: when this returns
    the files are durable and none is ever seen half-written. A file that exists with the same
    bytes is left alone (a re-run after a crash writes nothing twice)."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_dir(out_dir.parent)
    paths, changed, pending = [], set(), []
    for ds in datasets:
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getbuffer()
        paths.append(path)
        if path.exists():
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                continue
            changed.add(str(ds.SOPInstanceUID))
        tmp = out_dir / f".{path.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        except BaseException:
            os.close(fd)
            raise
        pending.append((fd, tmp, path))
    try:
        for fd, _, _ in pending:
            os.fsync(fd)
    finally:
        for fd, _, _ in pending:
            os.close(fd)
    for _, tmp, path in pending:
        os.replace(tmp, path)
    if pending:
        fsync_dir(out_dir)
    return paths, changed
