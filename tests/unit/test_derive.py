from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from appliance.config import AssemblyConfig
from appliance.dicom.assemble import assemble_series
from appliance.dicom.derive import DeriveError, derive_datasets, derived_series_uid, hu_rescale, write_derived
from appliance.synth.series import axial_geometry
from appliance.volume import Volume
from tests.helpers import oblique_geometry, ramp_volume, write_enhanced_ct, write_series

CFG = AssemblyConfig()
ROOT = "1.2.826.0.1.3680043.8.498."
GEOMETRIES = {
    "axial": lambda shape: axial_geometry(shape, 0.8, 2.5, top_z_mm=100.0),
    "oblique_flipped": lambda shape: oblique_geometry(shape, flip_slices=True),
    "gantry_tilt_15deg": lambda shape: oblique_geometry(shape, tilt_deg=15.0),
}


def _source_volume(tmp_path: Path, geometry: str = "axial", shape=(6, 10, 12), **spec) -> Volume:
    hu = ramp_volume(shape, seed=5)
    paths = write_series(tmp_path / "src", hu, GEOMETRIES[geometry](shape), **spec)
    (vol,) = assemble_series(paths, CFG).volumes
    return vol


def _round_trip(volume: Volume, out: Path, **kw) -> tuple[Volume, list[Dataset]]:
    datasets = derive_datasets(volume, kw.pop("pipeline", "passthrough"), kw.pop("version", "0.1.0"), ROOT, **kw)
    paths, _ = write_derived(datasets, out)
    result = assemble_series(paths, CFG)
    assert not result.rejections, result.rejections
    (back,) = result.volumes
    return back, [pydicom.dcmread(p) for p in paths]


def _assert_same_geometry(a: Volume, b: Volume) -> None:
    assert a.shape == b.shape
    for k in range(a.shape[0]):
        np.testing.assert_allclose(b.geometry.slice_position(k), a.geometry.slice_position(k), atol=1e-4, rtol=0)
    np.testing.assert_allclose(b.geometry.axes, a.geometry.axes, atol=1e-9, rtol=0)
    np.testing.assert_allclose(b.geometry.spacing_zyx, a.geometry.spacing_zyx, atol=1e-6, rtol=0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_round_trip_keeps_hu_within_half_hu_and_geometry_exactly(tmp_path, geometry):
    vol = _source_volume(tmp_path, geometry)
    rng = np.random.default_rng(0)  # a processed volume: HU are no longer integers
    vol.voxels = (vol.voxels + rng.uniform(-0.5, 0.5, vol.shape)).astype(np.float32)
    back, datasets = _round_trip(vol, tmp_path / "derived")
    assert np.max(np.abs(back.voxels - vol.voxels)) <= 0.5
    _assert_same_geometry(vol, back)
    assert back.geometry.tilt_deg == pytest.approx(vol.geometry.tilt_deg, abs=1e-4)
    assert back.units == "HU"
    ds = datasets[0]
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation, ds.RescaleType) == (1, 0, 1, "HU")
    for k, d in enumerate(datasets):
        pos = vol.geometry.slice_position(k)
        assert float(d.SliceLocation) == pytest.approx(float(pos @ vol.geometry.normal), abs=1e-4)
        assert d.SpacingBetweenSlices == pytest.approx(vol.geometry.spacing_zyx[0], abs=1e-6)


def test_derived_series_is_in_the_source_study_and_points_back_to_every_source_slice(tmp_path):
    vol = _source_volume(tmp_path, series_number=7, series_description="Thorax 1.0 B30f")
    datasets = derive_datasets(vol, "denoise", "1.2.0", ROOT, series_number_offset=1000)
    src = vol.header
    assert len(datasets) == vol.shape[0]
    expected_series_uid = derived_series_uid(src.SeriesInstanceUID, "", "denoise", "1.2.0", ROOT)
    assert {d.SeriesInstanceUID for d in datasets} == {expected_series_uid}
    refs = []
    for k, d in enumerate(datasets):
        assert d.SOPClassUID == CTImageStorage and d.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert d.StudyInstanceUID == src.StudyInstanceUID and d.SeriesInstanceUID != src.SeriesInstanceUID
        assert d.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert (d.PatientName, d.PatientID) == (src.PatientName, src.PatientID)
        # Each instance keeps its source slice's number (so it depends on its own slice alone).
        assert d.SeriesNumber == 7 + 1000 and d.InstanceNumber == vol.slice_headers[k].InstanceNumber
        assert d.SeriesDescription == "Thorax 1.0 B30f [denoise]"
        assert d.DerivationDescription == "appliance denoise 1.2.0"
        assert (d.ContentDate, d.ContentTime) == (src.ContentDate, src.ContentTime)
        assert "ReferencedFrameNumber" not in d.SourceImageSequence[0]
        assert d.SourceImageSequence[0].ReferencedSOPClassUID == CTImageStorage
        refs.append(d.SourceImageSequence[0].ReferencedSOPInstanceUID)
        (series_ref,) = d.ReferencedSeriesSequence
        assert series_ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert series_ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == refs[-1]
    assert tuple(refs) == vol.source.sop_instance_uids
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)


