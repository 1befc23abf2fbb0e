"""C-ECHO and C-STORE SCU: ``appliance echo`` and ``appliance send``.

A folder is sent one association per series (associations are not shared between series or
threads); each association proposes exactly the (SOP class, transfer syntax) pairs its files use.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification

from appliance.logging import get_logger

log = get_logger(__name__)

MAX_CONTEXTS = 128  # an SCU may propose at most 128 presentation contexts

# Send files as their bytes on disk instead of decoding and re-encoding each dataset: faster, and
# the peer receives exactly what is in the file.
_config.STORE_SEND_CHUNKED_DATASET = True


def _nodelay(event: evt.Event) -> None:
    from appliance.dicom.scp import set_nodelay

    set_nodelay(event.assoc)


NODELAY = [(evt.EVT_CONN_OPEN, _nodelay)]


class _ParkedCheckpoint(threading.Event):
    """A requestor association's reactor checkpoint that keeps pynetdicom's reactor parked for as
    long as the one thread using the association sends on it.

    Why: for each operation pynetdicom pauses the association's reactor (``clear()``, then polls
    ``_is_paused``) and restarts it afterwards (``set()``). The poll can still read the True of the
    previous pause while the reactor has not yet woken from the previous ``set()``; the reactor then
    takes the next response off the queue ("Received unexpected C-STORE service message") and the
    operation waits out its DIMSE timeout. Seen in the 2-core bench under load: a 30 s export stall
    and one instance stored twice at the console. Parked, the reactor never reads the queue; it is
    woken only to release, abort or end the association (`close_parked`)."""

    def __init__(self, assoc) -> None:
        super().__init__()
        self._assoc = assoc
        self.parked = True
        self.reactor_waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.reactor_waiting.set()
        try:
            return super().wait(timeout)
        finally:
            self.reactor_waiting.clear()

    def set(self) -> None:
        a = self._assoc
        if self.parked and a.is_established and not (a._kill or a._sent_abort or a.is_released):
            return  # an operation ended: the reactor stays parked
        super().set()

    def unpark(self) -> None:
        self.parked = False
        super().set()


def park_reactor(assoc, timeout_s: float = 5.0) -> _ParkedCheckpoint | None:
    """Park an established requestor association's reactor (see `_ParkedCheckpoint`) before the
    first operation; None when it is not established."""
    if not assoc.is_established:
        return None
    checkpoint = _ParkedCheckpoint(assoc)
    previous, assoc._reactor_checkpoint = assoc._reactor_checkpoint, checkpoint
    previous.set()  # it is set already; the reactor ends its round and waits on the new one
    if not checkpoint.reactor_waiting.wait(timeout_s):
        log.warning("scu.reactor_not_parked", note="the association's reactor did not reach its checkpoint")
    return checkpoint


def peer_closing(assoc) -> bool:
    """The peer aborted or asked to release (what the parked reactor would otherwise notice)."""
    return isinstance(assoc.dul.peek_next_pdu(), (A_ABORT, A_P_ABORT, A_RELEASE))


def usable(assoc) -> bool:
    return assoc.is_established and assoc.dul.is_alive() and not peer_closing(assoc)


def close_parked(assoc, checkpoint: _ParkedCheckpoint | None, timeout_s: float = 10.0) -> None:
    """Release a parked association (or, when the peer is closing it, let the reactor answer),
    and wake the reactor so that its thread ends."""
    try:
        if usable(assoc):
            assoc.release()
    finally:
        if checkpoint is not None:
            checkpoint.unpark()
        assoc.join(timeout_s)


class MessageIds:
    """Message IDs for the operations of one association: 1, 2, ... (PS3.7 9.1.1.1.1: unique
    among the operations in progress; kept distinct so a late response cannot be taken for the
    next one's)."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next = self._next % 0xFFFF + 1
        return self._next


class SendError(Exception):
    pass


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, status or reason)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # not DICOM
    series: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def echo(host: str, port: int, calling_ae: str = "APPLIANCE_SCU", called_ae: str = "ANY-SCP", timeout_s: float = 10) -> int:
    """C-ECHO; returns the status (0 on success). Raises SendError when no association is made."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SendError(f"no association with {called_ae}@{host}:{port} (rejected, aborted or unreachable)")
    try:
        status = assoc.send_c_echo()
        if not status:
            raise SendError("no C-ECHO response (timeout or aborted)")
        return int(status.Status)
    finally:
        assoc.release()


def _scan(folder: Path) -> tuple[dict[str, list[tuple[Path, str, str, int]]], list[tuple[Path, str]]]:
    """Files by series UID: (path, SOP class, transfer syntax, instance number); and skipped files."""
    by_series: dict[str, list[tuple[Path, str, str, int]]] = defaultdict(list)
    skipped = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key = str(ds.SeriesInstanceUID)
            by_series[key].append(
                (path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), int(ds.get("InstanceNumber") or 0))
            )
        except Exception as exc:
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
    return by_series, skipped


def send_folder(
    folder: Path,
    host: str,
    port: int,
    calling_ae: str = "APPLIANCE_SCU",
    called_ae: str = "ANY-SCP",
    timeout_s: float = 30,
) -> SendReport:
    """Send every DICOM file under ``folder``; one association per series."""
    by_series, skipped = _scan(Path(folder))
    report = SendReport(skipped=skipped)
    for series_uid, files in by_series.items():
        report.series += 1
        files.sort(key=lambda f: (f[3], f[0].name))
        contexts = sorted({(f[1], f[2]) for f in files})
        if len(contexts) > MAX_CONTEXTS:
            report.failed.extend((f[0], "too many SOP class/transfer syntax pairs in one series") for f in files)
            continue
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=NODELAY)
        if not assoc.is_established:
            report.failed.extend((f[0], "association refused or peer unreachable") for f in files)
            continue
        checkpoint = park_reactor(assoc)
        next_id = MessageIds()
        try:
            for path, *_ in files:
                if not usable(assoc):
                    report.failed.append((path, "association lost"))
                    continue
                try:
                    status = assoc.send_c_store(path, msg_id=next_id())
                except Exception as exc:
                    report.failed.append((path, f"{type(exc).__name__}: {exc}"))
                    continue
                code = int(status.Status) if status and "Status" in status else None
                if code is not None and (code == 0 or code & 0xF000 == 0xB000):  # success or warning
                    report.sent += 1
                else:
                    comment = str(status.get("ErrorComment", "")) if status else ""
                    report.failed.append((path, f"status 0x{code:04X} {comment}".strip() if code is not None else "no response"))
        finally:
            close_parked(assoc, checkpoint)
        log.info("scu.series_sent", series_uid=series_uid, instances=len(files))
    return report
