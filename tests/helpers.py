"""Test helpers: small series of any geometry, written with the project's own series writer."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from appliance.synth.series import SeriesSpec, write_ct_series
from appliance.volume import Geometry


def ramp_volume(shape_zyx: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Integer HU in [-1000, 2000] with structure along every axis (so any flip or shift shows)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    hu = -1000 + 7 * z + 3 * y + 2 * x + rng.integers(0, 50, size=shape_zyx)
    return np.clip(hu, -1000, 2000).astype(np.float32)


def rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_geometry(shape_zyx, spacing_zyx=(2.0, 0.7, 0.8), angle_deg=23.0, flip_slices=False, tilt_deg=0.0):
    """An oblique geometry: the axial frame rotated about a skew axis; optional gantry tilt."""
    r = rotation([1.0, 2.0, 0.5], angle_deg)
    row_dir, col_dir = r @ [1.0, 0, 0], r @ [0, 1.0, 0]
    normal = np.cross(row_dir, col_dir)
    slice_dir = -normal if flip_slices else normal
    if tilt_deg:
        # Gantry tilt: the slice direction leans toward the column direction.
        slice_dir = np.cos(np.radians(tilt_deg)) * slice_dir + np.sin(np.radians(tilt_deg)) * col_dir
    axes = np.stack([slice_dir, col_dir, row_dir])
    return Geometry(origin=np.array([-120.5, 33.25, 410.0]), axes=axes, spacing_zyx=tuple(spacing_zyx))


def write_series(out: Path, hu: np.ndarray, geometry: Geometry, **spec_kw) -> list[Path]:
    spec_kw.setdefault("seed_text", f"test/{out}")
    return write_ct_series(hu, out, geometry, SeriesSpec(**spec_kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_enhanced_ct(path: Path, hu: np.ndarray, geom: Geometry, slice_thickness: float | None = None) -> None:
    """An Enhanced CT instance: all slices as frames, geometry and rescale (-1000) in functional groups."""
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber = "CT", "ENH^PHANTOM", "ENH-1", 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.NumberOfFrames = hu.shape[0]
    ds.Rows, ds.Columns = hu.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset(); pm.PixelSpacing = list(geom.spacing_zyx[1:]); pm.SliceThickness = slice_thickness or geom.spacing_zyx[0]
    po = Dataset(); po.ImageOrientationPatient = geom.image_orientation
    pv = Dataset(); pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 1, -1000, "HU"
    voi = Dataset(); voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in range(hu.shape[0]):
        f = Dataset(); pp = Dataset()
        pp.ImagePositionPatient = [float(v) for v in geom.slice_position(k)]
        f.PlanePositionSequence = Sequence([pp])
        per.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = (hu + 1000).astype(np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
