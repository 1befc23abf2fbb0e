"""Events on ZeroMQ: every topic round-trips, buffers arrive intact, CURVE admits only known keys.

Every publisher binds ``tcp://127.0.0.1:*`` so tests never collide. PUB sends nothing to a
subscriber still connecting (slow joiner), so each test first publishes warm-up `Health` events
until one arrives, and only then the events it checks; late warm-ups are skipped on receipt.
"""

from __future__ import annotations

import gc
import io
import json
import re
import shutil
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pydantic
import pytest
import zmq
import zmq.auth

from appliance.config import EventsConfig
from appliance.events import (
    TOPICS,
    BufferInfo,
    EventDecodeError,
    ExportDone,
    Health,
    JobDone,
    JobFailed,
    JobQueued,
    JobStarted,
    ModelChanged,
    Publisher,
    SeriesReceived,
    SeriesRejected,
    StreamFallback,
    StageDone,
    decode,
    encode,
    schema,
)
from appliance.events_tail import tail
from tests.helpers import free_port

WARMUP = "warm-up"
T0 = datetime(2025, 3, 4, 10, 20, 30, 123000, tzinfo=UTC)


def _warmup() -> Health:
    return Health(version=WARMUP, uptime_s=0.0, queued_jobs=0, pending_exports=0, free_bytes=0)


