"""Lifecycle events on ZeroMQ: versioned pydantic headers on a PUB socket, optional raw buffers.

Wire format, one multipart message per event: ``[topic, header, buffer?]``. ``topic`` is the ASCII
topic name (subscribers filter on it by prefix, so ``job.`` gets every job event); ``header`` is the
event as UTF-8 JSON (the `Event` models below; ``schema()`` exports their JSON Schema with its
``schema_version``); ``buffer``, when present, is a C-ordered raw array whose dtype (numpy notation
with byte order, e.g. ``<f4``), shape and units are in ``header.buffer``.

Delivery: events are notifications, never the record. A PUB socket drops silently when a
subscriber's queue reaches ``send_hwm`` and sends nothing to a subscriber that has not finished
connecting ("slow joiner"); the publisher also drops (and counts, see `Publisher.dropped`) when its
own hand-over queue is full. The SQLite job state is the record: a consumer that must not miss a
result asks for it there, and uses events to know when to ask.

Threading: ZeroMQ sockets are not thread-safe, so one publisher thread owns the PUB socket (and the
context it lives in). Any thread calls `Publisher.publish`, which encodes the header in the caller's
thread and hands the frames over through a bounded ``queue.Queue`` with ``put_nowait``, so it never
blocks. A queue rather than an inproc PUSH/PULL pair because PUSH sockets would need one per calling
thread, and a queue gives the drop count for free.

Zero-copy: an attached ndarray is sent with ``copy=False``. pyzmq keeps a reference to it until
libzmq has sent it to every subscriber, so it stays alive, but the memory is shared: the caller
must not write into the array after `publish` (pass a copy if it will). With
``include_results`` on, a slow subscriber can hold up to ``send_hwm`` messages, buffers included:
keep ``send_hwm`` low when volumes are attached.

CURVE: with ``curve_secret_key_file`` set, the socket is a CURVE server and a ZAP authenticator
admits only subscribers whose public certificate is in ``curve_clients_dir`` (read at start; restart
the publisher after adding one). ``CURVE_ALLOW_ANY`` is never used: it encrypts but lets anyone in.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time as _time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import zmq
import zmq.auth
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from zmq.auth.thread import ThreadAuthenticator

from appliance.config import EventsConfig
from appliance.logging import get_logger

log = get_logger(__name__)

SCHEMA_VERSION: int = 1
TOPICS = ("series.received", "series.rejected", "stream.fallback", "job.queued", "job.started", "stage.done",
          "job.done", "export.done", "job.failed", "model.changed", "health")


class EventDecodeError(ValueError):
    """A message whose frames do not agree with its (valid) header."""


def _utc(v: datetime) -> datetime:
    # A naive time is ambiguous (local? UTC?) on a box whose TZ a field engineer may change: refuse it.
    if v.tzinfo is None or v.utcoffset() is None:
        raise ValueError("naive datetime: give a timezone-aware one, e.g. datetime.now(UTC)")
    return v.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class BufferInfo(BaseModel):
    """What the raw buffer frame holds: numpy dtype string, shape (slowest axis first), units."""

    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[int]
    order: Literal["C"] = "C"
    units: str = ""

    @field_validator("dtype")
    @classmethod
    def _numpy_dtype(cls, v: str) -> str:
        try:
            dt = np.dtype(v)
        except TypeError as exc:
            raise ValueError(f"not a numpy dtype: {v!r}") from exc
        if dt.hasobject:
            raise ValueError("object dtypes cannot travel as raw bytes")
        return v

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(n < 0 for n in v):
            raise ValueError("shape: negative extent")
        return v


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    topic: str
    time: UtcDatetime = Field(default_factory=lambda: datetime.now(UTC))
    appliance: str = Field("", description="node AE title; the Publisher fills it when empty")
    study_uid: str | None = None
    series_uid: str | None = None
    job_id: int | None = None
    buffer: BufferInfo | None = Field(None, description="set by the Publisher when a buffer is attached")


class SeriesReceived(_EventBase):
    topic: Literal["series.received"] = "series.received"
    instances: int
    calling_ae: str
    modality: str
    received_first: UtcDatetime
    received_last: UtcDatetime
    completed_at: UtcDatetime
    why: str = Field(description='the completion rule that fired: "expected_count", "released" (the sending '
                     'association was released, plus the grace), "idle", or "resumed" (after a restart)')


class SeriesRejected(_EventBase):
    topic: Literal["series.rejected"] = "series.rejected"
    reasons: list[str]
    details: list[str]
    streamed_instances: int = Field(0, description="derived instances already streamed out before the "
                                    "whole series could be judged (they stay at the destination)")


class StreamFallback(_EventBase):
    topic: Literal["stream.fallback"] = "stream.fallback"
    reason: str = Field(description="why the series left the streaming path, e.g. missing_slice, echo_or_phase")
    detail: str
    streamed_slices: int = Field(description="slices that had already been processed as slabs")


class JobQueued(_EventBase):
    topic: Literal["job.queued"] = "job.queued"
    pipeline: str
    label: str
    shape: list[int]
    queued_at: UtcDatetime


class JobStarted(_EventBase):
    topic: Literal["job.started"] = "job.started"
    pipeline: str
    label: str
    attempt: int
    started_at: UtcDatetime


class StageDone(_EventBase):
    topic: Literal["stage.done"] = "stage.done"
    pipeline: str
    stage: str
    seconds: float
    attempt: int
    slab: int | None = Field(None, description="0-based slab of a streamed series; None for a whole volume")
    slices: int | None = Field(None, description="slices in the slab (context not counted)")


class JobDone(_EventBase):
    topic: Literal["job.done"] = "job.done"
    pipeline: str
    pipeline_version: str | None = Field(None, description="as in the derived series' DerivationDescription: "
                                         "the appliance's version and the model's name and version")
    label: str
    derived_series_uid: str
    instances: int
    timings: dict[str, float] = Field(description="seconds per step")


class ExportDone(_EventBase):
    topic: Literal["export.done"] = "export.done"
    destination: str
    derived_series_uid: str
    instances: int
    attempts: int
    seconds: float
    end_to_end_s: float | None = None


class JobFailed(_EventBase):
    topic: Literal["job.failed"] = "job.failed"
    reason: str
    detail: str
    pipeline: str | None = None
    stage: str | None = None
    will_retry: bool = False


class ModelChanged(_EventBase):
    topic: Literal["model.changed"] = "model.changed"
    pipeline: str
    ok: bool = Field(description="false: the newly active model did not load and the previous one stays in use")
    previous: str = Field(description="pipeline version before (appliance version + model name and version)")
    current: str = Field(description="pipeline version now in use for new jobs")
    detail: str


class Health(_EventBase):
    topic: Literal["health"] = "health"
    version: str
    uptime_s: float
    queued_jobs: int
    pending_exports: int
    free_bytes: int


Event = Annotated[
    Union[SeriesReceived, SeriesRejected, StreamFallback, JobQueued, JobStarted, StageDone, JobDone, ExportDone, JobFailed,
          ModelChanged, Health],
    Field(discriminator="topic"),
]
_EVENT = TypeAdapter(Event)


def encode(event: _EventBase) -> list[bytes]:
    """``[topic, header JSON]`` for ``event`` (the publisher appends the buffer frame, if any)."""
    if event.topic not in TOPICS:
        raise ValueError(f"unknown topic {event.topic!r}; known: {', '.join(TOPICS)}")
    return [event.topic.encode("ascii"), event.model_dump_json().encode("utf-8")]


def _frame_bytes(frame: bytes | zmq.Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def decode(frames: Sequence[bytes | zmq.Frame]) -> tuple[_EventBase, np.ndarray | None]:
    """The event and its buffer (a read-only ndarray viewing the received frame, or None).

    Raises pydantic ``ValidationError`` for a header that is not a valid event (bad JSON, missing
    field, unknown topic) and `EventDecodeError` when the frames disagree with the header.
    """
    if len(frames) not in (2, 3):
        raise EventDecodeError(f"expected 2 or 3 frames [topic, header, buffer?], got {len(frames)}")
    event = _EVENT.validate_json(_frame_bytes(frames[1]))
    topic = _frame_bytes(frames[0])
    if topic != event.topic.encode("ascii"):
        raise EventDecodeError(f"topic frame {topic!r} does not match header topic {event.topic!r}")
    info = event.buffer
    if len(frames) == 2:
        if info is not None:
            raise EventDecodeError("header announces a buffer but the message has none")
        return event, None
    if info is None:
        raise EventDecodeError("message has a buffer frame but the header has no buffer info")
    raw = frames[2].buffer if isinstance(frames[2], zmq.Frame) else frames[2]
    dtype = np.dtype(info.dtype)
    expected = math.prod(info.shape) * dtype.itemsize
    got = memoryview(raw).nbytes
    if got != expected:
        raise EventDecodeError(f"buffer has {got} bytes, header says {info.dtype}{info.shape} = {expected}")
    array = np.frombuffer(raw, dtype=dtype) if expected else np.empty(0, dtype=dtype)
    array = array.reshape(info.shape)
    array.flags.writeable = False
    return event, array


def schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of every event header, tagged with ``schema_version``."""
    out = _EVENT.json_schema()
    for definition in out.get("$defs", {}).values():
        # ``topic`` has a default for callers' convenience, but decode cannot tell events apart without it.
        if "topic" in definition.get("properties", {}) and "topic" not in definition.setdefault("required", []):
            definition["required"].insert(0, "topic")
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "ApplianceEvent",
           "schema_version": SCHEMA_VERSION, **out}
    return out


