"""Streaming by slab gives exactly what batch processing gives: the same derived instances (SOP
Instance UIDs and every byte of every file), for in-order and shuffled arrival, for passthrough and
for the denoiser; and a series only the whole can judge leaves the streaming path with a reason."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest

from appliance.config import ApplianceConfig, AssemblyConfig
from appliance.dicom.assemble import assemble_series, plan_series
from appliance.dicom.derive import derive_datasets, write_derived
from appliance.dicom.stream import SeriesStream, add_instance, crop, final_slabs, ready_slabs
from appliance.dicom.validate import read_header
from appliance.pipeline import stages
from appliance.synth.study import write_synthetic_ct

CFG = AssemblyConfig()
ROOT = "1.2.826.0.1.3680043.8.498."


def _headers(paths: list[Path]) -> dict[Path, pydicom.Dataset]:
    out = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out[p] = read_header(p, ds.SOPClassUID, ds.SOPInstanceUID, []).dataset
    return out


def _files(pipeline: stages.Pipeline, volume, out: Path) -> dict[str, bytes]:
    datasets = derive_datasets(volume, pipeline.name, pipeline.version, ROOT)
    paths, _ = write_derived(datasets, out)
    return {str(ds.SOPInstanceUID): p.read_bytes() for ds, p in zip(datasets, paths)}


def _batch(pipeline: stages.Pipeline, paths: list[Path], out: Path) -> dict[str, bytes]:
    (volume,) = assemble_series(paths, CFG).volumes
    result, _ = pipeline.run(volume)
    return _files(pipeline, result, out)


def _stream(pipeline: stages.Pipeline, arrival: list[Path], out: Path, slab_slices: int = 4):
    """Feed instances in ``arrival`` order as the daemon does; returns the derived files, the
    number of slabs made before completion, and the stream."""
    headers = _headers(arrival)
    stream = SeriesStream("s", 0, "CT", context=max(1, pipeline.context_slices),
                          context_model=pipeline.context_slices)
    slabs, early = [], 0
    for p in arrival:
        add_instance(stream, headers[p], p, "stored", CFG)
        got = ready_slabs(stream, CFG, slab_slices)
        early += len(got)
        slabs += got
    assert stream.streaming, stream.fallback
    plan = plan_series(list(headers), CFG, stream.headers)
    (whole,) = plan.planned
    slabs += final_slabs(stream, whole.order, CFG)
    files: dict[str, bytes] = {}
    for i, slab in enumerate(slabs):
        result, _ = pipeline.run(slab.volume)
        files.update(_files(pipeline, crop(result, *slab.crop), out / str(i)))
    return files, early, stream


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_synthetic_ct(tmp_path_factory.mktemp("study"), shape_zyx=(23, 64, 64), dose_fraction=0.25, seed=3)


@pytest.fixture(scope="module")
def denoise():
    return stages.build("denoise", ApplianceConfig())


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
@pytest.mark.parametrize("name", ["passthrough", "denoise"])
def test_streamed_series_is_identical_to_batch(tmp_path, study, denoise, order, name):
    pipeline = denoise if name == "denoise" else stages.build("passthrough")
    paths = sorted(study.paths)
    arrival = {"in_order": paths, "reversed": paths[::-1],
               "shuffled": random.Random(7).sample(paths, len(paths))}[order]
    batch = _batch(pipeline, paths, tmp_path / "batch")
    streamed, early, stream = _stream(pipeline, arrival, tmp_path / "stream")
    assert early >= 1, "no slab left before the series was complete"
    assert set(streamed) == set(batch) and len(batch) == 23
    assert all(streamed[uid] == batch[uid] for uid in batch)  # every byte, pixel data included


def test_a_context_model_streams_identically(tmp_path, study):
    """A pipeline with two context slices each side (the batch clamps them at the ends)."""
    import numpy as np

    from appliance.volume import Volume

    class Smooth:
        name = "smooth"

        def __call__(self, volume: Volume) -> Volume:
            v = volume.voxels
            idx = np.clip(np.arange(len(v))[:, None] + np.arange(-2, 3)[None, :], 0, len(v) - 1)
            volume.voxels = v[idx].mean(axis=1).astype(np.float32)
            return volume

    pipeline = stages.Pipeline("smooth", "1", [Smooth()], streams=True, context_slices=2)
    paths = sorted(study.paths)
    batch = _batch(pipeline, paths, tmp_path / "batch")
    streamed, early, _ = _stream(pipeline, random.Random(1).sample(paths, len(paths)), tmp_path / "s")
    assert early >= 1 and streamed == batch


def test_slices_wait_while_a_neighbour_is_missing(tmp_path, study):
    """In order with slice 10 late: nothing around the gap leaves until it arrives."""
    paths = sorted(study.paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    late = paths[10]
    arrival = [p for p in paths if p != late] + [late]
    headers = _headers(arrival)
    stream = SeriesStream("s", 0, "CT", context=1)
    emitted_before = set()
    for p in arrival[:-1]:
        add_instance(stream, headers[p], p, "stored", CFG)
        for slab in ready_slabs(stream, CFG, 2):
            emitted_before.update(slab.sop_instance_uids)
    assert stream.streaming
    near = {str(headers[paths[i]].SOPInstanceUID) for i in (9, 10, 11)}
    assert emitted_before and not emitted_before & near


@pytest.mark.parametrize("case, reason", [
    ("echo", "echo_or_phase"),
    ("orientation", "inconsistent_orientation"),
    ("spacing", "non_uniform_spacing"),
    ("duplicate", "duplicate_position"),
    ("no_number", "no_instance_number"),
])
def test_what_only_the_whole_series_can_judge_stops_streaming(tmp_path, study, case, reason):
    paths = sorted(study.paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    headers = _headers(paths)
    stream = SeriesStream("s", 0, "CT", context=1)
    for p in paths[:8]:
        add_instance(stream, headers[p], p, "stored", CFG)
    odd = headers[paths[8]].copy()
    if case == "echo":
        odd.EchoNumbers = 2
    elif case == "orientation":
        odd.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    elif case == "spacing":
        z = float(odd.ImagePositionPatient[2])
        odd.ImagePositionPatient = [*odd.ImagePositionPatient[:2], z + 1.3]
    elif case == "duplicate":
        odd.ImagePositionPatient = headers[paths[3]].ImagePositionPatient
        odd.SOPInstanceUID = odd.SOPInstanceUID + ".9"
    else:
        del odd.InstanceNumber
    add_instance(stream, odd, paths[8], "stored", CFG)
    ready_slabs(stream, CFG, 1)
    assert stream.fallback == reason


def test_a_new_version_of_an_instance_stops_streaming(study):
    paths = sorted(study.paths)
    headers = _headers(paths[:3])
    stream = SeriesStream("s", 0, "CT", context=1)
    add_instance(stream, headers[paths[0]], paths[0], "stored", CFG)
    add_instance(stream, headers[paths[0]], paths[0], "duplicate", CFG)
    assert stream.streaming
    add_instance(stream, headers[paths[0]], paths[0], "new_version", CFG)
    assert stream.fallback == "new_version"
