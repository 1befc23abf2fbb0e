from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from appliance.config import AssemblyConfig
from appliance.dicom.assemble import assemble_series
from appliance.synth.series import axial_geometry
from tests.helpers import oblique_geometry, ramp_volume, write_enhanced_ct, write_series

CFG = AssemblyConfig()


def _positions(paths: list[Path]) -> np.ndarray:
    return np.array([[float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient] for p in paths])


def assert_matches_source(volume, hu: np.ndarray, paths: list[Path], tol_hu: float = 0.0):
    """Every assembled slice sits where its source slice was and holds its HU."""
    src_pos = _positions(paths)
    assert volume.voxels.shape == hu.shape
    for k in range(volume.voxels.shape[0]):
        pos = volume.geometry.slice_position(k)
        j = int(np.argmin(np.linalg.norm(src_pos - pos, axis=1)))
        assert np.linalg.norm(src_pos[j] - pos) < 1e-3, f"slice {k} at {pos}, nearest source {src_pos[j]}"
        np.testing.assert_allclose(volume.voxels[k], hu[j], atol=tol_hu, rtol=0)


def test_axial_series_sent_top_down_is_sorted_along_the_normal(tmp_path):
    hu = ramp_volume((6, 10, 12))
    geom = axial_geometry(hu.shape, 0.8, 2.5, top_z_mm=100.0)
    paths = write_series(tmp_path, hu, geom)
    (vol,) = assemble_series(paths, CFG).volumes
    np.testing.assert_array_equal(vol.voxels, hu[::-1])  # ascending z (feet to head)
    assert vol.units == "HU" and vol.label == ""
    assert vol.geometry.spacing_zyx == pytest.approx((2.5, 0.8, 0.8))
    np.testing.assert_allclose(vol.geometry.axes[0], [0, 0, 1], atol=1e-9)
    assert vol.geometry.tilt_deg < 1e-6
    assert_matches_source(vol, hu, paths)


@pytest.mark.parametrize("flip", [False, True])
def test_oblique_geometry_any_arrival_order(tmp_path, flip):
    hu = ramp_volume((7, 9, 11), seed=3)
    geom = oblique_geometry(hu.shape, flip_slices=flip)
    paths = write_series(tmp_path, hu, geom)
    shuffled = [paths[i] for i in np.random.default_rng(1).permutation(len(paths))]
    (vol,) = assemble_series(shuffled, CFG).volumes
    assert_matches_source(vol, hu, paths)
    assert vol.geometry.spacing_zyx == pytest.approx((2.0, 0.7, 0.8))
    np.testing.assert_allclose(vol.geometry.axes[0], vol.geometry.normal, atol=1e-6)


@pytest.mark.parametrize("slope, intercept, signed", [(1.0, -1024.0, False), (1.0, 0.0, True), (0.5, -1000.0, True), (2.0, -2048.0, False)])
def test_rescale_gives_hu(tmp_path, slope, intercept, signed):
    hu = ramp_volume((3, 8, 8))
    paths = write_series(tmp_path, hu, axial_geometry(hu.shape, 1.0, 1.0), rescale_slope=slope,
                         rescale_intercept=intercept, signed=signed)
    (vol,) = assemble_series(paths, CFG).volumes
    assert_matches_source(vol, hu, paths, tol_hu=slope / 2)


