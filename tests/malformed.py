"""A deterministic corpus of malformed instances, each one that the appliance must refuse.

Every case is ``(name, transfer_syntax, body)``: ``body`` is the dataset's bytes as a sender puts
them on the wire in that transfer syntax (what pynetdicom writes after its own File Meta
Information, and what `part10` wraps the same way for the validator's unit test). The cases come
from three well-formed instances: a single-frame CT slice (native), a three-frame Enhanced CT
(nested sequences, RLE Lossless fragments) and the same slice deflated. Each mutation is one a
broken modality or an attacker produces: cut short anywhere (an image cut at an element boundary
lacks its Pixel Data), bytes appended, VRs that PS3.5 does not define, the other VR encoding than
negotiated, elements swapped out of order, items and delimiters misplaced or missing, fragments
missing, offset tables of the wrong size, a deflate stream cut, corrupted, followed by garbage or
inflating far past the limit (the deflate bomb).

``valid_uid`` lets a caller give every case the SOP Instance UID of an instance already stored, so
that a refusal is also a test that a broken re-send never replaces good data.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, RLELossless)

from appliance.synth.series import axial_geometry
from tests.helpers import ramp_volume, write_enhanced_ct, write_series

_VRS = set("AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass(frozen=True)
class Case:
    name: str
    transfer_syntax: str
    body: bytes
    sop_class_uid: str
    sop_instance_uid: str


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate(body: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(body) + c.flush()


def part10(case_or_ts, body: bytes | None = None, sop_class: str = "", sop_instance: str = "") -> bytes:
    """The file pynetdicom writes for a received dataset: preamble, DICM, its own meta, the body."""
    if isinstance(case_or_ts, Case):
        ts, body = case_or_ts.transfer_syntax, case_or_ts.body
        sop_class, sop_instance = case_or_ts.sop_class_uid, case_or_ts.sop_instance_uid
    else:
        ts = case_or_ts
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ts, PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + body


def _offsets(body: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, tag, VR) of the top-level elements of an Explicit VR Little Endian body."""
    out, pos = [], 0
    while pos + 8 <= len(body):
        g, e = struct.unpack_from("<HH", body, pos)
        vr = body[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
            length, head = struct.unpack_from("<L", body, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", body, pos + 6)[0], 8
        out.append((pos, (g << 16) | e, vr))
        if length == 0xFFFFFFFF:
            break  # encapsulated pixel data: last
        pos += head + length
    return out


def _base(tmp: Path) -> tuple[Dataset, Dataset]:
    hu = ramp_volume((1, 32, 32))
    one = pydicom.dcmread(write_series(tmp / "one", hu, axial_geometry(hu.shape, 0.8, 2.0))[0])
    enh_hu = ramp_volume((3, 16, 16), seed=3)
    path = tmp / "enhanced.dcm"
    write_enhanced_ct(path, enh_hu, axial_geometry(enh_hu.shape, 0.8, 2.0))
    enhanced = pydicom.dcmread(path)
    return one, enhanced


def corpus(tmp: Path, n: int = 1000, seed: int = 0, valid_uid: str | None = None) -> list[Case]:
    """At least ``n`` malformed cases (deterministic for a seed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    one, enhanced = _base(tmp)
    if valid_uid:
        one.SOPInstanceUID = enhanced.SOPInstanceUID = valid_uid
    ct_class, enh_class = str(one.SOPClassUID), str(enhanced.SOPClassUID)
    uid_one, uid_enh = str(one.SOPInstanceUID), str(enhanced.SOPInstanceUID)
    cases: list[Case] = []

    def add(name, ts, body, enh=False):
        cases.append(Case(name, str(ts), bytes(body), enh_class if enh else ct_class, uid_enh if enh else uid_one))

    explicit, implicit = encode(one), encode(one, implicit=True)
    offsets = _offsets(explicit)
    pixel_at = [o for o, tag, _ in offsets if tag == 0x7FE00010][0]

    # the VR encoding the other way round
    add("implicit-on-explicit", ExplicitVRLittleEndian, implicit)
    add("explicit-on-implicit", ImplicitVRLittleEndian, explicit)
    add("explicit-deflated-as-implicit", ImplicitVRLittleEndian, deflate(explicit))
    # unknown VR codes at every element
    for pos, tag, _ in offsets:
        for _k in range(2):
            while True:
                bad = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
                if bad.decode() not in _VRS:
                    break
            add(f"unknown-vr-{tag:08X}-{bad.decode()}", ExplicitVRLittleEndian,
                explicit[:pos + 4] + bad + explicit[pos + 6:])
    # elements out of order: swap neighbours
    for i in range(len(offsets) - 2):
        a, b, c = offsets[i][0], offsets[i + 1][0], offsets[i + 2][0]
        add(f"swapped-{offsets[i][1]:08X}", ExplicitVRLittleEndian,
            explicit[:a] + explicit[b:c] + explicit[a:b] + explicit[c:])
    # a repeated element
    a, b = offsets[3][0], offsets[4][0]
    add("repeated-element", ExplicitVRLittleEndian, explicit[:b] + explicit[a:b] + explicit[b:])
    # no pixel data (every element before it is whole)
    add("no-pixel-data", ExplicitVRLittleEndian, explicit[:pixel_at])
    add("no-pixel-data-implicit", ImplicitVRLittleEndian, encode(_without(one, "PixelData"), implicit=True))
    # trailing bytes: short, an element header with nothing after, random garbage
    for k in range(1, 8):
        add(f"trailing-{k}", ExplicitVRLittleEndian, explicit + bytes(rng.randrange(256) for _ in range(k)))
        add(f"trailing-implicit-{k}", ImplicitVRLittleEndian, implicit + b"\0" * k)
    add("trailing-header", ExplicitVRLittleEndian, explicit + struct.pack("<HH2sH", 0xFFFC, 0xFFFC, b"OB", 0) [:6])
    for k in range(40):
        add(f"trailing-garbage-{k}", ExplicitVRLittleEndian,
            explicit + bytes(rng.randrange(256) for _ in range(rng.randrange(8, 300))))
    # pixel data of the wrong length, both encodings
    for delta in (-2, 2, -512, 512):
        ds = _copy(one)
        ds.PixelData = ds.PixelData[:delta] if delta < 0 else ds.PixelData + b"\0" * delta
        add(f"pixel-length{delta:+d}", ExplicitVRLittleEndian, encode(ds))
        add(f"pixel-length-implicit{delta:+d}", ImplicitVRLittleEndian, encode(ds, implicit=True))
        add(f"pixel-length-deflated{delta:+d}", DeflatedExplicitVRLittleEndian, deflate(encode(ds)))
    # deflate: cut, corrupted, garbage after the stream, the bomb
    deflated = deflate(explicit)
    for k in range(30):
        add(f"deflate-cut-{k}", DeflatedExplicitVRLittleEndian, deflated[:rng.randrange(1, len(deflated) - 1)])
    for k in range(10):
        add(f"deflate-trailing-{k}", DeflatedExplicitVRLittleEndian,
            deflated + bytes(rng.randrange(1, 256) for _ in range(rng.randrange(2, 64))))
    for k in range(10):
        at = rng.randrange(0, min(len(deflated), 64))
        add(f"deflate-corrupt-{k}", DeflatedExplicitVRLittleEndian,
            deflated[:at] + bytes([deflated[at] ^ 0xFF]) + deflated[at + 1:])
    add("deflate-bomb", DeflatedExplicitVRLittleEndian, deflate_bomb(one, 256 * 1024 * 1024))
    # undefined length where none is allowed
    pos = offsets[5][0]
    add("undefined-length-short-vr", ExplicitVRLittleEndian,
        explicit[:pos] + explicit[pos:pos + 4] + b"UT\0\0" + b"\xff\xff\xff\xff" + explicit[offsets[6][0]:])
    add("native-pixel-undefined", ExplicitVRLittleEndian,
        explicit[:pixel_at] + explicit[pixel_at:pixel_at + 8] + b"\xff\xff\xff\xff" + explicit[pixel_at + 12:])
    # sequences and items: the Enhanced CT, explicit and implicit
    enh_explicit, enh_implicit = encode(enhanced), encode(enhanced, implicit=True)
    for body, ts, tag in ((enh_explicit, ExplicitVRLittleEndian, "x"), (enh_implicit, ImplicitVRLittleEndian, "i")):
        for k, (name, mutated) in enumerate(_sequence_mutations(body, rng)):
            add(f"enhanced-{tag}-{name}-{k}", ts, mutated, enh=True)
    # encapsulated (RLE Lossless): fragments and offset tables
    for name, body in _encapsulated_cases(enhanced):
        add(f"rle-{name}", RLELossless, body, enh=True)
    # cut short anywhere: every offset class, then random offsets until n
    bodies = [(ExplicitVRLittleEndian, explicit, False), (ImplicitVRLittleEndian, implicit, False),
              (ExplicitVRLittleEndian, enh_explicit, True), (ImplicitVRLittleEndian, enh_implicit, True)]
    for pos, tag, _ in offsets:
        add(f"cut-at-{tag:08X}", ExplicitVRLittleEndian, explicit[:pos])
        add(f"cut-in-{tag:08X}", ExplicitVRLittleEndian, explicit[:pos + 5])
    k = 0
    while len(cases) < n:
        ts, body, enh = bodies[k % len(bodies)]
        add(f"cut-{k}", ts, body[:rng.randrange(1, len(body) - 1)], enh)
        k += 1
    return cases


def _copy(ds: Dataset) -> Dataset:
    return pydicom.dcmread(DicomBytesIO(_file_bytes(ds)))


def _file_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def _without(ds: Dataset, keyword: str) -> Dataset:
    out = _copy(ds)
    delattr(out, keyword)
    return out


def _sequence_mutations(body: bytes, rng: random.Random):
    """Misplaced delimiters, items crossing their sequence's end, lengths that lie."""
    item = struct.pack("<HH", 0xFFFE, 0xE000)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    items = [i for i in range(len(body) - 8) if body[i:i + 4] == item]
    for at in rng.sample(items, min(6, len(items))):
        length = struct.unpack_from("<L", body, at + 4)[0]
        if length != 0xFFFFFFFF:
            yield "item-longer", body[:at + 4] + struct.pack("<L", length + 8) + body[at + 8:]
            yield "item-shorter", body[:at + 4] + struct.pack("<L", max(0, length - 6)) + body[at + 8:]
        yield "item-tag", body[:at] + struct.pack("<HH", 0xFFFE, 0xE001) + body[at + 4:]
    yield "stray-item-end", body[:len(body) // 3] + item_end + body[len(body) // 3:]
    for at in [i for i in range(len(body) - 8) if body[i:i + 8] == seq_end][:3]:
        yield "seq-end-length", body[:at + 4] + b"\x04\0\0\0" + body[at + 8:]
        yield "seq-end-missing", body[:at] + body[at + 8:]


def _encapsulated_cases(enhanced: Dataset):
    ds = _copy(enhanced)
    ds.compress(RLELossless, generate_instance_uid=False)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=3))

    def with_pixels(pixel_bytes: bytes, frames_attr: int | None = None, defined: bool = False) -> bytes:
        out = _copy(ds)
        out.PixelData = pixel_bytes
        if frames_attr is not None:
            out.NumberOfFrames = frames_attr
        out["PixelData"].is_undefined_length = not defined
        out["PixelData"].VR = "OB"
        return encode(out)

    yield "fewer-fragments", with_pixels(encapsulate(frames[:2], has_bot=False))
    yield "offset-table-short", with_pixels(_bot(frames, 2))
    yield "offset-table-odd", with_pixels(_bot(frames, 5))
    whole = with_pixels(encapsulate(frames, has_bot=True))
    yield "no-seq-end", whole[:-8]
    yield "seq-end-garbled", whole[:-8] + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    yield "defined-length", with_pixels(encapsulate(frames, has_bot=False), defined=True)
    undefined_fragment = bytearray(encapsulate(frames, has_bot=False))
    undefined_fragment[12:16] = b"\xff\xff\xff\xff"  # the first fragment's length
    yield "undefined-fragment", with_pixels(bytes(undefined_fragment))
    yield "no-offset-table", with_pixels(b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(f)) + f for f in frames))
    yield "no-fragments", with_pixels(struct.pack("<HHL", 0xFFFE, 0xE000, 0))
    yield "frames-more-than-fragments", with_pixels(encapsulate(frames, has_bot=False), frames_attr=5)


def _bot(frames: list[bytes], entries: int) -> bytes:
    table = struct.pack(f"<{entries}L", *range(entries))
    out = struct.pack("<HHL", 0xFFFE, 0xE000, len(table)) + table
    for f in frames:
        f = f + b"\0" * (len(f) % 2)
        out += struct.pack("<HHL", 0xFFFE, 0xE000, len(f)) + f
    return out


def deflate_bomb(template: Dataset, pixel_bytes: int) -> bytes:
    """A deflated dataset whose Pixel Data is ``pixel_bytes`` of zeros, consistent with Rows and
    Columns, built a megabyte at a time (the test's own memory stays small)."""
    ds = _copy(template)
    del ds.PixelData
    side = int(np.sqrt(pixel_bytes // 2))
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = max(1, pixel_bytes // (2 * side * side))
    head = encode(ds)
    want = 2 * side * side * int(ds.NumberOfFrames)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, want))]
    chunk = b"\0" * (1 << 20)
    left = want
    while left:
        parts.append(c.compress(chunk[:min(left, len(chunk))]))
        left -= min(left, len(chunk))
    parts.append(c.flush())
    return b"".join(parts)
