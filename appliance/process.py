"""Offline processing: ``appliance process --pipeline NAME INPUT_DIR OUTPUT_DIR``.

The same assembly, pipeline and derived-series writer as the daemon, on a folder of DICOM files,
with no network: for QA, field engineers and regression data sets. Each input series becomes
``OUTPUT_DIR/<derived series uid>/<SOP instance uid>.dcm``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from appliance.config import ApplianceConfig
from appliance.dicom.assemble import assemble_series
from appliance.dicom.derive import derive_datasets, write_derived
from appliance.pipeline import stages


@dataclass
class ProcessReport:
    written: dict[str, list[Path]] = field(default_factory=dict)  # derived series uid -> files
    rejected: dict[str, list[str]] = field(default_factory=dict)  # source series uid -> reasons
    skipped: list[Path] = field(default_factory=list)  # not DICOM
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # derived uid -> stage seconds

    @property
    def ok(self) -> bool:
        return bool(self.written) and not self.rejected


def series_in_folder(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    by_series: dict[str, list[Path]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_series[str(ds.SeriesInstanceUID)].append(path)
        except Exception:
            skipped.append(path)
    return dict(by_series), skipped


def process_folder(input_dir: Path, output_dir: Path, pipeline_name: str, cfg: ApplianceConfig) -> ProcessReport:
    pipeline = stages.build(pipeline_name, cfg)  # KeyError with the list of pipelines if unknown
    by_series, skipped = series_in_folder(input_dir)
    report = ProcessReport(skipped=skipped)
    for series_uid, paths in by_series.items():
        assembly = assemble_series(paths, cfg.assembly)
        if assembly.rejections:
            report.rejected[series_uid] = [f"{r.reason}: {r.detail}" for r in assembly.rejections]
        for item in [*assembly.volumes, *assembly.projections]:
            try:
                result, seconds = pipeline.run(item)
            except stages.StageError as exc:
                report.rejected.setdefault(series_uid, []).append(f"{exc.reason}: {exc.detail}")
                continue
            datasets = derive_datasets(result, pipeline.name, pipeline.version, cfg.dicom.uid_root,
                                       cfg.derived.series_number_offset)
            uid = str(datasets[0].SeriesInstanceUID)
            report.written[uid] = write_derived(datasets, Path(output_dir) / uid)[0]
            report.timings[uid] = seconds
    return report
