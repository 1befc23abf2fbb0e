"""The Storage SCP: a thin skin of pynetdicom event handlers.

Each handler does one thing and returns a DICOM status. C-STORE checks the header
(`validate.read_header`) while a helper thread hashes and fsyncs the received file (both wait on
different things: the parse on the interpreter, the fsync on the disk), writes the instance to the
spool and returns: no pixel decoding and no heavy work on the association thread. Peers not allowed by the configuration are refused at
association time (A-ASSOCIATE-RJ).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification

from appliance import audit
from appliance.config import ApplianceConfig
from appliance.dicom import admission, tls
from appliance.dicom.sop import STORAGE_SOP_CLASSES, accepted_transfer_syntaxes
from appliance.dicom.spool import Spool, StoreOutcome, hash_and_fsync
from appliance.dicom.validate import (STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, InstanceHeader,
                                      InstanceRefused, read_header)
from appliance.logging import get_logger

log = get_logger(__name__)

# The received dataset arrives as a file on disk (event.dataset_path), not decoded in memory.
_config.STORE_RECV_CHUNKED_DATASET = True

# A-ASSOCIATE-RJ: (result, source, diagnostic), PS3.8 9.3.4
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised

StoredCallback = Callable[[StoreOutcome, InstanceHeader], None]
ReleasedCallback = Callable[[list[str]], None]


def set_nodelay(assoc) -> None:
    """TCP_NODELAY on an association's socket: DICOM is request/response, and Nagle's algorithm
    against the peer's delayed ACK costs up to ~40 ms per C-STORE on loopback (measured)."""
    try:
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # a closed or non-TCP socket: nothing to tune


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ReceivedFile:
    """The file pynetdicom writes one received dataset into (in place of its NamedTemporaryFile).

    A full disk while it is created or written must not raise in pynetdicom's reactor thread: that
    kills the association, and every sender on it gets no answer. Here the bytes are dropped
    instead, the blocks already written are given back, and ``out_of_space`` tells the C-STORE
    handler to answer 0xA700 (out of resources: the sender retries later). Other errors raise
    as before."""

    def __init__(self, folder: Path, **_ignored) -> None:
        self.out_of_space = False
        self._f = None
        try:
            self._f = tempfile.NamedTemporaryFile(dir=str(folder), prefix="recv-", suffix=".dcm", delete=False,
                                                  mode="wb")
            self.name = self._f.name
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            self.out_of_space = True
            self.name = str(Path(folder) / f"recv-unwritten-{uuid.uuid4().hex}.dcm")

    @property
    def file(self) -> ReceivedFile:  # pynetdicom calls ``.file.flush()``
        return self

    def _full(self, exc: OSError) -> None:
        if exc.errno not in _DISK_FULL:
            raise exc
        self.out_of_space = True
        try:
            os.ftruncate(self._f.fileno(), 0)  # give the space back at once
        except OSError:
            pass

    def write(self, data) -> int:
        if not self.out_of_space:
            try:
                return self._f.write(data)
            except OSError as exc:
                self._full(exc)
        return len(data)

    def flush(self) -> None:
        if not self.out_of_space:
            try:
                self._f.flush()
            except OSError as exc:
                self._full(exc)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError as exc:  # the buffer's last flush on a full disk: the file is closed anyway
                if exc.errno not in _DISK_FULL:
                    raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _write_received_into(folder: Path) -> None:
    """pynetdicom writes each received dataset to a NamedTemporaryFile; put it in the spool's
    ``incoming/`` so that storing is a rename, not a copy (same file system), through
    `ReceivedFile` (a full disk answers 0xA700)."""
    dimse_messages.NamedTemporaryFile = functools.partial(ReceivedFile, Path(folder))


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment.replace("\\", "/")[:64]  # LO: 64 characters, no backslash (a value separator)
    return ds


@dataclass
class _Transfer:
    """What one association stored (by study) and refused, for its audit message."""

    studies: dict[str, audit.StudyTransfer] = field(default_factory=dict)
    refused: int = 0


