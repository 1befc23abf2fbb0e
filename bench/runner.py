"""Runs the scenarios of a plan, writes the results document and the report, applies the gate."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import environment
from bench.cli import SCENARIOS
from bench.plan import FULL, QUICK, Plan
from bench.progress import Progress
from bench.schema import Document, Options, Result, json_schema, load


def default_out(quick: bool) -> Path:
    tag = environment.machine_tag(environment.machine())
    return Path("bench") / "results" / f"{datetime.now(UTC):%Y-%m-%d}-{tag}{'-quick' if quick else ''}"


def measure(args: argparse.Namespace, plan: Plan, scenarios: list[str]) -> tuple[Document, bool]:
    """Every asked-for scenario; (the document, whether every scenario ran to the end)."""
    from appliance import config as config_mod
    from appliance.config import ApplianceConfig
    from appliance.logging import configure
    from bench import denoise, e2e, ingest, kernels, recon
    from bench.studies import StudyBank

    configure("WARNING", json=False)
    cfg = config_mod.load(args.config) if args.config else ApplianceConfig()
    pipeline = args.pipeline or (None if args.config else "denoise")
    steps = {"kernels": kernels.steps, "recon": recon.steps, "denoise": denoise.steps, "ingest": ingest.steps,
             "e2e": e2e.steps}
    progress = Progress(sum(steps[s](plan) for s in scenarios))
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    bank = StudyBank(work / "studies")
    results: list[Result] = []
    skipped: dict[str, str] = {}
    daemon_config: dict = {}
    started, t0 = datetime.now(UTC), time.monotonic()
    ok = True
    progress.note(f"scenarios {', '.join(scenarios)}; scratch {work}")
    try:
        for scenario in scenarios:
            try:
                if scenario == "kernels":
                    results += kernels.run(plan, progress)
                elif scenario == "recon":
                    results += recon.run(plan, progress)
                elif scenario == "denoise":
                    got, why = denoise.run(cfg, plan, work / "denoise", progress)
                    results += got
                    skipped.update(why)
                elif scenario == "ingest":
                    results += ingest.run(cfg, plan, work / "ingest", bank, progress)
                elif scenario == "e2e":
                    got, daemon_config = e2e.run(cfg, plan, work / "e2e", bank, progress, pipeline)
                    results += got
            except Exception as exc:  # the other scenarios still run; the run fails at the end
                ok = False
                skipped[scenario] = f"failed: {type(exc).__name__}: {exc}"
                progress.note(f"{scenario} FAILED: {exc}")
                traceback.print_exc(file=sys.stderr)
        progress.finish()
    finally:
        if args.keep_work:
            progress.note(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not daemon_config and ("ingest" in scenarios or "denoise" in scenarios):
        daemon_config = cfg.model_dump(mode="json")
    doc = Document(
        started=started, wall_s=time.monotonic() - t0, machine=environment.machine(), git=environment.git(),
        versions=environment.versions(),
        options=Options(quick=plan.quick, repeats=args.repeats, warmup=plan.warmup, scenarios=scenarios,
                        command=" ".join(["appliance", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"]
                        else " ".join(sys.argv)),
        config=daemon_config, results=results, skipped=skipped)
    return doc, ok


def main(args: argparse.Namespace) -> int:
    import json

    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.repeats is not None and args.repeats < 1:
        print("--repeats must be at least 1", file=sys.stderr)
        return 2
    if args.check is not None:  # a typo in the budgets fails now, not after a 45-minute run
        from bench.budgets import BudgetError, load_budgets

        try:
            load_budgets(args.check)
        except BudgetError as exc:
            print(exc, file=sys.stderr)
            return 2
    ok = True
    if args.results is not None:
        try:
            doc = load(args.results)
        except (OSError, ValueError) as exc:
            print(f"cannot read results {args.results}: {exc}", file=sys.stderr)
            return 2
        out = args.out or args.results.parent
        results_path = args.results
    else:
        plan = QUICK if args.quick else FULL
        if args.repeats is not None:
            plan = plan.with_repeats(args.repeats)
        scenarios = [s for s in SCENARIOS if not args.scenario or s in args.scenario]
        doc, ok = measure(args, plan, scenarios)
        out = args.out or default_out(plan.quick)
        out.mkdir(parents=True, exist_ok=True)
        results_path = out / "results.json"
        results_path.write_text(doc.dump())
        print(f"results: {results_path}")
    if not args.no_report:
        from bench.report import render_report

        out.mkdir(parents=True, exist_ok=True)
        report = render_report(doc, out, results_name=Path(results_path).name
                               if Path(results_path).parent.resolve() == out.resolve() else str(results_path))
        print(f"report: {report}")
    if args.suggest_budgets:
        from bench.budgets import suggest

        print(suggest(doc))
    if args.check is not None:
        from bench.gate import run_check

        code = run_check(Path(results_path), args.check)
        if code != 0:
            return code
    if not ok:
        print("some scenarios failed: see `skipped` in the results", file=sys.stderr)
        return 1
    return 0
