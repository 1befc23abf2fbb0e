"""Ingest throughput: the same study, sent by the same sender (dcmtk storescu, one association),
into the appliance's SCP, into dcmtk's storescp and into a bare pynetdicom storage SCP (the library
the appliance receives with, its handler answering success at once: the floor of that library on
this machine) on the same machine; and export throughput: the same files sent into that storescp by
the appliance's exporter and by dcmtk storescu.

A sample is the wall time of one storescu run, from its start to its exit after the last C-STORE
response (process start and file reading are the same for both receivers, so they cancel in the
ratio). The appliance's completion timer is set far out during this scenario so that no assembly
runs while a sample is being taken: it measures receiving, nothing else. Note what differs: the
appliance answers a C-STORE only after the instance is fsynced and indexed (nothing received is
lost); storescp writes its file without fsync. The ratio is appliance / storescp throughput.
Both dcmtk programs run with ``TCP_NODELAY=1`` (see `bench.e2e.DCMTK_ENV`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
import subprocess
import time

import numpy as np
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.loopback import LoopbackDaemon, free_port, wait_until
from bench.e2e import DCMTK_ENV, STORESCU, BenchError, send
from bench.plan import Plan
from bench.progress import Progress
from bench.schema import Peer, Result, measured
from bench.studies import StudyBank

STORESCP = Path("/usr/bin/storescp")


class DcmtkStoreSCP:
    """dcmtk storescp (TCP_NODELAY=1) writing under ``work/name``; ``by_study``: one folder per
    study (``-su``), so a console's arrivals can be told apart per study."""

    def __init__(self, work: Path, name: str = "storescp", ae_title: str = "APPLIANCE", port: int | None = None,
                 by_study: bool = False) -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.out = Path(work) / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Path(work) / f"{name}.log"
        sort = ["-su", "study"] if by_study else []
        self.proc = subprocess.Popen([str(STORESCP), "-aet", ae_title, *sort, "-od", str(self.out), str(self.port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=DCMTK_ENV)

    def __enter__(self) -> DcmtkStoreSCP:
        from appliance.dicom.scu import SendError, echo

        def ready() -> bool:
            try:
                return echo("127.0.0.1", self.port, called_ae=self.ae_title, timeout_s=2) == 0
            except SendError:
                return False

        wait_until(ready, 20, "dcmtk storescp to answer C-ECHO", self.proc, self.log, poll_s=0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    # As a console (`bench.e2e`): the same two calls as `appliance.loopback.ReceivingPeer`.
    def study_arrivals(self, study_uid: str) -> list[float]:
        """When each instance of the study was stored: its file's modification time (storescp
        writes the file, then answers)."""
        out = []
        for folder in self.out.glob(f"*_{study_uid}"):
            for f in folder.iterdir():
                try:
                    out.append(f.stat().st_mtime)
                except FileNotFoundError:
                    pass
        return out

    def stop(self) -> None:
        self.__exit__()


def steps(plan: Plan) -> int:
    return 4 * plan.ingest_samples if STORESCU.exists() and STORESCP.exists() else 0


class BarePynetdicomSCP:
    """pynetdicom's storage SCP with nothing behind it: the dataset is written to a temporary file
    as the appliance's receiver has it written (chunked), and the handler answers success at once
    (no parse, no fsync, no index). TCP_NODELAY as the appliance. The same presentation contexts
    as the appliance's SCP."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        from appliance.dicom import scp as appliance_scp  # sets the chunked receive, as the appliance
        from appliance.dicom.sop import STORAGE_SOP_CLASSES, accepted_transfer_syntaxes

        self.ae = AE(ae_title="BARE")
        self.ae.maximum_pdu_size = 0
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, accepted_transfer_syntaxes())
        self.port = free_port()
        self._server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: appliance_scp.set_nodelay(e.assoc)),
                          (evt.EVT_C_STORE, lambda e: 0x0000)])

    def __enter__(self) -> BarePynetdicomSCP:
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()


def _samples(what: str, transfer: Callable[[Path], None], plan: Plan, bank: StudyBank, progress: Progress,
             clear: Path | None) -> list[float]:
    """Instances/s of ``transfer(folder)`` over fresh copies of the ingest study (warm-up first).
    ``clear``: the receiver's folder, emptied after each sample (only the transfer is measured,
    not the disk filling up)."""
    shape = plan.ingest_shape
    out = []
    for i in range(plan.warmup + plan.ingest_samples):
        folder, *_ = bank.fresh(shape)
        try:
            warm = i < plan.warmup
            progress.status(f"{what}: " + ("warm-up" if warm else f"sample {i - plan.warmup + 1}"))
            t0 = time.perf_counter()
            transfer(folder)
            seconds = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if clear is not None:
                shutil.rmtree(clear, ignore_errors=True)
                clear.mkdir()
        if not warm:
            out.append(shape[0] / seconds)
            progress.sample(what, out[-1], "instances/s")
    return out


def _export(scp: DcmtkStoreSCP, folder: Path) -> None:
    """The appliance's export path (`appliance.dicom.export.Link`: one association, then each
    file's bytes) into ``scp``: the same files storescu sends."""
    from appliance.config import Destination
    from appliance.dicom.export import Link

    link = Link(Destination(ae_title=scp.ae_title, host="127.0.0.1", port=scp.port), "BENCH", 60)
    for path in sorted(folder.glob("*.dcm")):
        link.send(path)
    link.close()


def run(cfg: ApplianceConfig, plan: Plan, work: Path, bank: StudyBank, progress: Progress) -> list[Result]:
    if not (STORESCU.exists() and STORESCP.exists()):
        raise BenchError("dcmtk is not installed (/usr/bin/storescu, /usr/bin/storescp): `make test` installs it")
    shape = plan.ingest_shape
    base = bank.base(shape)
    nbytes = sum(p.stat().st_size for p in base.glob("*.dcm"))
    label = f"{shape[2]}x{shape[1]}x{shape[0]}"
    cfg = cfg.model_copy(deep=True)
    cfg.completion.idle_seconds = 24 * 3600.0  # receive only: nothing completes during the scenario
    cfg.completion.expected_count_tags = []
    cfg.completion.on_release = False
    cfg.streaming.enabled = False  # nor is anything streamed: e2e measures receiving beside processing
    daemon = LoopbackDaemon(cfg, Path(work) / "ingest-daemon", console_port=free_port(), calling_ae="BENCH")
    daemon.start()
    try:
        mine = _samples("ingest into appliance", lambda f: send("dcmtk-storescu", f, daemon.port, daemon.calling_ae),
                        plan, bank, progress, None)
    finally:
        daemon.stop()
        shutil.rmtree(daemon.workdir / "spool", ignore_errors=True)
    with BarePynetdicomSCP() as bare:
        library = _samples("ingest into bare pynetdicom", lambda f: send("dcmtk-storescu", f, bare.port, "BENCH"),
                           plan, bank, progress, None)
    with DcmtkStoreSCP(Path(work)) as scp:
        theirs = _samples("ingest into dcmtk-storescp", lambda f: send("dcmtk-storescu", f, scp.port, "BENCH"),
                          plan, bank, progress, scp.out)
        exported = _samples("export into dcmtk-storescp", lambda f: _export(scp, f), plan, bank, progress, scp.out)
    params = {"sender": "dcmtk-storescu", "slices": shape[0], "rows": shape[1], "cols": shape[2], "bytes": nbytes}
    mb = nbytes / shape[0] / 1e6  # MB per instance

    def result(receiver: str, samples: list[float], peer: Peer | None = None) -> Result:
        return measured(f"ingest/{receiver}/{label}/dcmtk-storescu", "ingest",
                        f"receive {shape[0]} CT instances of {label} ({nbytes / 1e6:.0f} MB) into {receiver}",
                        samples, metric="instances_per_s", unit="1/s", better="higher", warmup=plan.warmup,
                        params={**params, "receiver": receiver}, peer=peer,
                        extra={"mb_per_s": float(np.median(samples) * mb)})

    peer_result = result("dcmtk-storescp", theirs)
    export = measured(f"ingest/dcmtk-storescp/{label}/appliance-exporter", "ingest",
                      f"send {shape[0]} CT instances of {label} ({nbytes / 1e6:.0f} MB) with the appliance's exporter "
                      "(one association, the files' bytes) into dcmtk storescp",
                      exported, metric="instances_per_s", unit="1/s", better="higher", warmup=plan.warmup,
                      params={**params, "sender": "appliance-exporter", "receiver": "dcmtk-storescp"},
                      peer=Peer(name="dcmtk storescu", id=peer_result.id, stats=peer_result.stats,
                                ratio=float(np.median(exported)) / peer_result.stats.p50),
                      extra={"mb_per_s": float(np.median(exported) * mb)})
    def against_storescp(samples: list[float]) -> Peer:
        return Peer(name="dcmtk storescp", id=peer_result.id, stats=peer_result.stats,
                    ratio=float(np.median(samples)) / peer_result.stats.p50)

    return [result("appliance", mine, against_storescp(mine)), peer_result, export,
            result("pynetdicom-bare", library, against_storescp(library))]
