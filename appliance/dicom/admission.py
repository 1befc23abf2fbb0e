"""Admission before negotiation: who gets a connection, and for how long before it says who it is.

pynetdicom starts an association thread for every TCP connection and counts it against the
association limit until its A-ASSOCIATE-RQ arrives or `acse_timeout` passes, even when the peer
has long gone; the allow-lists are consulted only after a complete request. So 16 connections that
send 30 bytes and close locked every sender out for 30 s. Here, in front of pynetdicom:

1. **At accept**, on the server's thread, before any byte is read: a source outside
   ``peers.allowed_source_networks`` is refused, and so is a source already holding
   ``node.max_connections_per_source`` connections, or any source once
   ``node.max_pending_connections`` connections are still waiting for their request. A refusal is
   an A-ASSOCIATE-RJ (a sender reads why) and the socket is closed.
2. **Until the request is whole**, on the connection's own thread: the A-ASSOCIATE-RQ must be in
   the socket's buffer (read with MSG_PEEK, so pynetdicom still reads it itself) within
   ``node.request_timeout_s``; a peer that closes first is let go at once, one that sends something
   else (a TLS ClientHello on the plain port, an unknown PDU) or a request over
   `MAX_REQUEST_BYTES` is refused. Only then does pynetdicom create the association, so a
   half-open connection never holds an association slot. On the TLS port the handshake must
   finish within the same time (the request is then read by pynetdicom: TLS cannot peek).
3. **PDU lengths**: pynetdicom reads whatever length a PDU header declares into memory; here a
   P-DATA-TF PDU longer than the maximum the appliance announced, or any other PDU longer than a
   request could be, aborts the association before its body is read (`bound_pdu_reads`).

A connection's slot (its count against its source) is given back when its association ends.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from appliance.logging import get_logger

log = get_logger(__name__)

MAX_REQUEST_BYTES = 256 * 1024  # an A-ASSOCIATE-RQ with 128 contexts and a user identity is a few dozen KiB
_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
RJ_NOT_ALLOWED = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded
RJ_CONGESTION = (0x02, 0x03, 0x01)  # transient, service provider (presentation), temporary congestion


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, reason)


class Admission:
    """Connection counts per source address, and the decisions made from them."""

    def __init__(self, source_allowed: Callable[[str], bool], max_per_source: int, max_pending: int,
                 request_timeout_s: float, on_refused: Callable[[str, str], None] | None = None) -> None:
        self.source_allowed = source_allowed
        self.max_per_source = max_per_source
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self.on_refused = on_refused
        self._lock = threading.Lock()
        self._connections: Counter[str] = Counter()
        self._pending = 0

    def admit(self, address: str) -> tuple[int, int, int] | None:
        """Count a new connection from ``address``; or the A-ASSOCIATE-RJ to refuse it with."""
        if not self.source_allowed(address):
            self.refused(address, "source_not_allowed")
            return RJ_NOT_ALLOWED
        with self._lock:
            if self._connections[address] >= self.max_per_source:
                reason = "too_many_connections_from_source"
            elif self._pending >= self.max_pending:
                reason = "too_many_pending_connections"
            else:
                self._connections[address] += 1
                self._pending += 1
                return None
        self.refused(address, reason)
        return RJ_LOCAL_LIMIT

    def requested(self) -> None:
        """The connection's request arrived (or it failed): it no longer counts as pending."""
        with self._lock:
            self._pending -= 1

    def release(self, address: str) -> None:
        with self._lock:
            self._connections[address] -= 1
            if self._connections[address] <= 0:
                del self._connections[address]

    def refused(self, address: str, reason: str, event: str = "scp.connection_refused") -> None:
        """Say that a connection from ``address`` was refused or dropped, and why."""
        log.warning(event, reason=reason, peer_address=address)
        if self.on_refused is not None:
            self.on_refused(address, reason)

    def await_request(self, sock: socket.socket) -> str | None:
        """Wait (at most ``request_timeout_s``) until a whole A-ASSOCIATE-RQ is in ``sock``'s
        buffer; None when it is, else why the connection is let go."""
        deadline = time.monotonic() + self.request_timeout_s
        want = 6
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "request_timeout"
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                return "request_timeout"
            try:
                head = sock.recv(want, socket.MSG_PEEK)
            except OSError:
                return "connection_lost"
            if not head:
                return "closed_before_request"
            if head[0] != _A_ASSOCIATE_RQ:
                return "tls_on_plain_port" if head[0] == 0x16 else "not_an_association_request"
            if len(head) >= 6:
                length = struct.unpack_from(">L", head, 2)[0]
                if length > MAX_REQUEST_BYTES:
                    return "request_too_large"
                want = 6 + length
                if len(head) >= want:
                    return None
            if len(head) < want:
                if _peer_closed(sock):  # the rest will never come (peeked data hides the end of stream)
                    return "closed_before_request"
                # Part of what is wanted is there: wait for more without spinning on what is.
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))