class StorageSCP:
    """Accepts C-ECHO and C-STORE into the spool. ``on_stored(outcome, header)`` is called
    after every successful store, ``on_released(series_uids)`` when an association that stored
    instances is released and no other association is still storing into those series (both from
    the association thread: keep them cheap, hand over and return)."""

    def __init__(self, cfg: ApplianceConfig, spool: Spool, on_stored: StoredCallback | None = None,
                 on_released: ReleasedCallback | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.on_released = on_released
        self.ae = self._make_ae()
        self._servers: list = []
        self._lock = threading.Lock()
        self._assoc_series: dict[int, set[str]] = defaultdict(set)  # id(association) -> series it stored into
        self._series_assocs: dict[str, int] = defaultdict(int)  # series -> associations storing into it
        self._fsyncs = ThreadPoolExecutor(max_workers=cfg.node.max_associations, thread_name_prefix="scp-fsync")
        self.audit = cfg.audit_trail()
        self._transfers: dict[int, _Transfer] = {}  # id(association) -> what it did, audited when it ends

    def _make_ae(self) -> AE:
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_bytes
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    @property
    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_gone),
            (evt.EVT_CONN_CLOSE, self._on_gone),
        ]

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        node, tls_cfg = self.cfg.node, self.cfg.tls
        _write_received_into(self.spool.incoming)
        admission.bound_pdu_reads()
        self.admission = admission.Admission(
            self.cfg.peers.source_allowed, node.max_connections_per_source, node.max_pending_connections,
            node.request_timeout_s, on_refused=self._connection_refused,
        )
        tls_context = tls.server_context(tls_cfg) if tls_cfg.port is not None else None  # bad files: fail here
        servers = []
        try:
            if tls_cfg.plain:
                servers.append(admission.start_server(self.ae, (node.bind_address, node.port), self.handlers,
                                                      self.admission))
            if tls_context is not None:
                servers.append(admission.start_server(self.ae, (node.bind_address, tls_cfg.port), self.handlers,
                                                      self.admission, tls_context))
        except BaseException:
            for server in servers:
                server.shutdown()
            raise
        self._servers = servers
        log.info(
            "scp.listening",
            ae_title=node.ae_title,
            address=node.bind_address,
            port=self.port if tls_cfg.plain else None,
            tls_port=self.tls_port,
            verify_clients=tls_cfg.verify_clients if tls_context is not None else None,
            transfer_syntaxes=len(accepted_transfer_syntaxes()),
        )

    def _listening(self, secure: bool):
        return next((s for s in self._servers if (s.tls_context is not None) == secure), None)

    @property
    def port(self) -> int:
        """The plain listener's port (the TLS one's when there is no plain listener)."""
        server = self._listening(False) or self._listening(True)
        return server.server_address[1] if server else self.cfg.node.port

    @property
    def tls_port(self) -> int | None:
        server = self._listening(True)
        return server.server_address[1] if server else self.cfg.tls.port

    @property
    def alive(self) -> bool:
        return bool(self._servers)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let running associations finish (up to the timeout), then abort the rest."""
        if not self._servers:
            return
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()  # first: no association can start after the list below is taken
        active = [a for server in servers for a in server.active_associations]
        deadline = time.monotonic() + drain_timeout_s
        for assoc in active:
            assoc.join(max(0.0, deadline - time.monotonic()))
        leftover = [a for a in active if a.is_alive()]
        for assoc in leftover:
            assoc.abort()
        self._fsyncs.shutdown(wait=True)
        self.audit.close()
        log.info("scp.stopped", drained=len(active) - len(leftover), aborted=len(leftover))

    # ---- handlers --------------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc)

    def _connection_refused(self, address: str, reason: str) -> None:
        self.audit.security_alert(audit.NODE_AUTHENTICATION, audit.MINOR_FAILURE, address,
                                  f"connection from {address} refused before association: {reason}",
                                  peer=audit.Node("", address, requestor=True), fold_key=f"{reason}:{address}")

    def _transfer(self, assoc) -> _Transfer:
        with self._lock:
            return self._transfers.setdefault(id(assoc), _Transfer())

    def _audit_transfer(self, assoc) -> None:
        """DICOM Instances Transferred for what an association that has ended stored."""
        with self._lock:
            done = self._transfers.pop(id(assoc), None)
        if done is None:
            return
        requestor, studies, refused = assoc.requestor, done.studies, done.refused
        stored = sum(sum(s.sop_classes.values()) for s in studies.values())
        outcome = audit.MINOR_FAILURE if refused else audit.SUCCESS
        description = f"{stored} instance(s) stored" + (f", {refused} refused" if refused else "")
        identity = tls.peer_identity(getattr(assoc.dul.socket, "socket", None))
        self.audit.instances_transferred(
            "C", audit.Node(str(requestor.ae_title or "").strip(), requestor.address, requestor=True),
            audit.Node(self.cfg.node.ae_title, assoc.acceptor.address or None), studies, outcome,
            description + (f"; TLS client {identity}" if identity else ""))

    def _track(self, assoc, series_uid: str) -> None:
        with self._lock:
            mine = self._assoc_series[id(assoc)]
            if series_uid not in mine:
                mine.add(series_uid)
                self._series_assocs[series_uid] += 1

    def _untrack(self, assoc) -> list[str]:
        """Forget the association; the series no other association is storing into now."""
        with self._lock:
            mine = self._assoc_series.pop(id(assoc), set())
            idle = []
            for uid in mine:
                self._series_assocs[uid] -= 1
                if self._series_assocs[uid] <= 0:
                    del self._series_assocs[uid]
                    idle.append(uid)
        return idle

    def _on_released(self, event: evt.Event) -> None:
        # The sender released the association normally: it says it is done (for now).
        self._audit_transfer(event.assoc)
        series = self._untrack(event.assoc)
        if series and self.on_released is not None:
            self.on_released(series)

    def _on_gone(self, event: evt.Event) -> None:
        # Aborted or dropped: no statement that the series is whole; the idle timer decides.
        self._audit_transfer(event.assoc)
        self._untrack(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        # requestor.ae_title is only filled in during negotiation, after this event: read the request.
        calling = str(requestor.primitive.calling_ae_title).strip()
        # The source address was checked when the connection was accepted (`admission`).
        if not self.cfg.peers.calling_ae_allowed(calling):
            self._reject(event, "calling_ae_not_allowed", calling, _REJECT_CALLING_AE)

    def _reject(self, event: evt.Event, reason: str, calling: str, rsd: tuple[int, int, int]) -> None:
        address = event.assoc.requestor.address
        log.warning("scp.association_rejected", reason=reason, calling_ae=calling, peer_address=address)
        self.audit.security_alert(audit.NODE_AUTHENTICATION, audit.MINOR_FAILURE, address,
                                  f"association from {calling!r} at {address} rejected: {reason}",
                                  peer=audit.Node(calling, address, requestor=True),
                                  fold_key=f"{reason}:{calling}:{address}")
        assoc = event.assoc
        # As pynetdicom's own acceptor does: queue the A-ASSOCIATE-RJ, let the DUL send it and
        # stop, and mark the association rejected so no negotiation follows.
        assoc.acse.send_reject(*rsd)
        assoc.kill()
        assoc.is_rejected = True

    def _note_stored(self, assoc, header: InstanceHeader) -> None:
        studies = self._transfer(assoc).studies
        study = studies.get(header.study_uid)
        if study is None:
            study = studies[header.study_uid] = audit.StudyTransfer.of(
                header.dataset if header.dataset is not None else Dataset())
        study.add(header.sop_class_uid)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset | int:
        requestor = event.assoc.requestor
        calling = requestor.ae_title.strip()
        address = requestor.address
        path = Path(event.dataset_path)
        request = event.request
        received = getattr(request, "_dataset_file", None)
        if getattr(received, "out_of_space", False):
            detail = "the disk filled while the instance was being received"
            log.warning("scp.instance_refused", reason="out_of_space", detail=detail, status="0xA700",
                        calling_ae=calling, sop_instance_uid=str(request.AffectedSOPInstanceUID))
            self.spool.record_refused(None, "out_of_space", detail, calling, address)
            self._transfer(event.assoc).refused += 1
            return _status(STATUS_OUT_OF_RESOURCES, f"out_of_space: {detail}")
        prepared = self._fsyncs.submit(hash_and_fsync, path)
        try:
            header = read_header(
                path,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                self.cfg.completion.expected_count_tags,
                max_inflated_bytes=self.cfg.limits.max_inflated_bytes,
                max_pixel_bytes=self.cfg.limits.max_bytes_per_instance,
            )
            outcome = self.spool.store(path, header, calling, address, move=True, sha256=prepared.result())
        except InstanceRefused as refusal:
            log.warning("scp.instance_refused", reason=refusal.reason, detail=refusal.detail,
                        status=f"0x{refusal.status:04X}", calling_ae=calling,
                        sop_instance_uid=str(request.AffectedSOPInstanceUID))
            self.spool.record_refused(path, refusal.reason, refusal.detail, calling, address)
            self._transfer(event.assoc).refused += 1
            return _status(refusal.status, f"{refusal.reason}: {refusal.detail}")
        except (OSError, sqlite3.Error) as exc:  # disk or index trouble: out of resources, retry later
            log.error("scp.store_failed", error=str(exc), calling_ae=calling)
            self._transfer(event.assoc).refused += 1
            return _status(STATUS_OUT_OF_RESOURCES, f"storage error: {getattr(exc, 'strerror', None) or exc}")
        except Exception as exc:  # never let one instance take the association down unanswered
            log.exception("scp.store_failed", calling_ae=calling)
            return _status(STATUS_CANNOT_UNDERSTAND, f"{type(exc).__name__}: {exc}")
        finally:
            prepared.exception()  # the helper is done with the file before pynetdicom removes it
        log.debug("scp.stored", kind=outcome.kind, series_uid=header.series_uid,
                  sop_instance_uid=header.sop_instance_uid)
        self._track(event.assoc, header.series_uid)
        self._note_stored(event.assoc, header)
        if self.on_stored is not None:
            self.on_stored(outcome, header)
        return 0x0000