def test_series_number_without_a_source_number_is_the_offset_and_description_fits_64_chars(tmp_path):
    vol = _source_volume(tmp_path, series_description="x" * 64)
    del vol.header.SeriesNumber
    (d, *_) = derive_datasets(vol, "passthrough", "0.1.0", ROOT, series_number_offset=2000)
    assert d.SeriesNumber == 2000
    assert len(d.SeriesDescription) == 64 and d.SeriesDescription.endswith(" [passthrough]")


def test_rederiving_gives_identical_uids_and_identical_file_bytes(tmp_path):
    vol = _source_volume(tmp_path)
    a, _ = write_derived(derive_datasets(vol, "passthrough", "0.1.0", ROOT), tmp_path / "a")
    b, _ = write_derived(derive_datasets(vol, "passthrough", "0.1.0", ROOT), tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    assert all(p.name == f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in a)
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == sorted(p.name for p in a)  # no temp files left


def test_another_version_or_pipeline_gives_other_series_and_instance_uids(tmp_path):
    vol = _source_volume(tmp_path)
    runs = [derive_datasets(vol, p, v, ROOT) for p, v in (("denoise", "1.0"), ("denoise", "1.1"), ("recon", "1.0"))]
    series = {r[0].SeriesInstanceUID for r in runs}
    instances = {d.SOPInstanceUID for r in runs for d in r}
    assert len(series) == 3 and len(instances) == 3 * vol.shape[0]


def test_distinct_labels_give_distinct_series_uids(tmp_path):
    vol = _source_volume(tmp_path)
    echo1, echo2 = (derive_datasets(replace(vol, label=f"echo={e}"), "denoise", "1.0", ROOT) for e in (1, 2))
    assert echo1[0].SeriesInstanceUID != echo2[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in echo1} & {d.SOPInstanceUID for d in echo2}
    assert derived_series_uid("1.2.3", "ab", "c", "1", ROOT) != derived_series_uid("1.2.3", "a", "bc", "1", ROOT)


@pytest.mark.parametrize("top_hu, expect_slope_one", [(40000.0, True), (250000.0, False)])
def test_hu_beyond_int16_round_trip_within_half_a_slope(tmp_path, top_hu, expect_slope_one):
    vol = _source_volume(tmp_path, shape=(4, 8, 8))
    rng = np.random.default_rng(1)
    vol.voxels = rng.uniform(-1024.0, top_hu, vol.shape).astype(np.float32)
    vol.voxels.flat[0], vol.voxels.flat[-1] = -1024.0, top_hu
    back, datasets = _round_trip(vol, tmp_path / "derived")
    slope = float(datasets[0].RescaleSlope)
    assert (slope == 1.0) is expect_slope_one and datasets[0].PixelRepresentation == 0
    float32_ulp = np.spacing(np.float32(top_hu))  # the volume itself is float32
    assert np.max(np.abs(back.voxels.astype(np.float64) - vol.voxels)) <= slope / 2 + float32_ulp


def _mr_volume(tmp_path: Path) -> Volume:
    ct = _source_volume(tmp_path, "oblique_flipped", shape=(5, 9, 11))
    header = Dataset()
    header.SpecificCharacterSet = "ISO_IR 100"
    header.PatientName, header.PatientID = "MR^PHANTOM", "MR-0001"
    header.StudyInstanceUID, header.SeriesInstanceUID = ct.source.study_uid, generate_uid()
    header.FrameOfReferenceUID = generate_uid()
    header.Modality, header.SeriesNumber, header.ImageType = "MR", 4, ["ORIGINAL", "PRIMARY", "M", "ND"]
    header.ScanningSequence, header.SequenceVariant = "SE", "NONE"
    source = replace(ct.source, modality="MR", sop_class_uid=MRImageStorage, series_uid=header.SeriesInstanceUID)
    rng = np.random.default_rng(2)
    voxels = rng.uniform(0.0, 3.5, ct.shape).astype(np.float32)
    voxels.flat[0], voxels.flat[-1] = 0.0, 3.5
    return Volume(voxels, ct.geometry, "native", source, header=header)


def test_mr_float_volume_round_trips_within_a_thousandth_of_its_range(tmp_path):
    vol = _mr_volume(tmp_path)
    back, datasets = _round_trip(vol, tmp_path / "derived")
    d = datasets[0]
    assert d.SOPClassUID == MRImageStorage and list(d.ImageType) == ["DERIVED", "SECONDARY", "M"]
    assert "RescaleType" not in d and d.PixelRepresentation == 0 and float(d.RescaleSlope) < 1e-4
    assert np.max(np.abs(back.voxels - vol.voxels)) <= 1e-3 * 3.5
    _assert_same_geometry(vol, back)


def test_other_modalities_become_secondary_capture(tmp_path):
    vol = _mr_volume(tmp_path)
    vol = replace(vol, source=replace(vol.source, modality="PT"))
    (d, *_) = derive_datasets(vol, "passthrough", "0.1.0", ROOT)
    assert d.SOPClassUID == SecondaryCaptureImageStorage and d.ConversionType == "WSD"


def test_hu_rescale_policy():
    assert hu_rescale(np.array([-1024.0, 3071.4]), "HU") == (1.0, 0.0, True)
    assert hu_rescale(np.array([-1024.0, 40000.0]), "HU") == (1.0, -1024.0, False)
    assert hu_rescale(np.array([0.0, 4095.0]), "native") == (1.0, 0.0, False)
    slope, intercept, signed = hu_rescale(np.array([0.0, 3.5]), "native")
    assert not signed and 3.5 / 65535 < slope < 3.5 / 60000 and -slope * 32 < intercept <= 0.0
    assert hu_rescale(np.full(4, 1.25), "native") == (1.0, 1.25, False)
    with pytest.raises(DeriveError, match="non_finite"):
        hu_rescale(np.array([0.0, np.nan]), "HU")


def test_enhanced_ct_source_derives_classic_ct_instances_referencing_each_frame(tmp_path):
    hu = ramp_volume((5, 8, 6))
    path = tmp_path / "enh.dcm"
    write_enhanced_ct(path, hu, oblique_geometry(hu.shape, flip_slices=True), slice_thickness=1.5)
    (vol,) = assemble_series([path], CFG).volumes
    back, datasets = _round_trip(vol, tmp_path / "derived")
    np.testing.assert_array_equal(back.voxels, vol.voxels)
    _assert_same_geometry(vol, back)
    enhanced_uid = str(vol.header.SOPInstanceUID)
    assert [d.SourceImageSequence[0].ReferencedFrameNumber for d in datasets] == [5, 4, 3, 2, 1]
    for d in datasets:
        assert d.SOPClassUID == CTImageStorage and d.SourceImageSequence[0].ReferencedSOPInstanceUID == enhanced_uid
        assert d.SourceImageSequence[0].ReferencedSOPClassUID == EnhancedCTImageStorage
        for gone in ("NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                     "PresentationLUTShape"):
            assert gone not in d
        assert (d.SliceThickness, d.WindowCenter, d.WindowWidth) == (1.5, 40, 400)  # from the functional groups
        assert "KVP" in d and not d.KVP  # Type 2 in the CT Image module: present, empty when unknown
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "VOLUME"] and d.SeriesNumber == 1003
    assert len({d.SOPInstanceUID for d in datasets}) == 5
    assert "PerFrameFunctionalGroupsSequence" in vol.header  # the source header is left as it was


def _add_private_data(paths: list[Path]) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "private patient note")
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D0050", "SRT", "Tissue"
        item.private_block(0x0031, "ACME 1.0", create=True).add_new(0x01, "LO", "nested private")
        ds.AnatomicRegionSequence = Sequence([item])
        ds.add_new("PixelPaddingValue", "US", 0)
        ds.save_as(p, enforce_file_format=True)


