"""Render an ``appliance bench`` results document as a Markdown report with PNG plots.

    python -m bench.report bench/results/RUN/results.json [--out DIR]

The report (``report.md``, next to the plots) is what a QA engineer signs off on: where and how
the run was made, one table per scenario (n, min, p50, p95, p99, max, the ratio to a peer where
there is one), the end-to-end per-stage breakdown, and plots of the cost model (bench/plots/):
the distribution of latency per stage, latency against slices per series and against concurrent
studies, denoise throughput against volume size, ingest against dcmtk ``storescp``, projector
throughput. A plot whose data is absent from the document (a run of some scenarios only, a quick
run with one series size) is left out with a note saying why; any document that validates renders.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench import plots
from bench.labels import FIRST_BYTE, LAST_IMAGE, MEASURES, fields, fmt, fmt_duration, measure_label, measures, sort_key
from bench.plots import PLOT_FILES, Plot
from bench.schema import SCENARIOS, Document, Result, load
from bench.tables import cell, markdown_table, result_table, stage_table

REPORT_NAME = "report.md"

SCENARIO_TITLES = {
    "e2e": "End to end (e2e)",
    "ingest": "Ingest",
    "denoise": "Denoise",
    "recon": "Reconstruction (recon)",
    "kernels": "Projector kernels",
}
SCENARIO_NOTES = {
    "e2e": ("The real daemon on loopback: a synthetic study sent over DICOM, timed per study. "
            f"*{MEASURES[FIRST_BYTE]}*: from the first byte sent to the last C-STORE response at the "
            f"destination. *{MEASURES[LAST_IMAGE]}*: from the last source image's C-STORE response to "
            "the last derived image's, i.e. what the technologist waits for after the scan."),
    "ingest": ("Instances per second received by the storage SCP, the appliance side by side with dcmtk "
               "`storescp` on the same machine and the same study. ratio = appliance p50 / storescp p50: "
               "above 1 the appliance receives faster."),
    "denoise": "The denoise stage alone on an in-memory volume, per backend.",
    "recon": "Iterative/analytic reconstruction alone on an in-memory phantom, per backend.",
    "kernels": ("Forward and back projection throughput in GUPS (giga voxel-updates per second: "
                "voxels × views / seconds / 10⁹); higher is better."),
}


def _plot_lines(plot: Plot) -> list[str]:
    if plot.file:
        return [f"![{plot.title}]({plot.file})", ""]
    return [f"*No plot “{plot.title}”: {plot.why_not}.*", ""]


def _header(doc: Document, results_name: str) -> list[str]:
    m, o = doc.machine, doc.options
    when = doc.started
    when_s = when.isoformat(sep=" ", timespec="seconds")
    if when.tzinfo is None:
        when_s += " (local time of the benchmark machine)"
    rev = f"`{doc.git.revision}`" + (" **dirty** (built with uncommitted changes)" if doc.git.dirty else " (clean)")
    gpu = "none"
    if m.gpu:
        gpu = m.gpu + "".join(f", {k} {v}" for k, v in (("driver", m.gpu_driver), ("compute capability",
                                                                                    m.compute_capability)) if v)
    versions = ", ".join(f"{k} {v}" if v else f"{k} (not installed)" for k, v in doc.versions.items()) or "—"
    mode = "quick (CI smoke run; small sizes, numbers indicative only)" if o.quick else "full"
    repeats = ("the plan's sample counts (per row below)" if o.repeats is None
               else f"{o.repeats} repeat{'s' if o.repeats != 1 else ''}")
    options = (f"{mode}; {repeats} after {o.warmup} warm-up "
               f"run{'s' if o.warmup != 1 else ''}; scenarios: {', '.join(o.scenarios) or '—'}")
    link = f"<{results_name}>" if any(c.isspace() for c in results_name) else results_name
    rows = [
        ["Started", f"{when_s}; the run took {fmt_duration(doc.wall_s)}"],
        ["Git revision", rev],
        ["Machine", f"{m.hostname} ({m.os})"],
        ["CPU", f"{m.cpu}, {m.cores} cores, {fmt(m.memory_gib, 3)} GiB memory"],
        ["GPU", gpu],
        ["Versions", versions],
        ["Options", options],
        ["Command", f"`{o.command}`" if o.command else "—"],
        ["Results", f"[{results_name}]({link}) (schema {doc.schema_id}, {len(doc.results)} results)"],
    ]
    lines = ["# appliance bench report", ""] + markdown_table(["Run", ""], rows) + [""]
    if o.quick:
        lines += ["> **Quick run.** Sizes and repeats are cut down for CI; do not sign off on these numbers.", ""]
    if doc.skipped:
        lines += ["**Not run:**", ""] + [f"- `{k}`: {cell(v)}" for k, v in doc.skipped.items()] + [""]
    return lines


HOW_TO_READ = """\
## How to read this report

