from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage

from appliance.dicom.validate import InstanceRefused, read_header
from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_series


@pytest.fixture
def one(tmp_path: Path) -> Path:
    hu = ramp_volume((1, 16, 16))
    return write_series(tmp_path / "src", hu, axial_geometry(hu.shape, 1.0, 2.0))[0]


def _refusal(path: Path, sop_class=CTImageStorage, sop_instance=None) -> InstanceRefused:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    with pytest.raises(InstanceRefused) as err:
        read_header(path, sop_class, sop_instance or ds.SOPInstanceUID, [])
    return err.value


def test_good_instance_header(one):
    ds = pydicom.dcmread(one)
    h = read_header(one, CTImageStorage, ds.SOPInstanceUID, ["ImagesInAcquisition"])
    assert h.series_uid == ds.SeriesInstanceUID and h.expected_count == 1 and h.modality == "CT"


@pytest.mark.parametrize("cut", [1, 10, 300])
def test_truncated_file_cannot_be_understood(one, cut):
    data = one.read_bytes()
    one.write_bytes(data[:-cut])
    r = _refusal(one)
    assert (r.status, r.reason) == (0xC000, "truncated")


def test_sop_class_not_matching_context(one):
    r = _refusal(one, sop_class=MRImageStorage)
    assert (r.status, r.reason) == (0xA900, "sop_class_mismatch")


def test_sop_instance_not_matching_request(one):
    r = _refusal(one, sop_instance="1.2.3.4")
    assert (r.status, r.reason) == (0xA900, "sop_instance_mismatch")


def test_pixel_data_of_wrong_length(one):
    ds = pydicom.dcmread(one)
    ds.PixelData = ds.PixelData[:-64]  # a consistent element, but too short for 16x16x16 bits
    ds.save_as(one, enforce_file_format=True)
    r = _refusal(one)
    assert (r.status, r.reason) == (0xA900, "pixel_data_length")


def test_missing_series_uid(one):
    ds = pydicom.dcmread(one)
    del ds.SeriesInstanceUID
    ds.save_as(one, enforce_file_format=True)
    r = _refusal(one)
    assert r.reason == "missing_attribute" and "SeriesInstanceUID" in r.detail


def test_garbage_is_unparseable(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    r = _refusal(bad, sop_instance="1.2.3")
    assert r.status == 0xC000


@pytest.mark.parametrize("keyword, value", [("SeriesInstanceUID", "../../escaped"), ("StudyInstanceUID", "1.2.x"),
                                            ("SeriesInstanceUID", "1." + "2" * 70)])
def test_a_uid_that_is_not_a_uid_is_refused_before_it_names_a_path(one, keyword, value):
    ds = pydicom.dcmread(one)
    setattr(ds, keyword, value)
    ds.save_as(one, enforce_file_format=True)
    r = _refusal(one)
    assert (r.status, r.reason) == (0xA900, "invalid_uid")


def test_an_absurd_frame_count_is_refused(one):
    ds = pydicom.dcmread(one)
    ds.NumberOfFrames = 2_000_000_000
    ds.save_as(one, enforce_file_format=True)
    r = _refusal(one)
    assert r.reason == "invalid_attribute" and "NumberOfFrames" in r.detail


def test_deflated_instance_with_large_pixel_data_is_accepted(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    hu = ramp_volume((1, 256, 256))  # 128 KiB of pixel data: past the deferred-read size
    path = write_series(tmp_path / "d", hu, axial_geometry(hu.shape, 1.0, 1.0))[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    h = read_header(path, CTImageStorage, ds.SOPInstanceUID, [])
    assert h.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_an_image_without_pixel_data_is_refused(one):
    """A dataset cut short before its pixels, re-encoded whole: every element parses, Pixel Data is gone."""
    ds = pydicom.dcmread(one)
    del ds.PixelData
    ds.save_as(one, enforce_file_format=True)
    r = _refusal(one)
    assert (r.status, r.reason) == (0xA900, "missing_pixel_data")


@pytest.mark.parametrize("delta", [-512, +512])
def test_deflated_pixel_data_of_the_wrong_length_is_refused(tmp_path, delta):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    hu = ramp_volume((1, 64, 64))
    path = write_series(tmp_path / "d", hu, axial_geometry(hu.shape, 1.0, 1.0))[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:delta] if delta < 0 else ds.PixelData + b"\0" * delta
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    r = _refusal(path)
    assert (r.status, r.reason) == (0xA900, "pixel_data_length")