_STOP = object()
_DROP_LOG_EVERY_S = 10.0


class Publisher:
    """Owns the PUB socket in one thread; `publish` may be called from any thread and never blocks."""

    def __init__(self, cfg: EventsConfig, appliance: str = "") -> None:
        self.cfg = cfg
        self.appliance = appliance
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=cfg.send_hwm)
        self._lock = threading.Lock()  # orders the "closing" check against the hand-over
        self._closing = False
        self._dropped = 0
        self._last_drop_log = -math.inf
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._endpoint: str | None = None
        self._linger_ms = 1000

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint with any wildcard port resolved, or None when not running."""
        return self._endpoint

    @property
    def dropped(self) -> int:
        """Events refused because the hand-over queue was full or the publisher was stopping.
        (Drops at the PUB socket's high-water mark are silent in ZeroMQ and not counted.)"""
        return self._dropped

    @property
    def include_results(self) -> bool:
        """Whether callers should attach result volumes to job.done (cfg.include_results, if enabled)."""
        return self.cfg.enabled and self.cfg.include_results

    def start(self) -> None:
        """Bind the PUB socket (in the publisher thread) and return once bound; no-op when disabled.
        Raises ValueError for an unusable CURVE set-up and zmq.ZMQError when the bind fails."""
        if not self.cfg.enabled:
            log.info("events.disabled")
            return
        if self._thread is not None or self._closing:
            raise RuntimeError("publisher already started (or stopped: make a new one)")
        curve = self._load_curve()
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, args=(curve,), name="events-publisher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def _load_curve(self) -> tuple[bytes, bytes, Path] | None:
        key_file = self.cfg.curve_secret_key_file
        if key_file is None:
            return None
        clients = self.cfg.curve_clients_dir
        if clients is None:
            raise ValueError("events.curve_secret_key_file is set but events.curve_clients_dir is not: without "
                             "a directory of allowed subscriber certificates CURVE would encrypt without "
                             "authenticating (CURVE_ALLOW_ANY); set curve_clients_dir")
        if not clients.is_dir():
            raise ValueError(f"events.curve_clients_dir {clients} is not a directory")
        if not zmq.has("curve"):
            raise ValueError("this libzmq was built without CURVE support")
        try:
            public, secret = zmq.auth.load_certificate(key_file)
        except (OSError, ValueError) as exc:
            raise ValueError(f"events.curve_secret_key_file {key_file}: cannot load certificate: {exc}") from exc
        if not secret:
            raise ValueError(f"events.curve_secret_key_file {key_file} holds no secret key (is it the .key_secret?)")
        if not any(clients.glob("*.key")):
            log.warning("events.curve_no_clients", clients_dir=str(clients))
        return public, secret, clients

    def _run(self, curve: tuple[bytes, bytes, Path] | None) -> None:
        ctx = zmq.Context()
        auth: ThreadAuthenticator | None = None
        sock: zmq.Socket | None = None
        try:
            if curve is not None:
                # The ZAP handler must be in place before the first handshake, so before bind.
                auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
                auth.start()
                auth.configure_curve(domain="*", location=str(curve[2]))
            sock = ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, self.cfg.send_hwm)
            if curve is not None:
                sock.curve_publickey, sock.curve_secretkey = curve[0], curve[1]
                sock.curve_server = True
            sock.bind(self.cfg.endpoint)
            self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            self._start_error = exc
            self._close(ctx, sock, auth, linger_ms=0)
            self._ready.set()
            return
        log.info("events.bound", endpoint=self._endpoint, curve=curve is not None, send_hwm=self.cfg.send_hwm)
        self._ready.set()
        try:
            self._pump(sock)
        finally:
            self._close(ctx, sock, auth, linger_ms=self._linger_ms)
            self._endpoint = None

    def _pump(self, sock: zmq.Socket) -> None:
        while True:
            frames = self._queue.get()
            if frames is _STOP:
                return
            try:
                # PUB never blocks: at the high-water mark libzmq drops the message for that subscriber.
                sock.send_multipart(frames, copy=False)
            except Exception as exc:  # one bad message must not end the thread that all events go through
                log.warning("events.send_failed", topic=frames[0].decode("ascii", "replace"), error=repr(exc))

    @staticmethod
    def _close(ctx: zmq.Context, sock: zmq.Socket | None, auth: ThreadAuthenticator | None, linger_ms: int) -> None:
        if sock is not None:
            sock.close(linger=linger_ms)
        if auth is not None:
            auth.stop()
        ctx.term()  # waits up to the linger for queued messages to leave

    def stop(self, linger_s: float = 1.0) -> None:
        """Send what is queued, then close; waits at most about ``linger_s`` for subscribers to take it."""
        with self._lock:
            self._closing = True
        thread = self._thread
        if thread is None:
            return
        self._linger_ms = max(0, int(linger_s * 1000))
        try:
            # Nothing new is accepted now, and the thread drains at socket speed, so this waits briefly.
            self._queue.put(_STOP, timeout=max(1.0, linger_s))
        except queue.Full:
            log.warning("events.stop_queue_full")
        thread.join(timeout=linger_s + 5.0)
        if thread.is_alive():
            log.warning("events.stop_timeout", linger_s=linger_s)
        self._thread = None

    def publish(self, event: _EventBase, buffer: np.ndarray | None = None, *, units: str = "") -> None:
        """Queue ``event`` (and ``buffer``, sent zero-copy) for the subscribers; never blocks.

        The event is copied with ``appliance`` filled (when empty) and ``buffer`` set to the array's
        `BufferInfo` (``units`` given here, else those already in ``event.buffer``); the caller's
        object is left as it was. Do not write into ``buffer`` afterwards. Raises TypeError or
        ValueError only for a programming error (unknown topic, object or non-array buffer).
        """
        if not self.cfg.enabled:
            return
        update: dict[str, Any] = {}
        if not event.appliance and self.appliance:
            update["appliance"] = self.appliance
        payload: np.ndarray | None = None
        if buffer is not None:
            if not isinstance(buffer, np.ndarray):
                raise TypeError(f"buffer must be a numpy ndarray, not {type(buffer).__name__}")
            if buffer.dtype.hasobject:
                raise ValueError("buffer: object dtypes cannot travel as raw bytes")
            array = np.ascontiguousarray(buffer)  # copies only when not already C-ordered
            units = units or (event.buffer.units if event.buffer is not None else "")
            update["buffer"] = BufferInfo(dtype=array.dtype.str, shape=list(array.shape), units=units)
            # A flat uint8 view exports a plain byte buffer to pyzmq whatever the dtype; it keeps
            # ``array`` alive through its base until libzmq releases the frame.
            payload = array.reshape(-1).view(np.uint8)
        elif event.buffer is not None:
            update["buffer"] = None  # no frame follows, so the header must not announce one
        frames: list[Any] = encode(event.model_copy(update=update) if update else event)
        if payload is not None:
            frames.append(payload)
        with self._lock:
            accepted = not self._closing
            if accepted:
                try:
                    self._queue.put_nowait(frames)
                except queue.Full:
                    accepted = False
        if not accepted:
            self._count_drop(event.topic)

    def _count_drop(self, topic: str) -> None:
        with self._lock:
            self._dropped += 1
            now = _time.monotonic()
            due = now - self._last_drop_log >= _DROP_LOG_EVERY_S
            if due:
                self._last_drop_log = now
            total = self._dropped
        if due:  # at most one line per interval: a flood of drops must not become a flood of logs
            log.warning("events.dropped", topic=topic, dropped_total=total,
                        why="publisher stopping" if self._closing else "hand-over queue full")


# -- tail: a field engineer's view of the stream ------------------------------------------------
