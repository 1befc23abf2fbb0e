"""Cheap checks on a received instance, before it is acknowledged.

Runs on the association thread, so it reads only the header and the declared element lengths
(large values stay on disk); it never decodes pixel data. First the whole file is walked in its
transfer syntax (`wellformed`: every element, sequence, item and fragment, nothing left over), then
the header is parsed and checked against the request and the image attributes. What it cannot
accept it refuses with an `InstanceRefused` carrying the DICOM status and a coded reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import Tag

from appliance.dicom.wellformed import Malformed, Walked, check_part10

# C-STORE failure statuses (PS3.4 Annex B.2.3)
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# PS3.5 9.1: digits and dots, no empty component, at most 64 characters. Checked before a UID
# names a directory or a file in the spool (a UID like "../x" must never become a path).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_FRAMES = 100_000  # frames per instance; more is refused before anything iterates over them
_PIXEL_DATA = Tag("PixelData")
_DEFER_BYTES = 64 * 1024
_BULK = {Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


class InstanceRefused(Exception):
    """An instance the appliance will not store; ``status`` goes back to the sender."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class InstanceHeader:
    """What the spool indexes about one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax_uid: str
    expected_count: int | None  # instances expected in the series, if the sender says
    # The parsed header (every element read, pixel data and other deferred bulk values removed), so
    # the assembler never reads the file's header a second time. Not part of equality.
    dataset: Dataset | None = field(default=None, compare=False, repr=False)


def _header_only(ds: Dataset) -> Dataset:
    """``ds`` without the values still on disk (pixel data, other elements over the defer size):
    what is kept must not read from the received file later (it is moved into the spool)."""
    for tag in list(ds.keys()):
        el = ds.get_item(tag, keep_deferred=True)
        if tag == _PIXEL_DATA or Tag(tag) in _BULK or getattr(el, "value", b"") is None:
            del ds[tag]
    return ds


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) pixel data the image attributes call for, or None if unknown."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    total_bits = rows * cols * samples * frames * bits
    return (total_bits + 7) // 8


# Storage SOP classes without pixel data: DICOM-CT-PD may arrive as Raw Data.
_NO_PIXELS = {"1.2.840.10008.5.1.4.1.1.66"}  # Raw Data Storage


def _check_fragments(ds: Dataset, walked: Walked, frames: int) -> None:
    """Encapsulated pixel data (PS3.5 A.4): at least one fragment per frame, and offset tables
    that index every frame."""
    fragments, table = walked.fragments or 0, walked.offset_table_bytes or 0
    if fragments < 1 or fragments < frames:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "pixel_fragments",
                              f"{frames} frame(s) in {fragments} pixel data fragment(s)")
    if table not in (0, 4 * frames):
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "pixel_fragments",
                              f"a Basic Offset Table of {table} bytes for {frames} frame(s)")
    extended = ds.get_item(Tag("ExtendedOffsetTable"), keep_deferred=True)
    if extended is not None and getattr(extended, "length", 0) != 8 * frames:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "pixel_fragments",
                              f"an Extended Offset Table of {extended.length} bytes for {frames} frame(s)")


def _check_pixel_length(ds: Dataset, transfer_syntax: pydicom.uid.UID, sop_class: str, walked: Walked,
                        frames: int, max_pixel_bytes: int) -> None:
    if _PIXEL_DATA not in ds:
        if sop_class not in _NO_PIXELS and not any(t in ds for t in _BULK):
            # An image without its pixels: a dataset cut short before them, or a broken sender.
            raise InstanceRefused(STATUS_DATASET_MISMATCH, "missing_pixel_data",
                                  "an image instance without Pixel Data")
        return
    want = expected_pixel_bytes(ds)
    if want is None:
        raise InstanceRefused(
            STATUS_DATASET_MISMATCH, "missing_attribute", "pixel data without Rows/Columns/BitsAllocated"
        )
    if want > max_pixel_bytes:  # what decoding would allocate, whatever the bytes on the wire
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "decoded_too_large",
                              f"the pixel data decodes to {want} bytes, the limit is {max_pixel_bytes} "
                              "(limits.max_bytes_per_instance)")
    if transfer_syntax.is_encapsulated:
        _check_fragments(ds, walked, frames)
        return
    el = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = getattr(el, "length", None)
    if length is None:
        return
    # Deflated too: the length is the inflated element's.
    if length not in (want, want + (want % 2)):
        raise InstanceRefused(
            STATUS_DATASET_MISMATCH,
            "pixel_data_length",
            f"pixel data holds {length} bytes, Rows x Columns x frames x samples x bits calls for {want}",
        )


def _expected_count(ds: Dataset, tags: list[str]) -> int | None:
    for keyword in tags:
        value = ds.get(keyword)
        try:
            n = int(value) if value not in (None, "") else 0
        except (TypeError, ValueError):
            continue
        if n > 0:
            return n
    return None


def _parse(path: Path, max_inflated_bytes: int) -> tuple[Dataset, Walked]:
    """Walk the file in its transfer syntax, then parse it (values over the defer size stay on
    disk). A deflated dataset is inflated into a file beside it first, within the limit."""
    inflated = path.with_name(path.name + ".inflated")
    walked = check_part10(path, inflated, max_inflated_bytes)  # leaves nothing behind when it refuses
    if not walked.inflated:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        _ = ds.get("SOPClassUID")  # forces the parse of the leading elements
        return ds, walked
    try:
        with open(inflated, "rb") as f:
            ds = read_dataset(f, is_implicit_VR=False, is_little_endian=True, defer_size=_DEFER_BYTES)
            ds.file_meta = read_file_meta_info(path)
            _ = ds.get("SOPClassUID")  # deferred values are never read back: `_header_only` drops them
        return ds, walked
    finally:
        inflated.unlink(missing_ok=True)


def read_header(
    path: Path, context_sop_class: str, context_sop_instance: str, expected_count_tags: list[str], *,
    max_inflated_bytes: int = 64 * 1024 * 1024, max_pixel_bytes: int = 512 * 1024 * 1024,
) -> InstanceHeader:
    """Walk, parse and check a received Part-10 file; raises `InstanceRefused` with the status to answer."""
    try:
        ds, walked = _parse(path, max_inflated_bytes)
        transfer_syntax = ds.file_meta.TransferSyntaxUID
    except Malformed as bad:
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, bad.reason, bad.detail) from None
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same to the sender
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "unparseable", f"{type(exc).__name__}: {exc}") from exc
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    sop_instance = str(ds.get("SOPInstanceUID", "")).strip()
    if sop_class != context_sop_class.strip():
        raise InstanceRefused(
            STATUS_DATASET_MISMATCH,
            "sop_class_mismatch",
            f"dataset SOPClassUID {sop_class or '(none)'} but sent as {context_sop_class}",
        )
    if sop_instance != context_sop_instance.strip():
        raise InstanceRefused(
            STATUS_DATASET_MISMATCH,
            "sop_instance_mismatch",
            f"dataset SOPInstanceUID {sop_instance or '(none)'} but sent as {context_sop_instance}",
        )
    missing = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID") if not str(ds.get(kw, "")).strip()]
    if missing:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "missing_attribute", f"missing {', '.join(missing)}")
    for keyword, value in (("SOPInstanceUID", sop_instance), ("StudyInstanceUID", str(ds.StudyInstanceUID).strip()),
                           ("SeriesInstanceUID", str(ds.SeriesInstanceUID).strip())):
        if len(value) > 64 or not _UID.match(value):
            raise InstanceRefused(STATUS_DATASET_MISMATCH, "invalid_uid", f"{keyword} is not a valid UID: {value[:70]!r}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "invalid_attribute", "NumberOfFrames is not a number") from None
    if not 1 <= frames <= MAX_FRAMES:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, "invalid_attribute",
                              f"NumberOfFrames {frames} outside 1..{MAX_FRAMES}")
    try:
        _check_pixel_length(ds, transfer_syntax, sop_class, walked, frames, max_pixel_bytes)
    except InstanceRefused:
        raise
    except Exception as exc:
        raise InstanceRefused(STATUS_CANNOT_UNDERSTAND, "unparseable", f"{type(exc).__name__}: {exc}") from exc

    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_uid=str(ds.StudyInstanceUID).strip(),
        series_uid=str(ds.SeriesInstanceUID).strip(),
        modality=str(ds.get("Modality", "") or ""),
        transfer_syntax_uid=str(transfer_syntax),
        expected_count=_expected_count(ds, expected_count_tags),
        dataset=_header_only(ds),
    )
