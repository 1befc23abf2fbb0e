from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from appliance.config import AssemblyConfig
from appliance.dicom.assemble import assemble_series
from appliance.synth.study import write_synthetic_ct


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_process_writes_the_derived_series_without_network(tmp_path: Path):
    study = write_synthetic_ct(tmp_path / "in", shape_zyx=(6, 64, 64), dose_fraction=0.5, seed=2)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    res = _cli("process", "--pipeline", "passthrough", tmp_path / "in", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    (series_dir,) = (tmp_path / "out").iterdir()
    files = sorted(series_dir.iterdir())
    assert len(files) == 6 and "wrote 6 instance(s)" in res.stdout
    ds = pydicom.dcmread(files[0])
    assert ds.StudyInstanceUID == study.study_uid and ds.SeriesInstanceUID != study.series_uid
    (vol,) = assemble_series(files, AssemblyConfig()).volumes
    assert np.max(np.abs(vol.voxels - study.hu[::-1])) <= 0.5
    again = _cli("process", tmp_path / "in", tmp_path / "out2")  # a re-run gives the same UIDs
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (tmp_path / "out2").iterdir()] == [series_dir.name]


def test_process_exits_non_zero_with_the_reason_for_a_bad_series(tmp_path: Path):
    study = write_synthetic_ct(tmp_path / "in", shape_zyx=(5, 32, 32), seed=2)
    study.paths[2].unlink()  # a missing slice
    res = _cli("process", tmp_path / "in", tmp_path / "out")
    assert res.returncode == 1 and "missing_slice" in res.stderr


def test_process_refuses_an_empty_folder_and_an_unknown_pipeline(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = _cli("process", tmp_path / "empty", tmp_path / "out")
    assert res.returncode == 1 and "no DICOM images" in res.stderr
    res = _cli("process", "--pipeline", "magic", tmp_path / "empty", tmp_path / "out")
    assert res.returncode == 2 and "passthrough" in res.stderr
    res = _cli("process", tmp_path / "nope", tmp_path / "out")
    assert res.returncode == 2 and "not a folder" in res.stderr