def _one_of_each() -> list:
    ids = dict(study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2", job_id=7)
    return [
        SeriesReceived(**ids, instances=120, calling_ae="CT_SCANNER", modality="CT", received_first=T0,
                       received_last=T0 + timedelta(seconds=9), completed_at=T0 + timedelta(seconds=14), why="idle"),
        SeriesRejected(**ids, reasons=["irregular_spacing"], details=["slice 12: spacing 2.5 mm, expected 1.25 mm"]),
        JobQueued(**ids, pipeline="denoise", label="Denoise CT", shape=[120, 512, 512], queued_at=T0),
        JobStarted(**ids, pipeline="denoise", label="Denoise CT", attempt=1, started_at=T0),
        StageDone(**ids, pipeline="denoise", stage="infer", seconds=2.345, attempt=1),
        JobDone(**ids, pipeline="denoise", label="Denoise CT", derived_series_uid="1.2.826.0.1.3680043.8.498.3",
                instances=120, timings={"load": 0.4, "infer": 2.345, "write": 0.9}),
        ExportDone(**ids, destination="console", derived_series_uid="1.2.826.0.1.3680043.8.498.3", instances=120,
                   attempts=2, seconds=3.5, end_to_end_s=21.25),
        JobFailed(**ids, reason="gpu_error", detail="CUDA out of memory", pipeline="denoise", stage="infer",
                  will_retry=True),
        Health(version="0.1.0", uptime_s=3600.5, queued_jobs=2, pending_exports=1, free_bytes=250 * 2**30),
        StreamFallback(**ids, reason="missing_slice", detail="1 slice missing after 40.0 mm", streamed_slices=32),
        ModelChanged(pipeline="denoise", ok=True, previous="0.1.0+reference-redcnn-1.0.0",
                     current="0.1.0+reference-redcnn-1.1.0", detail="loaded /var/lib/appliance/models/x/card.toml"),
    ]


@pytest.fixture
def subscribe():
    """Makes SUB sockets subscribed to everything; closes them when the test ends."""
    ctx, made = zmq.Context(), []

    def make(endpoint: str, keys: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
        sub = ctx.socket(zmq.SUB)
        made.append(sub)
        if keys is not None:
            sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = keys
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        return sub

    yield make
    for sub in made:
        sub.close(linger=0)
    ctx.term()


@pytest.fixture
def publisher():
    pub = Publisher(EventsConfig(endpoint="tcp://127.0.0.1:*"), appliance="CT_APPL")
    pub.start()
    yield pub
    pub.stop(linger_s=0.2)


def _join(pub: Publisher, sub: zmq.Socket, timeout_s: float = 5.0) -> None:
    """Publish warm-ups until ``sub`` receives one: from then on it misses nothing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.publish(_warmup())
        if sub.poll(20):
            event, _ = decode(sub.recv_multipart())
            assert isinstance(event, Health) and event.version == WARMUP
            return
    pytest.fail("subscriber never joined")


def _receive(sub: zmq.Socket, n: int, timeout_s: float = 5.0) -> list[tuple]:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        if sub.poll(50):
            event, array = decode(sub.recv_multipart(copy=False))
            if not (isinstance(event, Health) and event.version == WARMUP):
                got.append((event, array))
    return got


def test_every_topic_arrives_in_publish_order_as_its_own_model(publisher, subscribe):
    sub = subscribe(publisher.endpoint)
    _join(publisher, sub)
    sent = _one_of_each()
    assert {e.topic for e in sent} == set(TOPICS)
    for event in sent:
        publisher.publish(event)
    got = _receive(sub, len(sent))
    assert [type(e) for e, _ in got] == [type(e) for e in sent]
    for (received, array), original in zip(got, sent):
        assert array is None
        assert received == original.model_copy(update={"appliance": "CT_APPL"})
    assert publisher.dropped == 0


def test_endpoint_reports_the_real_port_of_a_wildcard_bind(publisher):
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", publisher.endpoint)
    assert not publisher.endpoint.endswith(":0")


def test_float32_volume_on_job_done_arrives_intact_with_buffer_info(publisher, subscribe):
    sub = subscribe(publisher.endpoint)
    _join(publisher, sub)
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 0.5 - 3.0
    event = _one_of_each()[5]
    publisher.publish(event, volume, units="HU")
    [(received, array)] = _receive(sub, 1)
    assert isinstance(received, JobDone)
    assert received.buffer == BufferInfo(dtype="<f4", shape=[2, 3, 4], units="HU")
    assert array.dtype == np.float32 and array.shape == (2, 3, 4)
    np.testing.assert_array_equal(array, volume)
    assert not array.flags.writeable
    assert event.buffer is None and event.appliance == ""  # the caller's event is left as it was


def test_start_raises_when_the_endpoint_is_taken(publisher):
    second = Publisher(EventsConfig(endpoint=publisher.endpoint))
    with pytest.raises(zmq.ZMQError):
        second.start()
    assert second.endpoint is None


def test_caller_may_drop_a_large_buffer_right_after_publishing(publisher, subscribe):
    sub = subscribe(publisher.endpoint)
    _join(publisher, sub)
    n = zmq.COPY_THRESHOLD  # float32: 4x the size below which pyzmq copies anyway, so really zero-copy
    publisher.publish(_one_of_each()[5], np.arange(n, dtype=np.float32))  # no reference kept here
    gc.collect()
    [(_, array)] = _receive(sub, 1)
    np.testing.assert_array_equal(array, np.arange(n, dtype=np.float32))


def test_non_contiguous_buffer_is_sent_in_c_order(publisher, subscribe):
    sub = subscribe(publisher.endpoint)
    _join(publisher, sub)
    volume = np.arange(60, dtype=np.int16).reshape(3, 4, 5).transpose(2, 0, 1)
    publisher.publish(_one_of_each()[5], volume)
    [(received, array)] = _receive(sub, 1)
    assert received.buffer.shape == [5, 3, 4]
    np.testing.assert_array_equal(array, volume)


def test_schema_is_json_schema_naming_every_topic():
    s = schema()
    assert json.loads(json.dumps(s)) == s
    assert s["schema_version"] == 1 and s["$schema"].startswith("https://json-schema.org/")
    assert set(s["discriminator"]["mapping"]) == set(TOPICS)
    defs = s["$defs"]
    json_types = {"object", "array", "string", "integer", "number", "boolean", "null"}

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                assert node["$ref"].removeprefix("#/$defs/") in defs, node["$ref"]
            if "type" in node:
                assert node["type"] in json_types
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    topics = set()
    for branch in s["oneOf"]:
        model = defs[branch["$ref"].removeprefix("#/$defs/")]
        assert model["type"] == "object" and model["additionalProperties"] is False
        assert "topic" in model["required"] and set(model["required"]) <= set(model["properties"])
        topics.add(model["properties"]["topic"]["const"])
    assert topics == set(TOPICS)


def _header(event) -> dict:
    return json.loads(encode(event)[1])


def test_header_missing_a_required_field_fails_validation():
    header = _header(_one_of_each()[5])
    del header["instances"]
    with pytest.raises(pydantic.ValidationError, match="instances"):
        decode([b"job.done", json.dumps(header).encode()])


def test_unknown_topic_fails_validation():
    header = _header(_one_of_each()[5]) | {"topic": "job.exploded"}
    with pytest.raises(pydantic.ValidationError):
        decode([b"job.exploded", json.dumps(header).encode()])
    with pytest.raises(ValueError, match="unknown topic"):
        Publisher(EventsConfig(endpoint="tcp://127.0.0.1:*")).publish(JobDone.model_construct(topic="job.exploded"))


def test_frames_that_disagree_with_the_header_fail():
    frames = encode(_one_of_each()[0])
    with pytest.raises(EventDecodeError, match="topic frame"):
        decode([b"health", frames[1]])
    with pytest.raises(EventDecodeError, match="no buffer info"):
        decode([*frames, b"\0" * 8])
    header = _header(_one_of_each()[5]) | {"buffer": {"dtype": "<f4", "shape": [2, 3, 4]}}
    with pytest.raises(EventDecodeError, match="96"):
        decode([b"job.done", json.dumps(header).encode(), b"\0" * 95])
    with pytest.raises(EventDecodeError, match="has none"):
        decode([b"job.done", json.dumps(header).encode()])


def test_naive_datetimes_are_refused_and_others_kept_in_utc():
    with pytest.raises(pydantic.ValidationError, match="naive"):
        JobQueued(pipeline="p", label="l", shape=[1], queued_at=datetime(2025, 1, 1))
    cet = datetime(2025, 1, 1, 11, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    assert JobQueued(pipeline="p", label="l", shape=[1], queued_at=cet).queued_at.utcoffset() == timedelta(0)
    assert _warmup().time.tzinfo is not None


def test_publishing_from_many_threads_at_once_delivers_everything(publisher, subscribe):
    sub = subscribe(publisher.endpoint)
    _join(publisher, sub)
    threads_n, per_thread = 8, 100
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        start.wait()
        for k in range(per_thread):
            publisher.publish(StageDone(pipeline="p", stage=f"{t}:{k}", seconds=0.0, attempt=1))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    got = _receive(sub, threads_n * per_thread, timeout_s=10)
    for w in workers:
        w.join()
    stages = [tuple(map(int, e.stage.split(":"))) for e, _ in got]
    assert len(stages) == threads_n * per_thread and publisher.dropped == 0
    for t in range(threads_n):  # each thread's events keep their order
        assert [k for tt, k in stages if tt == t] == list(range(per_thread))


def test_disabled_publisher_accepts_events_and_does_nothing():
    port = free_port()
    pub = Publisher(EventsConfig(enabled=False, endpoint=f"tcp://127.0.0.1:{port}"))
    pub.start()
    for event in _one_of_each() * 100:
        pub.publish(event, np.zeros(3, np.float32))
    assert pub.endpoint is None and pub.dropped == 0 and pub._thread is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    pub.stop()


def test_full_hand_over_queue_drops_and_counts_instead_of_blocking():
    pub = Publisher(EventsConfig(endpoint="tcp://127.0.0.1:*", send_hwm=2))
    for _ in range(5):  # not started: nothing drains the queue
        pub.publish(_warmup())
    assert pub.dropped == 3
    pub.start()
    pub.stop(linger_s=0)
    pub.publish(_warmup())
    assert pub.dropped == 4


def test_curve_without_a_clients_dir_refuses_to_start(tmp_path):
    zmq.auth.create_certificates(tmp_path, "server")
    pub = Publisher(EventsConfig(endpoint="tcp://127.0.0.1:*", curve_secret_key_file=tmp_path / "server.key_secret"))
    with pytest.raises(ValueError, match="CURVE_ALLOW_ANY"):
        pub.start()


@pytest.fixture
def curve_publisher(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    for name in ("server", "alice", "mallory"):
        zmq.auth.create_certificates(keys, name)
    shutil.copy(keys / "alice.key", allowed)  # only alice's public certificate is allowed
    pub = Publisher(EventsConfig(endpoint="tcp://127.0.0.1:*", curve_secret_key_file=keys / "server.key_secret",
                                 curve_clients_dir=allowed))
    pub.start()
    yield pub, keys
    pub.stop(linger_s=0.2)


def _client_keys(keys, name: str) -> tuple[bytes, bytes, bytes]:
    public, secret = zmq.auth.load_certificate(keys / f"{name}.key_secret")
    return public, secret, zmq.auth.load_certificate(keys / "server.key")[0]


def test_curve_admits_an_allowed_subscriber_and_not_an_unknown_key(curve_publisher, subscribe):
    pub, keys = curve_publisher
    alice = subscribe(pub.endpoint, _client_keys(keys, "alice"))
    mallory = subscribe(pub.endpoint, _client_keys(keys, "mallory"))
    plain = subscribe(pub.endpoint)
    _join(pub, alice)
    sent = _one_of_each()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # keep publishing while the others have every chance to join
        for event in sent:
            pub.publish(event)
        time.sleep(0.05)
    got = _receive(alice, len(sent))
    assert [e.topic for e, _ in got] == [e.topic for e in sent]
    assert not mallory.poll(200) and not plain.poll(0)


def test_tail_reports_an_unknown_key_on_stderr(curve_publisher, capsys):
    pub, keys = curve_publisher
    out = io.StringIO()
    n = tail(pub.endpoint, count=1, timeout_s=1.0, out=out,
             curve_server_public_key=zmq.auth.load_certificate(keys / "server.key")[0],
             curve_secret_key_file=keys / "mallory.key_secret")
    assert n == 0 and out.getvalue() == ""
    assert "refused" in capsys.readouterr().err


def test_tail_prints_two_readable_lines(publisher):
    out = io.StringIO()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(tail(publisher.endpoint, ["job.done"], count=2,
                                                           timeout_s=5.0, out=out)))
    t.start()
    volume = np.zeros((2, 3, 4), np.float32)
    while t.is_alive():  # tail joins at some point: publish until it has printed two
        publisher.publish(_one_of_each()[5], volume, units="HU")
        publisher.publish(_warmup())  # filtered out by the topic subscription
        time.sleep(0.02)
    lines = out.getvalue().splitlines()
    assert result == [2] and len(lines) == 2
    for line in lines:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z job\.done job_id=7 pipeline=denoise ", line), line
        assert 'label="Denoise CT"' in line and "instances=120" in line
        assert "timings=load:0.4,infer:2.345,write:0.9" in line
        assert "buffer=float32[2x3x4](HU)" in line and line.endswith("appliance=CT_APPL")
