"""``appliance bench``: its arguments (cheap to import: the CLI builds every parser at start)."""

from __future__ import annotations

import argparse
from pathlib import Path

SCENARIOS = ("kernels", "recon", "denoise", "ingest", "e2e")

DESCRIPTION = """\
Latency and throughput of this appliance on this machine, written as a results document
(JSON), a Markdown report with plots, and optionally gated by a budgets file.

Scenarios: kernels (projector GUPS), recon (FDK, PWLS-TV per volume), denoise (the stage alone,
per backend), ingest (the SCP vs dcmtk storescp, same sender and study), e2e (the daemon on
loopback: first byte in -> last derived image out, per stage; 64/128/300/600 slices; 1/2/4
studies at once; the project's SCU and dcmtk storescu as senders).

  appliance bench                                # full run (about 45 min on 2 cores)
  appliance bench --quick                        # small sizes, under 2 min (CI)
  appliance bench --scenario e2e --repeats 10    # one scenario, 10 samples per configuration
  appliance bench --check bench/budgets/2core.toml          # run, then gate on budgets/baseline
  appliance bench --results RUN/results.json --check FILE   # gate an existing run, no measuring
Exit status: 0 ok; 1 a budget or regression check failed, or a scenario failed; 2 bad input.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true", help="small sizes and few samples (under 2 minutes on 2 cores)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--repeats", type=int, default=None,
                   help="samples per configuration (default: the plan's, 2 to 5 depending on cost)")
    p.add_argument("--config", type=Path, default=None,
                   help="the daemon's configuration for e2e/ingest/denoise (default: built-in); its "
                        "destinations are pointed at the bench's receiving peer")
    p.add_argument("--pipeline", default=None,
                   help="route every image series to this pipeline (default: denoise, or the --config routes)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json, report.md and plots (default: bench/results/DATE-MACHINE)")
    p.add_argument("--results", type=Path, default=None,
                   help="do not measure: use this results document (for --check, the report, --suggest-budgets)")
    p.add_argument("--check", type=Path, default=None, metavar="BUDGETS_TOML",
                   help="then check the results against these budgets (and their baseline); exit 1 if exceeded")
    p.add_argument("--no-report", action="store_true", help="do not write report.md and its plots")
    p.add_argument("--suggest-budgets", action="store_true", help="print a starting budgets TOML for these results")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of the results document")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (studies, daemon logs)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from bench.runner import main

    return main(args)
