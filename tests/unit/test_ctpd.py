"""Unit tests for the DICOM-CT-PD reader and writer (kernels.ctpd): round trip, format conventions,
files from other writers (block numbers, implicit VR, the published transposed layout) and refusals."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, RawDataStorage

from appliance.synth.series import SeriesSpec, axial_geometry, write_ct_series
from kernels.ctpd import (
    MAX_QUANTISATION,
    PRIVATE_CREATOR,
    TAGS,
    CtpdError,
    is_ctpd,
    read_ctpd,
    write_ctpd,
)
from kernels.geometry import Detector, ProjectionGeometry

UID_ROOT = "1.2.826.0.1.3680043.8.498."
N_VIEWS, N_ROWS, N_COLS = 12, 4, 8
PRIVATE_GROUPS = sorted({t.group for t in TAGS.values()})


def helical_geometry(shape: str = "curved") -> ProjectionGeometry:
    """Two turns of a helix with a flying focal spot alternating in phi, z and rho."""
    angles = 0.3 + np.arange(N_VIEWS) * 4 * np.pi / N_VIEWS
    alternate = np.tile([1.0, -1.0], N_VIEWS // 2)
    return ProjectionGeometry(
        Detector(N_COLS, N_ROWS, 1.2, 1.1, 3.125, 1.5, shape), 570.0, 1040.0, angles,
        source_z=-3.0 + 2.75 * np.arange(N_VIEWS),
        ffs_dphi=5e-4 * alternate, ffs_dz=0.3 * alternate, ffs_drho=1.0 * alternate,
    )


def line_integrals(seed: int = 0) -> np.ndarray:
    """(views, rows, cols) values in [-0.05, 9] with structure along every axis (so any flip shows)."""
    v, r, c = np.meshgrid(*(np.arange(n) for n in (N_VIEWS, N_ROWS, N_COLS)), indexing="ij")
    noise = np.random.default_rng(seed).uniform(0.0, 0.5, (N_VIEWS, N_ROWS, N_COLS))
    return (-0.05 + 0.3 * v + 0.9 * r + 0.25 * c + noise).astype(np.float32)


def write(tmp_path: Path, shape: str = "curved", **kw) -> tuple[list[Path], np.ndarray, ProjectionGeometry]:
    geom, data = helical_geometry(shape), line_integrals()
    kw = {"uid_root": UID_ROOT, "seed_text": "ctpd-test", **kw}
    return write_ctpd(tmp_path / "pd", data, geom, **kw), data, geom


def rewrite(paths: list[Path], change) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def assert_same_geometry(got: ProjectionGeometry, want: ProjectionGeometry) -> None:
    """Equal within float32 precision: the format stores FL (float32) values."""
    assert got.detector.shape == want.detector.shape
    assert (got.detector.n_u, got.detector.n_v) == (want.detector.n_u, want.detector.n_v)
    np.testing.assert_allclose(got.detector.centre, want.detector.centre, atol=1e-6)
    np.testing.assert_allclose([got.detector.du, got.detector.dv, got.sod, got.sdd],
                               [want.detector.du, want.detector.dv, want.sod, want.sdd], rtol=1e-7)
    for name in ("angles", "source_z", "ffs_dphi", "ffs_dz", "ffs_drho"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", ["flat", "curved"])
def test_round_trip_keeps_line_integrals_within_quantisation_and_geometry_within_float32(tmp_path, shape):
    counts = np.random.default_rng(1).uniform(1e4, 1e5, (N_VIEWS, N_COLS))
    study = {"PatientName": "DOE^JANE", "PatientID": "P123", "StudyInstanceUID": UID_ROOT + "77"}
    paths, data, geom = write(tmp_path, shape, counts=counts, water_mu=0.0195, study=study)
    shuffled = list(paths)
    random.Random(3).shuffle(shuffled)
    proj = read_ctpd(shuffled)
    assert proj.data.shape == data.shape and proj.data.dtype == np.float32
    assert np.max(np.abs(proj.data - data)) < MAX_QUANTISATION  # line integral, dimensionless
    assert_same_geometry(proj.geometry, geom)
    np.testing.assert_allclose(proj.counts, counts, rtol=1e-7)  # float32 photon counts
    assert proj.water_mu == pytest.approx(0.0195)
    assert proj.source_sop_uids == tuple(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert "PixelData" not in proj.header
    assert (proj.header.PatientName, proj.header.PatientID, proj.header.StudyInstanceUID) == (
        "DOE^JANE", "P123", UID_ROOT + "77")


def test_written_files_follow_the_published_format_conventions(tmp_path):
    paths, data, geom = write(tmp_path)
    ds = pydicom.dcmread(paths[4])
    assert ds.SOPClassUID == CTImageStorage and ds.InstanceNumber == 5
    assert (ds.Rows, ds.Columns) == (N_ROWS, N_COLS)
    for group in PRIVATE_GROUPS:
        assert ds[Tag(group, 0x0010)].value == PRIVATE_CREATOR
    # central element (column, row) is 1-based and counted from the format's first column/row,
    # which are our last: u0 = 3.125 -> 8 - 3.125, v0 = 1.5 -> 4 - 1.5
    assert list(ds[Tag(0x7031, 0x1033)].value) == [4.875, 2.5]
    stored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(stored, data[4, ::-1, ::-1], atol=MAX_QUANTISATION)
    # angles wrapped to [0, 2 pi) as the published files; FFS in the manual's order (100B = d phi)
    assert ds[Tag(0x7031, 0x1001)].value == pytest.approx(np.mod(geom.angles[4], 2 * np.pi), abs=1e-6)
    assert ds[Tag(0x7033, 0x100B)].value == pytest.approx(geom.ffs_dphi[4], rel=1e-6)
    assert ds[Tag(0x7033, 0x100C)].value == pytest.approx(geom.ffs_dz[4], rel=1e-6)
    assert ds[Tag(0x7033, 0x100E)].value == "FFSXYZ" and ds[Tag(0x7037, 0x1009)].value == "HELICAL"
    assert is_ctpd(ds)


def test_ffs_order_z_phi_rho_reads_the_first_two_shifts_swapped(tmp_path):
    paths, _, geom = write(tmp_path)
    default = read_ctpd(paths)
    swapped = read_ctpd(paths, ffs_order="z_phi_rho")
    np.testing.assert_allclose(default.geometry.ffs_dphi, geom.ffs_dphi, rtol=1e-6)
    np.testing.assert_allclose(swapped.geometry.ffs_dphi, geom.ffs_dz, rtol=1e-6)  # rad <- 100C
    np.testing.assert_allclose(swapped.geometry.ffs_dz, geom.ffs_dphi, rtol=1e-6)  # mm <- 100B
    np.testing.assert_allclose(swapped.geometry.ffs_drho, geom.ffs_drho, rtol=1e-6)
    with pytest.raises(ValueError):
        read_ctpd(paths, ffs_order="rho_phi_z")


def _move_blocks(ds: pydicom.Dataset, block: int, creator: str = PRIVATE_CREATOR) -> None:
    """Re-home every DICOM-CT-PD block at ``block`` and put another vendor's block at 0x10, whose
    elements carry the same low bytes (so reading by fixed tag numbers would pick up junk)."""
    for group in PRIVATE_GROUPS:
        moved = [e for e in ds.group_dataset(group) if e.tag.element >= 0x1000]
        for elem in [*moved, ds[Tag(group, 0x0010)]]:
            del ds[elem.tag]
        ds.add_new(Tag(group, 0x0010), "LO", "OTHER VENDOR 1.0")
        ds.add_new(Tag(group, block), "LO", creator)
        for elem in moved:
            ds.add_new(Tag(group, (block << 8) | (elem.tag.element & 0xFF)), elem.VR, elem.value)
            ds.add_new(Tag(group, 0x1000 | (elem.tag.element & 0xFF)), "LO", "junk")


def test_another_writers_block_number_with_a_foreign_block_in_front_still_parses(tmp_path):
    paths, data, geom = write(tmp_path)
    rewrite(paths, lambda ds: _move_blocks(ds, 0x12))
    ds = pydicom.dcmread(paths[0])
    assert ds[Tag(0x7031, 0x0012)].value == PRIVATE_CREATOR and Tag(0x7031, 0x1201) in ds
    proj = read_ctpd(paths)
    assert np.max(np.abs(proj.data - data)) < MAX_QUANTISATION
    assert_same_geometry(proj.geometry, geom)
    assert proj.water_mu == pytest.approx(0.0192)


def _as_published(ds: pydicom.Dataset) -> None:
    """What the TCIA files look like to pydicom: implicit VR (private values arrive as raw bytes),
    pixel matrix stored transposed (Rows = detector columns), water mu in (0018,0061) in 1/cm,
    a later dictionary version in the creator."""
    pixels = ds.pixel_array
    ds.Rows, ds.Columns = ds.Columns, ds.Rows
    ds.PixelData = np.ascontiguousarray(pixels.T).tobytes()
    del ds[Tag(0x7041, 0x1001)]
    ds.add_new(Tag(0x0018, 0x0061), "DS", "0.192")
    for group in PRIVATE_GROUPS:
        ds[Tag(group, 0x0010)].value = "DICOM-CT-PD-dict_v10"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def test_published_layout_implicit_vr_and_legacy_water_tag_read_the_same(tmp_path):
    paths, data, geom = write(tmp_path)
    rewrite(paths, _as_published)
    ds = pydicom.dcmread(paths[0])
    assert isinstance(ds[Tag(0x7031, 0x1001)].value, bytes) and (ds.Rows, ds.Columns) == (N_COLS, N_ROWS)
    proj = read_ctpd(paths)
    assert np.max(np.abs(proj.data - data)) < MAX_QUANTISATION
    assert_same_geometry(proj.geometry, geom)
    assert proj.water_mu == pytest.approx(0.0192)  # 0.192 /cm


def test_views_stored_as_raw_data_storage_are_read_too(tmp_path):
    paths, data, _ = write(tmp_path)

    def as_raw_data(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RawDataStorage

    rewrite(paths, as_raw_data)
    assert np.max(np.abs(read_ctpd(paths).data - data)) < MAX_QUANTISATION


def test_dataset_without_creator_is_not_ctpd_and_reading_it_raises_missing_geometry(tmp_path):
    paths, _, _ = write(tmp_path)

    def drop_creators(ds):
        for group in PRIVATE_GROUPS:
            del ds[Tag(group, 0x0010)]

    rewrite(paths, drop_creators)
    assert not is_ctpd(pydicom.dcmread(paths[0]))
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "missing_geometry"
    image = write_ct_series(np.zeros((2, 4, 4), np.float32), tmp_path / "ct", axial_geometry((2, 4, 4), 1.0, 1.0),
                            SeriesSpec())
    assert not is_ctpd(pydicom.dcmread(image[0]))


def test_unknown_creator_is_read_only_when_the_caller_names_it(tmp_path):
    paths, data, _ = write(tmp_path)
    rewrite(paths, lambda ds: _move_blocks(ds, 0x10 + 0x20, creator="Site CT raw export"))
    assert not is_ctpd(pydicom.dcmread(paths[0]))
    assert is_ctpd(pydicom.dcmread(paths[0]), extra_creators=["SITE CT RAW EXPORT"])
    proj = read_ctpd(paths, extra_creators=["Site CT raw export"])
    assert np.max(np.abs(proj.data - data)) < MAX_QUANTISATION


def test_views_with_another_detector_size_raise_inconsistent_detector(tmp_path):
    paths, _, _ = write(tmp_path)

    def wider(ds):
        ds.Columns = N_COLS + 2
        ds[Tag(0x7029, 0x1011)].value = N_COLS + 2
        ds.PixelData = np.zeros((N_ROWS, N_COLS + 2), "<u2").tobytes()

    rewrite(paths[5:6], wider)
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "inconsistent_detector"


def test_pixel_matrix_not_matching_the_detector_tags_raises_inconsistent_detector(tmp_path):
    paths, _, _ = write(tmp_path)

    def pixels_only(ds):
        ds.Rows = N_ROWS - 1
        ds.PixelData = np.zeros((N_ROWS - 1, N_COLS), "<u2").tobytes()

    rewrite(paths[2:3], pixels_only)
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "inconsistent_detector"


def test_mixed_detector_shapes_raise_inconsistent_detector(tmp_path):
    paths, _, _ = write(tmp_path)
    rewrite(paths[:1], lambda ds: setattr(ds[Tag(0x7029, 0x100B)], "value", "FLAT"))
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "inconsistent_detector"


def test_spherical_detector_is_refused(tmp_path):
    paths, _, _ = write(tmp_path)
    rewrite(paths, lambda ds: setattr(ds[Tag(0x7029, 0x100B)], "value", "SPHERICAL"))
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "unsupported_detector_shape"


def test_views_of_two_series_are_not_mixed(tmp_path):
    paths, _, _ = write(tmp_path)
    rewrite(paths[:1], lambda ds: setattr(ds, "SeriesInstanceUID", UID_ROOT + "1"))
    with pytest.raises(CtpdError) as err:
        read_ctpd(paths)
    assert err.value.reason == "mixed_series"
    with pytest.raises(CtpdError) as err:
        read_ctpd([])
    assert err.value.reason == "no_views"


def test_same_inputs_give_identical_bytes_and_another_seed_other_uids(tmp_path):
    geom, data = helical_geometry(), line_integrals()
    a = write_ctpd(tmp_path / "a", data, geom, uid_root=UID_ROOT, seed_text="s1")
    b = write_ctpd(tmp_path / "b", data, geom, uid_root=UID_ROOT, seed_text="s1")
    c = write_ctpd(tmp_path / "c", data, geom, uid_root=UID_ROOT, seed_text="s2")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    first_a, first_c = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert first_a.SOPInstanceUID.startswith(UID_ROOT)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert first_a[keyword].value != first_c[keyword].value
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in a}) == N_VIEWS


def test_writer_refuses_what_16_bits_cannot_hold_and_caller_set_pixel_attributes(tmp_path):
    geom = helical_geometry()
    with pytest.raises(CtpdError) as err:  # a span of 20 would round to 1.5e-4
        write_ctpd(tmp_path / "x", np.linspace(0, 20, N_VIEWS * N_ROWS * N_COLS).reshape(geom.shape), geom,
                   uid_root=UID_ROOT, seed_text="x")
    assert err.value.reason == "data_range"
    nan = line_integrals()
    nan[0, 0, 0] = np.nan
    with pytest.raises(CtpdError):
        write_ctpd(tmp_path / "y", nan, geom, uid_root=UID_ROOT, seed_text="y")
    with pytest.raises(ValueError):
        write_ctpd(tmp_path / "z", line_integrals(), geom, uid_root=UID_ROOT, seed_text="z", study={"Rows": 3})
    with pytest.raises(ValueError):
        write_ctpd(tmp_path / "w", line_integrals()[:, :, :3], geom, uid_root=UID_ROOT, seed_text="w")