_TCP_CLOSE_WAIT = 8  # linux/tcp_states.h: the peer sent its FIN


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE_WAIT
    except (OSError, AttributeError):
        return False


class _Refusals(threading.Thread):
    """Answers refused connections with their A-ASSOCIATE-RJ and closes them, all on one thread,
    so refusals cost the accept loop nothing.

    The rejection is sent `ANSWER_DELAY_S` after the sender's request has arrived (or after
    `ANSWER_WITHIN_S` of silence), not the moment the connection is accepted: pynetdicom's
    requestor checks that its connection is still open only after its request has gone, on
    another thread than the one that reads; a rejection that arrives before that thread has looked
    makes it report an abort instead of the rejection (measured: 4 to 15 of 200 refusals under
    load when answered at once, none of 300 with the delay). After it, the socket is drained until the sender
    closes (a requestor closes on a rejection) or `LINGER_S` passes: closing first, or with unread
    data (which sends a reset), can destroy the rejection before the sender reads it. At most
    `MAX_HELD` refused connections are held; past that a refusal is closed at once."""

    ANSWER_WITHIN_S = 1.0
    ANSWER_DELAY_S = 0.05
    LINGER_S = 2.0
    MAX_HELD = 256

    def __init__(self) -> None:
        super().__init__(name="scp-refused", daemon=True)
        self._lock = threading.Lock()
        self._new: list[tuple[socket.socket, bytes]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._held: dict[socket.socket, tuple[float, bytes | None]] = {}  # deadline, RJ still to send
        self.start()

    def add(self, sock: socket.socket, pdu: bytes) -> None:
        with self._lock:
            self._new.append((sock, pdu))
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the wake-up pipe is full: the thread is awake anyway
            pass

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fds: dict[int, socket.socket] = {}
        while True:
            now = time.monotonic()
            timeout = min((d for d, _ in self._held.values()), default=now + 60) - now
            for fd, _ in poller.poll(max(0.0, timeout) * 1000):
                if fd == self._wake_r.fileno():
                    self._take_new(poller, fds)
                elif fd in fds:
                    self._readable(fds[fd], poller, fds)
            now = time.monotonic()
            for sock, (deadline, pdu) in list(self._held.items()):
                if deadline <= now:
                    if pdu is not None:
                        self._answer(sock, pdu)
                    else:
                        self._close(sock, poller, fds)

    def _take_new(self, poller, fds) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            new, self._new = self._new, []
        for sock, pdu in new:
            if len(self._held) >= self.MAX_HELD:
                _close_quietly(sock)
                continue
            sock.setblocking(False)
            self._held[sock] = (time.monotonic() + self.ANSWER_WITHIN_S, pdu)
            fds[sock.fileno()] = sock
            poller.register(sock, select.POLLIN)

    def _readable(self, sock: socket.socket, poller, fds) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        deadline, pdu = self._held[sock]
        if pdu is not None and data:  # the request is here: the rejection answers it shortly
            self._held[sock] = (min(deadline, time.monotonic() + self.ANSWER_DELAY_S), pdu)
        elif not data:
            if pdu is not None:  # the sender closed without asking; tell it anyway
                _send_quietly(sock, pdu)
            self._close(sock, poller, fds)

    def _answer(self, sock: socket.socket, pdu: bytes) -> None:
        # No FIN of ours behind it: pynetdicom's requestor, seeing the connection closed before its
        # association thread has looked, reports an abort instead of the rejection. The sender
        # closes when it has read the rejection; `LINGER_S` bounds one that does not.
        _send_quietly(sock, pdu)
        self._held[sock] = (time.monotonic() + self.LINGER_S, None)

    def _close(self, sock: socket.socket, poller, fds) -> None:
        self._held.pop(sock, None)
        fds.pop(sock.fileno(), None)
        try:
            poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        _close_quietly(sock)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


_refusals: _Refusals | None = None
_refusals_lock = threading.Lock()


def refuse(sock: socket.socket, rj: tuple[int, int, int]) -> None:
    """Answer a connection with an A-ASSOCIATE-RJ once its request is here, and close it. The
    connection is taken over: the caller's socket object is left detached, so socketserver's
    closing it after a refused `verify_request` does not cut the rejection off."""
    global _refusals
    sock = socket.socket(fileno=sock.detach())
    with _refusals_lock:
        if _refusals is None:
            _refusals = _Refusals()
    _refusals.add(sock, reject_pdu(*rj))


class AdmittedRequestHandler(RequestHandler):
    """pynetdicom's request handler, keeping the association it starts (the server waits for it)."""

    assoc = None

    def handle(self) -> None:
        self.assoc = self._create_association()
        evt.trigger(self.assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        self.assoc.start()


class AdmittingServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with `Admission` in front (set ``admission``
    after construction) and the TLS handshake on the connection's thread, not the accept loop."""

    admission: Admission
    tls_context: ssl.SSLContext | None = None

    def get_request(self):
        client_socket, address = self.socket.accept()  # no handshake here: one slow client would stall accepting
        return client_socket, address

    def verify_request(self, request, client_address) -> bool:
        rj = self.admission.admit(client_address[0])
        if rj is None:
            return True
        refuse(request, rj)
        return False

    def process_request_thread(self, request, client_address) -> None:
        address = client_address[0]
        try:
            try:
                if self.tls_context is not None:
                    request, why = self._handshake(request)
                else:
                    why = self.admission.await_request(request)
            finally:
                self.admission.requested()
            if why is not None:
                self.admission.refused(address, why, event="scp.connection_dropped")
                if why in ("tls_on_plain_port", "not_an_association_request", "request_too_large"):
                    refuse(request, RJ_NOT_ALLOWED)
                else:
                    self.shutdown_request(request)
                return
            handler = self.RequestHandlerClass(request, client_address, self)
            if handler.assoc is not None:
                handler.assoc.join()  # the connection's slot is held while its association runs
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self.admission.release(address)

    def _handshake(self, request: socket.socket):
        try:
            request.settimeout(self.admission.request_timeout_s)
            tls = self.tls_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            tls.settimeout(None)
            return tls, None
        except ssl.SSLError as exc:
            return request, f"tls_handshake_failed: {exc.reason or exc}"
        except (OSError, TimeoutError) as exc:
            return request, f"tls_handshake_failed: {type(exc).__name__}"


def start_server(ae, address, evt_handlers, admission: Admission, tls_context: ssl.SSLContext | None = None):
    """`AE.start_server(block=False)` with `AdmittingServer`: serving on a thread of its own."""
    server = ae.make_server(address, evt_handlers=evt_handlers, server_class=AdmittingServer,
                            request_handler=AdmittedRequestHandler)
    server.admission, server.tls_context = admission, tls_context
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


# ---- PDU lengths ------------------------------------------------------------------------------
_MAX_OTHER_PDU = MAX_REQUEST_BYTES  # A-ASSOCIATE-RQ/AC; RJ, release and abort PDUs hold 4 bytes


def _announced_maximum(dul: DULServiceProvider) -> int:
    """The largest P-DATA-TF variable field this side said it would receive (0: unlimited)."""
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return int(local.maximum_length or 0)


def _bounded_read(self: DULServiceProvider) -> None:
    """pynetdicom 3's `DULServiceProvider._read_pdu_data` with one check added after the header:
    a PDU longer than it may be is an invalid PDU (Evt19: the state machine aborts the
    association) and its body is never read. (pynetdicom reads any declared length into memory.)"""
    bytestream = bytearray()
    try:
        bytestream.extend(self.socket.recv(6))
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")  # transport connection closed
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", bytestream)
    except struct.error:
        self.event_queue.put("Evt17")
        return
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        log.warning("scp.pdu_unknown", pdu_type=f"0x{pdu_type:02X}")
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU
        return
    limit = _announced_maximum(self) if pdu_type == _P_DATA_TF else _MAX_OTHER_PDU
    if limit and pdu_length > limit:
        log.warning("scp.pdu_too_long", pdu_type=f"0x{pdu_type:02X}", length=pdu_length, limit=limit)
        self.event_queue.put("Evt19")
        return
    try:
        bytestream += self.socket.recv(pdu_length)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if len(bytestream) != 6 + pdu_length:
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(bytestream)
        self.event_queue.put(event)
    except Exception:
        log.warning("scp.pdu_undecodable", pdu_type=f"0x{pdu_type:02X}", length=pdu_length)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def bound_pdu_reads() -> None:
    """Install the PDU length check (process-wide, idempotent)."""
    DULServiceProvider._read_pdu_data = _bounded_read