def test_private_tags_and_stale_pixel_attributes_are_not_copied(tmp_path):
    hu = ramp_volume((4, 8, 8))
    paths = write_series(tmp_path / "src", hu, axial_geometry(hu.shape, 1.0, 2.0))
    _add_private_data(paths)
    (vol,) = assemble_series(paths, CFG).volumes
    assert any(elem.tag.is_private for elem in vol.header)
    datasets = derive_datasets(vol, "passthrough", "0.1.0", ROOT)
    for d in datasets:
        private = []
        d.walk(lambda _ds, elem: private.append(elem.tag) if elem.tag.is_private else None)
        assert not private
        assert d.AnatomicRegionSequence[0].CodeValue == "T-D0050"  # public content of sequences stays
        assert "PixelPaddingValue" not in d and "ImagesInAcquisition" not in d


def test_volume_not_one_to_one_with_source_slices_references_the_series(tmp_path):
    vol = _source_volume(tmp_path)
    half = replace(vol, voxels=vol.voxels[::2].copy(),
                   geometry=replace(vol.geometry, spacing_zyx=(2 * vol.geometry.spacing_zyx[0],
                                                               *vol.geometry.spacing_zyx[1:])))
    back, datasets = _round_trip(half, tmp_path / "derived")
    _assert_same_geometry(half, back)
    for d in datasets:
        assert "SourceImageSequence" not in d
        refs = [r.ReferencedSOPInstanceUID for r in d.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
        assert tuple(refs) == vol.source.sop_instance_uids
    assert len({d.SOPInstanceUID for d in datasets}) == half.shape[0]


def test_volume_without_a_header_still_gives_valid_instances(tmp_path):
    vol = replace(_source_volume(tmp_path), header=None, slice_headers=None, slice_positions=None)
    a = derive_datasets(vol, "passthrough", "0.1.0", ROOT)
    b = derive_datasets(vol, "passthrough", "0.1.0", ROOT)
    d = a[0]
    assert d.StudyInstanceUID == vol.source.study_uid and d.SeriesNumber == 1000
    assert "PatientName" in d and not d.PatientName and d.SeriesDescription == "[passthrough]"
    assert d.FrameOfReferenceUID == b[0].FrameOfReferenceUID  # made up, but the same on every run