- Every number comes from **n samples** taken after the warm-up runs; each table states n per row.
  min, p50 (median), p95, p99 and max are order statistics of those samples; percentiles
  interpolate linearly between neighbouring samples.
- With few samples the tail percentiles say little: below n = 20, p95 and p99 lie between the
  two largest samples (with n = 5, p95 is 80 % of the way from the second largest to the max),
  and p99 is only meaningful with n of 100 and more. Judge tails with n in mind, and prefer max
  when n is small.
- *lower is better* for latencies (s), *higher is better* for throughputs (1/s, GUPS).
- A **ratio** compares this result's p50 with a named peer's p50 measured in the same run on the
  same machine (e.g. the appliance's SCP against dcmtk `storescp`).
- Each result's `id` is what budgets and baselines refer to (`appliance bench --check`).
"""


def render_report(doc: Document, out_dir: Path, results_name: str = "results.json") -> Path:
    """Write ``out_dir/report.md`` and its PNG plots for ``doc``; return the report's path.

    Plots have fixed names (``PLOT_FILES``); one whose data the document lacks is not drawn (the
    report says why) and a stale copy from an earlier render is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES.values():
        (out_dir / name).unlink(missing_ok=True)

    by_scenario: dict[str, list[Result]] = {}
    for r in doc.results:
        by_scenario.setdefault(r.scenario, []).append(r)
    for rs in by_scenario.values():
        rs.sort(key=sort_key)

    lines = _header(doc, results_name) + [HOW_TO_READ]
    absent = [s for s in doc.options.scenarios if s not in by_scenario and s not in doc.skipped]
    if absent:
        lines += [f"*Requested but without results: {', '.join(absent)}.*", ""]

    for scenario in SCENARIOS:
        rs = by_scenario.get(scenario)
        if not rs:
            continue
        lines += [f"## {SCENARIO_TITLES[scenario]}", "", SCENARIO_NOTES[scenario], ""]
        if scenario == "e2e":  # one table per measure: they answer different questions
            for m in measures(rs):
                in_m = [r for r in rs if str(fields(r).get("measure")) == m]
                lines += [f"### {measure_label(m) if m != 'None' else 'Latency'}", ""]
                lines += result_table(in_m, exclude=["Measure"]) + [""]
        else:
            lines += result_table(rs) + [""]
        drawn = plots.draw(scenario, rs, out_dir)
        if scenario == "e2e":
            by_pipeline: dict[str, list[Result]] = {}
            for r in rs:
                if r.stages:
                    by_pipeline.setdefault(str(fields(r).get("pipeline", "—")), []).append(r)
            if by_pipeline:
                lines += ["### Per-stage breakdown", ""]
                for pipeline, staged in by_pipeline.items():
                    if len(by_pipeline) > 1:
                        lines += [f"Pipeline `{pipeline}`:", ""]
                    lines += stage_table(staged) + [""]
                lines += _plot_lines(drawn["e2e_stages"]) + _plot_lines(drawn["e2e_stages_stacked"])
            lines += ["### Scaling", ""]
            lines += _plot_lines(drawn["e2e_slices"]) + _plot_lines(drawn["e2e_concurrency"])
            lines += ["### Raw samples", ""] + _plot_lines(drawn["e2e_samples"])
        else:
            for plot in drawn.values():
                lines += _plot_lines(plot)
    others = [s for s in by_scenario if s not in SCENARIOS]
    for scenario in others:  # the schema's Literal keeps this empty; kept for a future scenario
        lines += [f"## {scenario}", ""] + result_table(by_scenario[scenario]) + [""]
    if doc.config:
        lines += ["## Daemon configuration", "", "<details><summary>effective configuration (e2e, ingest)"
                  "</summary>", "", "```json", json.dumps(doc.config, indent=2, default=str, sort_keys=True),
                  "```", "", "</details>", ""]
    while lines and lines[-1] == "":
        lines.pop()
    report = out_dir / REPORT_NAME
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="the results JSON of an appliance bench run")
    ap.add_argument("--out", type=Path, default=None, help="where report.md and the plots go "
                    "(default: the results file's folder)")
    args = ap.parse_args(argv)
    doc = load(args.results)
    out = args.out if args.out is not None else args.results.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    name = Path(os.path.relpath(args.results.resolve(), out.resolve())).as_posix()
    print(render_report(doc, out, results_name=name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
