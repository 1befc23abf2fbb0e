"""End-to-end latency: the real daemon on loopback, synthetic studies sent over DICOM by the
project's SCU and by dcmtk's storescu, the derived series received by a storage SCP standing in
for the console.

Each sample is one study, timed on the bench's clock from the first byte the sender puts on the
wire to the C-STORE response for the last derived instance at the destination
(``first_byte_to_last_response``), and from the sender's last C-STORE response to that same
moment (``last_image_to_last_response``: what the console operator waits for after the scan).
The per-stage breakdown comes from the daemon's events (`appliance.loopback.stage_seconds`).
One daemon serves the whole scenario; a warm-up study goes through it first (model loaded,
caches filled) and is not counted. Concurrent studies are sent at the same moment, each on its
own association; each study is a sample, and the batch's makespan is reported beside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from appliance.config import ApplianceConfig, RouteRule
from appliance.dicom.scu import send_folder
from appliance.loopback import LoopbackDaemon, ReceivingPeer, free_port, wait_until
from appliance.loopback import stage_seconds as daemon_stage_seconds
from bench.plan import Plan
from bench.progress import Progress
from bench.schema import Peer, Result, measured
from bench.studies import StudyBank

STORESCU = Path("/usr/bin/storescu")
# Debian's dcmtk 3.6.7 leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment:
# measured on loopback, storescp then answers each C-STORE about 45 ms late (delayed ACK), 32
# instances of 256x256 took 1.5 s instead of 0.09 s. A benchmark peer must not be handicapped.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SENDERS = ("appliance-scu", "dcmtk-storescu")
# Consoles: a pynetdicom storage SCP (ids without a suffix) and dcmtk storescp, as real consoles are
# not Python (ids "<sender>@dcmtk-storescp").
CONSOLES = ("pynetdicom", "dcmtk-storescp")
MEASURES = {
    "first_byte_to_last_response": "first byte sent -> last derived image's C-STORE response",
    # The added latency: what the operator waits for after the scanner has sent its last image.
    "last_image_to_last_response": "added latency: sender's last C-STORE response -> last derived image stored",
}
WIRE = "wire_floor"  # dcmtk storescu -> dcmtk storescp, one way, the same files, in the same run


class BenchError(RuntimeError):
    """The appliance did not deliver (rejected, failed, timed out): no number is better than a wrong one."""


def daemon_config(cfg: ApplianceConfig, pipeline: str | None, plan: Plan) -> ApplianceConfig:
    """``cfg`` with, when ``pipeline`` is given, every image series routed to it (to all destinations)."""
    cfg = cfg.model_copy(deep=True)
    if pipeline is not None:
        keep = [r for r in cfg.routes if r.data == "projections"]
        cfg.routes = keep + [RouteRule(name=f"bench: {pipeline}", data="images", pipeline=pipeline,
                                       destinations=list(cfg.destinations))]
    if plan.idle_seconds is not None:
        cfg.completion.idle_seconds = plan.idle_seconds
    return cfg


def send(sender: str, folder: Path, port: int, calling_ae: str) -> None:
    if sender == "appliance-scu":
        report = send_folder(folder, "127.0.0.1", port, calling_ae=calling_ae, called_ae="APPLIANCE")
        if not report.ok or not report.sent:
            raise BenchError(f"appliance SCU: {report.sent} sent, failed: {report.failed[:3]}")
        return
    files = sorted(folder.glob("*.dcm"))
    out = subprocess.run([str(STORESCU), "-v", "-aet", calling_ae, "-aec", "APPLIANCE", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=1800, env=DCMTK_ENV)
    ok = out.stdout.count("(Success)") + out.stderr.count("(Success)")
    if out.returncode != 0 or ok != len(files):
        raise BenchError(f"dcmtk storescu: exit {out.returncode}, {ok} of {len(files)} stored: "
                         f"{(out.stderr or out.stdout)[-500:]}")


class E2E:
    def __init__(self, cfg: ApplianceConfig, plan: Plan, work: Path, bank: StudyBank, progress: Progress,
                 pipeline: str | None, console: str = "pynetdicom") -> None:
        self.plan, self.work, self.bank, self.progress = plan, Path(work), bank, progress
        self.console = console
        self.peer_port = free_port()
        if console == "dcmtk-storescp":
            from bench.ingest import DcmtkStoreSCP  # ingest imports this module

            self.peer = DcmtkStoreSCP(self.work, "console", ae_title="CONSOLE", port=self.peer_port,
                                      by_study=True).__enter__()
        else:
            self.peer = ReceivingPeer(self.work / "received", self.peer_port, keep_files=False)
        self.daemon = LoopbackDaemon(daemon_config(cfg, pipeline, plan), self.work / "daemon",
                                     console_port=self.peer_port, calling_ae="BENCH")
        self.pipeline = pipeline or "+".join(sorted({r.pipeline for r in self.daemon.cfg.routes
                                                     if r.data != "projections"}))
        self.events = None
        self.wire_scp = None  # dcmtk storescp for the wire's floor, started on first use

    @property
    def config(self) -> ApplianceConfig:
        return self.daemon.cfg

    def __enter__(self) -> E2E:
        self.daemon.start()
        self.events = self.daemon.subscribe()
        self.daemon.settle()
        return self

    def __exit__(self, *exc) -> None:
        if self.wire_scp is not None:
            self.wire_scp.__exit__()
        if self.events is not None:
            self.events.close()
        self.daemon.stop()
        self.peer.stop()

    def _delivered(self, study_uid: str, series_uid: str, expected: int) -> bool:
        bad = [e for e in self.events.events if e.series_uid == series_uid
               and (e.topic == "series.rejected" or (e.topic == "job.failed" and not e.will_retry))]
        if bad:
            raise BenchError(f"the appliance reported {bad[0].topic}: {bad[0]}")
        done = next((e for e in self.events.events if e.topic == "job.done" and e.series_uid == series_uid), None)
        want = done.instances if done is not None else expected
        return len(self.peer.study_arrivals(study_uid)) >= want

    def batch(self, shape: tuple[int, int, int], sender: str, concurrency: int) -> list[dict]:
        """Send ``concurrency`` fresh studies at once; per study: latencies and stage seconds."""
        studies = [self.bank.fresh(shape) for _ in range(concurrency)]
        times: list[dict] = [{} for _ in studies]
        errors: list[BaseException] = []

        def one(i: int, folder: Path) -> None:
            try:
                times[i]["t0"] = time.time()
                send(sender, folder, self.daemon.port, self.daemon.calling_ae)
                times[i]["t_sent"] = time.time()
            except BaseException as exc:  # reported below, in the bench's thread
                errors.append(exc)

        wire = self._wire_floor(studies[0][0]) if sender == "dcmtk-storescu" and concurrency == 1 else None
        threads = [threading.Thread(target=one, args=(i, s[0])) for i, s in enumerate(studies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors:
                raise BenchError(f"sending failed: {errors[0]}")
            timeout = 120 + 1.0 * shape[0] * concurrency
            for (folder, study_uid, series_uid) in studies:
                wait_until(lambda: self._delivered(study_uid, series_uid, shape[0]), timeout,
                           f"the derived series of {shape[0]} slices", self.daemon.proc, self.daemon.log_path)
            time.sleep(0.2)  # the last events (export.done) trail the last C-STORE response
            lasts = [max(self.peer.study_arrivals(study_uid)) for _, study_uid, _ in studies]
            makespan = max(lasts) - min(t["t0"] for t in times)
            return [{"first_byte": last - t["t0"], "last_image": last - t["t_sent"], "wire": wire,
                     "stages": daemon_stage_seconds(self.events.events, series_uid), "batch_makespan": makespan}
                    for (_, _, series_uid), t, last in zip(studies, times, lasts)]
        finally:
            for folder, *_ in studies:
                shutil.rmtree(folder, ignore_errors=True)

    def _wire_floor(self, folder: Path) -> float:
        """Seconds for dcmtk storescu to move ``folder`` one way into dcmtk storescp (no appliance)."""
        from bench.ingest import DcmtkStoreSCP  # ingest imports this module

        if self.wire_scp is None:
            self.wire_scp = DcmtkStoreSCP(self.work / "wire").__enter__()
        t0 = time.perf_counter()
        send("dcmtk-storescu", folder, self.wire_scp.port, "BENCH")
        seconds = time.perf_counter() - t0
        shutil.rmtree(self.wire_scp.out, ignore_errors=True)
        self.wire_scp.out.mkdir()
        return seconds

    def warm_up(self) -> None:
        shape = (min(self.plan.e2e_slices), *self.plan.e2e_in_plane)
        self.progress.status(f"e2e warm-up: one {shape[0]}-slice study through the daemon")
        self.batch(shape, "appliance-scu", 1)

    def measure(self, slices: int, sender: str, concurrency: int, batches: int) -> list[Result]:
        shape = (slices, *self.plan.e2e_in_plane)
        label = f"{shape[2]}x{shape[1]}x{slices}"
        samples: list[dict] = []
        for b in range(batches):
            self.progress.status(f"e2e {label} {sender} x{concurrency}: batch {b + 1}/{batches}")
            got = self.batch(shape, sender, concurrency)
            samples += got
            self.progress.sample(f"e2e {label} {sender} x{concurrency} batch {b + 1}/{batches}",
                                 max(s["first_byte"] for s in got), "s (slowest study)")
        who = sender if self.console == "pynetdicom" else f"{sender}@{self.console}"
        params = {"pipeline": self.pipeline, "slices": slices, "rows": shape[1], "cols": shape[2], "sender": who,
                  "concurrency": concurrency, "console": self.console}
        base = f"e2e/{self.pipeline}/{label}/{who}/c{concurrency}"
        stage_names: list[str] = []
        for s in samples:
            stage_names += [k for k in s["stages"] if k not in stage_names]
        stages = {k: [s["stages"][k] for s in samples if k in s["stages"]] for k in stage_names}
        extra = {}
        if concurrency > 1:  # every study of a batch carries its batch's makespan
            makespans = [s["batch_makespan"] for s in samples[::concurrency]]
            extra["batch_makespan_s_p50"] = float(np.median(makespans))
        results = []
        wire = None
        if all(s["wire"] is not None for s in samples):
            wire = measured(f"{base}/{WIRE}", "e2e",
                            f"the wire's floor for the same {label} files: dcmtk storescu -> dcmtk storescp, one way",
                            [s["wire"] for s in samples], metric="latency", unit="s", better="lower",
                            warmup=self.plan.warmup, params={**params, "measure": WIRE})
        for measure, what in MEASURES.items():
            key = "first_byte" if measure.startswith("first") else "last_image"
            result = measured(
                f"{base}/{measure}", "e2e",
                f"{self.pipeline}, {label} CT, {sender} -> appliance -> {self.console}, {concurrency} at once: {what}",
                [s[key] for s in samples], metric="latency", unit="s", better="lower", warmup=self.plan.warmup,
                params={**params, "measure": measure},
                stages=stages if key == "first_byte" else None, extra=extra)
            if wire is not None and key == "first_byte":  # end to end as a multiple of the wire's floor
                result.peer = Peer(name="dcmtk storescu -> storescp one way", id=wire.id, stats=wire.stats,
                                   ratio=result.stats.p50 / wire.stats.p50)
            results.append(result)
        return results + ([wire] if wire is not None else [])




def run(cfg: ApplianceConfig, plan: Plan, work: Path, bank: StudyBank, progress: Progress,
        pipeline: str | None = "denoise") -> tuple[list[Result], dict]:
    """Every e2e configuration of ``plan``; the results and the daemon's effective configuration.

    Then, where dcmtk is installed, the reference size sent by dcmtk storescu and received by dcmtk
    storescp as the console, with the wire's floor beside it: for ``pipeline`` and for
    ``passthrough`` (the appliance's own plumbing, nothing computed)."""
    dcmtk = STORESCU.exists() and Path("/usr/bin/storescp").exists()
    senders = list(SENDERS) if dcmtk else ["appliance-scu"]
    if not dcmtk:
        progress.note("e2e: dcmtk not installed (/usr/bin/storescu, storescp); only the appliance SCU sends")
    results: list[Result] = []
    with E2E(cfg, plan, work, bank, progress, pipeline) as e2e:
        for _ in range(plan.warmup):
            e2e.warm_up()
        for slices, n in sorted(plan.e2e_slices.items()):
            for sender in senders if slices == plan.e2e_reference_slices else senders[:1]:
                results += e2e.measure(slices, sender, 1, n)
        for concurrency, n in sorted(plan.e2e_concurrency.items()):
            results += e2e.measure(plan.e2e_concurrency_slices, "appliance-scu", concurrency, n)
        config = e2e.config.model_dump(mode="json")
    if dcmtk:
        n = plan.e2e_slices.get(plan.e2e_reference_slices, 1)
        for name in dict.fromkeys([pipeline, "passthrough"]):
            with E2E(cfg, plan, work / f"dcmtk-{name}", bank, progress, name, console="dcmtk-storescp") as e2e:
                for _ in range(plan.warmup):
                    e2e.warm_up()
                results += e2e.measure(plan.e2e_reference_slices, "dcmtk-storescu", 1, n)
    return results, config


def steps(plan: Plan) -> int:
    n = sum(plan.e2e_slices.values()) + plan.e2e_slices.get(plan.e2e_reference_slices, 0)
    return n + sum(plan.e2e_concurrency.values()) + 2 * plan.e2e_slices.get(plan.e2e_reference_slices, 0)
