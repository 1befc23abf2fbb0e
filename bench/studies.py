"""Synthetic studies for the benchmarks: each size rendered once, then copied with fresh UIDs
for every sample, so that no sample is a re-send of an earlier one (which a receiver could
treat as a duplicate) while the bytes, and so the work, stay the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from appliance.synth.study import write_synthetic_ct

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's example root, as in the synthetic studies
DOSE = 0.25
Z_START_MM = 120.0  # heart, diaphragm and liver dome


class StudyBank:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def base(self, shape_zyx: tuple[int, int, int]) -> Path:
        """The rendered quarter-dose CT series of this shape (slices, rows, columns), made once."""
        folder = self.root / "base-{}x{}x{}".format(*shape_zyx)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            write_synthetic_ct(folder, shape_zyx=shape_zyx, dose_fraction=DOSE, seed=7, z_start_mm=Z_START_MM)
            (folder / ".complete").touch()
        return folder

    def fresh(self, shape_zyx: tuple[int, int, int]) -> tuple[Path, str, str]:
        """A copy of ``base(shape_zyx)`` as a new study (new Study, Series, SOP Instance and Frame of
        Reference UIDs, new patient ID): (folder, StudyInstanceUID, SeriesInstanceUID). Delete it when done."""
        base = self.base(shape_zyx)
        self._count += 1
        tag = f"bench-{self._count}-{shape_zyx}"
        out = self.root / f"study-{self._count}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        study_uid = series_uid = None
        for path in sorted(base.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
                setattr(ds, keyword, generate_uid(UID_PREFIX, [tag, keyword]))
            ds.SOPInstanceUID = generate_uid(UID_PREFIX, [tag, str(ds.SOPInstanceUID)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"BENCH-{self._count:05d}"
            ds.save_as(out / path.name, enforce_file_format=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        if study_uid is None or series_uid is None:
            raise RuntimeError(f"no DICOM files in {base}")
        return out, study_uid, series_uid