def test_rescale_is_applied_per_slice(tmp_path):
    hu = ramp_volume((5, 8, 8))
    paths = write_series(tmp_path, hu, axial_geometry(hu.shape, 1.0, 1.0))
    for k, p in enumerate(paths):  # each slice its own intercept, same HU
        ds = pydicom.dcmread(p)
        stored = ds.pixel_array.astype(np.int32) - 10 * k
        ds.RescaleIntercept = str(-1024 + 10 * k)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(p, enforce_file_format=True)
    (vol,) = assemble_series(paths, CFG).volumes
    assert_matches_source(vol, hu, paths)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_decode_exactly(tmp_path, syntax):
    hu = ramp_volume((3, 64, 64))  # the J2K encoder needs tiles larger than its resolution levels
    paths = write_series(tmp_path, hu, axial_geometry(hu.shape, 1.0, 1.0), transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    (vol,) = assemble_series(paths, CFG).volumes
    assert_matches_source(vol, hu, paths)


def test_single_slice_uses_slice_thickness(tmp_path):
    hu = ramp_volume((1, 8, 8))
    paths = write_series(tmp_path, hu, axial_geometry(hu.shape, 1.0, 3.0))
    (vol,) = assemble_series(paths, CFG).volumes
    assert vol.shape == (1, 8, 8) and vol.geometry.spacing_zyx[0] == pytest.approx(3.0)


def test_gantry_tilt_within_limit_is_kept_in_the_geometry(tmp_path):
    hu = ramp_volume((6, 8, 8))
    geom = oblique_geometry(hu.shape, tilt_deg=15.0)
    paths = write_series(tmp_path, hu, geom)
    (vol,) = assemble_series(paths, CFG).volumes
    assert vol.geometry.tilt_deg == pytest.approx(15.0, abs=1e-3)
    assert_matches_source(vol, hu, paths)
    assert any("tilt" in p for p in vol.provenance)


def _reason(paths, cfg=CFG) -> str:
    result = assemble_series(paths, cfg)
    assert result.rejected, "expected the series to be rejected"
    return result.rejections[0].reason


def test_gantry_tilt_beyond_limit_is_rejected(tmp_path):
    hu = ramp_volume((4, 8, 8))
    paths = write_series(tmp_path, hu, oblique_geometry(hu.shape, tilt_deg=15.0))
    assert _reason(paths, AssemblyConfig(max_gantry_tilt_deg=10.0)) == "gantry_tilt"


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def axial(tmp_path) -> tuple[np.ndarray, list[Path]]:
    hu = ramp_volume((8, 8, 8))
    return hu, write_series(tmp_path / "s", hu, axial_geometry(hu.shape, 1.0, 2.0))


def test_non_uniform_spacing_across_all_slices_is_rejected(axial):
    _, paths = axial
    pos = pydicom.dcmread(paths[5]).ImagePositionPatient
    _edit(paths[5], ImagePositionPatient=[pos[0], pos[1], float(pos[2]) + 0.4])
    assert _reason(paths) == "non_uniform_spacing"


def test_a_missing_slice_is_named(axial):
    _, paths = axial
    result = assemble_series(paths[:3] + paths[4:], CFG)
    assert result.rejected and result.rejections[0].reason == "missing_slice"
    assert "1 slice(s) missing" in result.rejections[0].detail


def test_missing_position_is_rejected(axial):
    _, paths = axial
    _edit(paths[2], ImagePositionPatient=None)
    assert _reason(paths) == "missing_position"


def test_inconsistent_orientation_is_rejected(axial):
    _, paths = axial
    _edit(paths[1], ImageOrientationPatient=[1, 0, 0, 0, 0.99, 0.141])
    assert _reason(paths) == "inconsistent_orientation"


def test_positions_off_the_slice_line_are_rejected(axial):
    _, paths = axial
    pos = pydicom.dcmread(paths[4]).ImagePositionPatient
    _edit(paths[4], ImagePositionPatient=[float(pos[0]) + 3.0, pos[1], pos[2]])
    assert _reason(paths) == "non_collinear_positions"


def test_inconsistent_image_size_is_rejected(tmp_path, axial):
    _, paths = axial
    other = write_series(tmp_path / "o", ramp_volume((8, 8, 10)), axial_geometry((8, 8, 10), 1.0, 2.0))
    ds = pydicom.dcmread(other[3])
    ref = pydicom.dcmread(paths[3])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = ref.SeriesInstanceUID, ref.SOPInstanceUID
    ds.ImagePositionPatient = ref.ImagePositionPatient
    ds.save_as(paths[3], enforce_file_format=True)
    assert _reason(paths) == "inconsistent_size"


def _copy_as(paths: list[Path], out: Path, **attrs) -> list[Path]:
    out.mkdir()
    new = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in attrs.items():
            setattr(ds, k, v)
        q = out / p.name
        ds.save_as(q, enforce_file_format=True)
        new.append(q)
    return new


def test_multi_echo_splits_into_one_volume_per_echo(tmp_path, axial):
    hu, paths = axial
    for p in paths:
        _edit(p, EchoNumbers=1)
    echo2 = _copy_as(paths, tmp_path / "e2", EchoNumbers=2)
    result = assemble_series(paths + echo2, CFG)
    assert [v.label for v in result.volumes] == ["echo=1", "echo=2"] and not result.rejections
    for v in result.volumes:
        assert_matches_source(v, hu, paths)


def test_duplicate_positions_split_by_acquisition(tmp_path, axial):
    hu, paths = axial
    second = _copy_as(paths, tmp_path / "a2", AcquisitionNumber=2)
    result = assemble_series(paths + second, CFG)
    assert [v.label for v in result.volumes] == ["acquisition=1", "acquisition=2"]


def test_duplicate_positions_without_a_key_are_split_not_dropped(tmp_path, axial):
    hu, paths = axial
    again = _copy_as(paths, tmp_path / "r2")
    result = assemble_series(paths + again, CFG)
    assert [v.label for v in result.volumes] == ["repeat=1", "repeat=2"]
    assert sum(v.shape[0] for v in result.volumes) == 2 * len(paths)


def test_enhanced_multiframe_ct(tmp_path):
    hu = ramp_volume((5, 8, 6))
    geom = oblique_geometry(hu.shape, flip_slices=True)
    path = tmp_path / "enh.dcm"
    write_enhanced_ct(path, hu, geom)
    (vol,) = assemble_series([path], CFG).volumes
    # flip_slices: frame k sits at -k along the normal, so ascending order reverses the frames
    np.testing.assert_array_equal(vol.voxels, hu[::-1])
    assert vol.source.frame_numbers == (5, 4, 3, 2, 1)
    for k in range(5):
        np.testing.assert_allclose(vol.geometry.slice_position(k), geom.slice_position(4 - k), atol=1e-6)


def test_missing_pixel_format_attributes_are_a_rejection_not_a_crash(axial):
    _, paths = axial
    _edit(paths[3], PixelRepresentation=None)
    assert _reason(paths) == "inconsistent_pixel_format"
