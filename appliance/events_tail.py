"""``appliance events tail``: a field engineer's live view of the event stream.

A SUB socket prints one readable line per event (see `format_event`); buffers are summarised as
dtype and shape. The schema and the publisher are in `appliance.events`.
"""

from __future__ import annotations

import json
import sys
import time as _time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from appliance.events import BufferInfo, _EventBase, _frame_bytes, decode

_BASE_FIELDS = set(_EventBase.model_fields)
_TRAILING = ("study_uid", "series_uid", "buffer", "appliance")


def _fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _plain(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, int) and key.endswith("_bytes"):
        return _fmt_bytes(v)
    if isinstance(v, datetime):
        return _fmt_time(v)
    if isinstance(v, BufferInfo):
        shape = "x".join(str(n) for n in v.shape)
        return f"{np.dtype(v.dtype).name}[{shape}]" + (f"({v.units})" if v.units else "")
    if isinstance(v, (dict, list)) and not v:
        return "[]" if isinstance(v, list) else "{}"
    if isinstance(v, dict):
        return ",".join(f"{k}:{_plain(k, x)}" for k, x in v.items())
    if isinstance(v, list):
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return "x".join(str(x) for x in v)  # a shape
        items = [_plain(key, x) for x in v]
        return ("; " if any(c.isspace() or c == "," for i in items for c in i) else ",").join(items)
    return str(v)


def _fmt_value(key: str, v: Any) -> str:
    """``v`` as one token: quoted (JSON string syntax) when it has spaces, quotes or ``=``."""
    s = _plain(key, v)
    if not s or any(c.isspace() or c in '="' for c in s) or not s.isprintable():
        return json.dumps(s, ensure_ascii=False)
    return s


def format_event(event: _EventBase) -> str:
    """One line: ``TIME TOPIC job_id=.. <event fields> <uids> buffer=float32[2x3x4] appliance=..``."""
    values = dict(event)
    keys = ["job_id"] + [k for k in type(event).model_fields if k not in _BASE_FIELDS] + list(_TRAILING)
    parts = [_fmt_time(event.time), event.topic]
    for key in keys:
        v = values.get(key)
        if v is None or (key == "appliance" and not v):
            continue
        parts.append(f"{key}={_fmt_value(key, v)}")
    return " ".join(parts)


_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the publisher refused this subscriber's key (not in its clients dir)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error (CURVE on one side only?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (wrong server public key, or CURVE mismatch?)",
}


def tail(endpoint: str, topics: Sequence[str] = (), count: int | None = None, timeout_s: float | None = None,
         out: TextIO | None = None, curve_server_public_key: bytes | None = None,
         curve_secret_key_file: str | Path | None = None) -> int:
    """Print one line per event from ``endpoint`` until ``count`` events or ``timeout_s`` seconds
    (or Ctrl-C); returns the number of lines printed. ``topics`` are prefixes, all when empty;
    ``out`` defaults to the current ``sys.stdout``.

    For a CURVE publisher give its public key (``zmq.auth.load_certificate(server.key)[0]``) and this
    subscriber's own certificate (``curve_secret_key_file``, whose public half the publisher allows).
    Handshake failures are reported on stderr, since a refused subscriber otherwise just sees nothing.
    """
    out = sys.stdout if out is None else out
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    monitor = None
    printed = 0
    try:
        if curve_server_public_key is not None:
            if curve_secret_key_file is None:
                raise ValueError("a CURVE publisher admits only known subscribers: give curve_secret_key_file, "
                                 "a certificate whose public half is in the publisher's clients dir")
            public, secret = zmq.auth.load_certificate(curve_secret_key_file)
            if not secret:
                raise ValueError(f"{curve_secret_key_file} holds no secret key (is it the .key_secret?)")
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = curve_server_public_key
            monitor = sock.get_monitor_socket(sum(_HANDSHAKE_FAILED))
        for topic in topics or ("",):
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        sock.connect(endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        deadline = None if timeout_s is None else _time.monotonic() + timeout_s
        warned = False
        while count is None or printed < count:
            wait_ms = None if deadline is None else max(0, int((deadline - _time.monotonic()) * 1000))
            ready = dict(poller.poll(wait_ms))
            if not ready:
                if deadline is not None and _time.monotonic() >= deadline:
                    break
                continue
            if monitor is not None and monitor in ready:
                msg = recv_monitor_message(monitor)
                if not warned:
                    print(f"tail: {endpoint}: {_HANDSHAKE_FAILED.get(msg['event'], 'handshake failed')}",
                          file=sys.stderr, flush=True)
                    warned = True
            if sock in ready:
                frames = sock.recv_multipart(copy=False)
                try:
                    event, _ = decode(frames)
                    line = format_event(event)
                except ValueError as exc:  # pydantic ValidationError is a ValueError too
                    first = str(exc).splitlines()[0]
                    line = f"{_fmt_time(datetime.now(UTC))} {_frame_bytes(frames[0]).decode('ascii', 'replace')} " \
                           f"undecodable: {first}"
                print(line, file=out, flush=True)
                printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
    return printed


class Subscription:
    """Collects every event published on ``endpoint`` in a background thread (for the demo, QA
    scripts and tests). PUB drops to slow joiners: events published before the subscription is
    live are missed; `wait_for("health")` is a way to know it is live."""

    def __init__(self, endpoint: str, topics: Sequence[str] = ()) -> None:
        import threading

        self._sock = zmq.Context.instance().socket(zmq.SUB)
        for topic in topics or ("",):
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self.events: list[_EventBase] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-subscription", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                self.events.append(decode(self._sock.recv_multipart())[0])

    def first(self, topic: str) -> _EventBase | None:
        return next((e for e in list(self.events) if e.topic == topic), None)

    def wait_for(self, topic: str, timeout_s: float) -> _EventBase | None:
        deadline = _time.monotonic() + timeout_s
        while _time.monotonic() < deadline:
            event = self.first(topic)
            if event is not None:
                return event
            _time.sleep(0.02)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
