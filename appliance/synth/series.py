"""Write an HU volume as a proper CT Image Storage series (one Part-10 file per slice).

Deterministic: the same inputs give the same bytes, UIDs included (UIDs are derived from the
``uid_root`` and a seed string). Geometry is any `Geometry` (any orientation, slice direction,
tilt); stored values are ``round((hu - intercept) / slope)`` in 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

from appliance import __version__
from appliance.volume import Geometry


@dataclass(frozen=True)
class SeriesSpec:
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    seed_text: str = "synthetic"  # everything UID-like is derived from this
    rescale_slope: float = 1.0
    rescale_intercept: float = -1024.0
    signed: bool = False  # PixelRepresentation 1 (int16) instead of 0 (uint16)
    transfer_syntax: UID = ExplicitVRLittleEndian
    series_description: str = "Synthetic CT"
    series_number: int = 1
    dose_fraction: float = 1.0
    patient_id: str = "SYN-0000"
    images_in_acquisition: bool = True  # write ImagesInAcquisition (an expected-count hint)
    instance_order: str = "as_is"  # "as_is" or "reversed": InstanceNumber direction vs slice index


def _uid(spec: SeriesSpec, *parts: object) -> UID:
    return generate_uid(prefix=spec.uid_root, entropy_srcs=[spec.seed_text, *map(str, parts)])


def study_uids(spec: SeriesSpec) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID) the writer will use."""
    return str(_uid(spec, "study")), str(_uid(spec, "series")), str(_uid(spec, "frame-of-reference"))


def stored_values(hu: np.ndarray, spec: SeriesSpec) -> np.ndarray:
    """HU -> stored integers, clipped to the 16-bit range of the chosen representation."""
    lo, hi = (-32768, 32767) if spec.signed else (0, 65535)
    stored = np.rint((hu.astype(np.float64) - spec.rescale_intercept) / spec.rescale_slope)
    return np.clip(stored, lo, hi).astype(np.int16 if spec.signed else np.uint16)


def _base_dataset(spec: SeriesSpec, geometry: Geometry, shape: tuple[int, int, int]) -> Dataset:
    study_uid, series_uid, for_uid = study_uids(spec)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.AccessionNumber = "SYN0001"
    ds.Modality = "CT"
    ds.Manufacturer = "Appliance synthetic phantom"
    ds.ManufacturerModelName = "appliance synth"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic thorax-abdomen CT"
    ds.SeriesDescription = spec.series_description
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = "050Y"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = f"{geometry.spacing_zyx[0]:.6g}"
    ds.SpacingBetweenSlices = f"{geometry.spacing_zyx[0]:.6g}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{geometry.spacing_zyx[2] * shape[2]:.6g}"
    ds.GantryDetectorTilt = f"{geometry.tilt_deg:.4g}"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.XRayTubeCurrent = str(int(round(250 * spec.dose_fraction)))
    ds.ExposureTime = "500"
    ds.CTDIvol = round(12.0 * spec.dose_fraction, 3)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = spec.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    if spec.images_in_acquisition:
        ds.ImagesInAcquisition = shape[0]
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in geometry.image_orientation]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[2]
    ds.PixelSpacing = [f"{geometry.spacing_zyx[1]:.8g}", f"{geometry.spacing_zyx[2]:.8g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = f"{spec.rescale_intercept:.8g}"
    ds.RescaleSlope = f"{spec.rescale_slope:.8g}"
    ds.RescaleType = "HU"
    return ds


def write_ct_series(hu: np.ndarray, out_dir: Path, geometry: Geometry, spec: SeriesSpec) -> list[Path]:
    """Write ``hu`` (z, y, x) as one CT instance per slice under ``out_dir``; returns the paths in
    slice order. Slice k sits at ``geometry.slice_position(k)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = stored_values(hu, spec)
    base = _base_dataset(spec, geometry, hu.shape)
    n = hu.shape[0]
    paths = []
    for k in range(n):
        ds = base.copy()
        sop_uid = _uid(spec, "instance", k)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1 if spec.instance_order == "as_is" else n - k
        pos = geometry.slice_position(k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.SliceLocation = f"{float(pos @ geometry.normal):.6f}"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if spec.transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(spec.transfer_syntax, generate_instance_uid=False)
        path = out_dir / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_geometry(
    shape_zyx: tuple[int, int, int], pixel_spacing_mm: float, slice_spacing_mm: float, top_z_mm: float = 0.0
) -> Geometry:
    """Head-first supine axial geometry, centred in x/y; slice 0 is the most superior and slices
    go toward the feet (as most scanners send them)."""
    _, rows, cols = shape_zyx
    origin = np.array(
        [-(cols - 1) / 2 * pixel_spacing_mm, -(rows - 1) / 2 * pixel_spacing_mm, top_z_mm], dtype=np.float64
    )
    axes = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return Geometry(origin=origin, axes=axes, spacing_zyx=(slice_spacing_mm, pixel_spacing_mm, pixel_spacing_mm))
