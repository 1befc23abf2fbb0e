"""Is a received Part-10 file whole and well-formed in its transfer syntax? A walk over its bytes.

pydicom parses leniently on purpose (it guesses the VR encoding when the data disagrees with the
transfer syntax, stops quietly at trailing bytes, reads sequences only when asked), which is right
for reading archives and wrong for deciding what to acknowledge. This module walks every element's
header (tag, VR, length), every sequence and item down to the innermost, and the fragments of
encapsulated pixel data, without reading any value, and refuses with a coded reason:

- ``truncated``: an element, item or fragment runs past the end of the file;
- ``trailing_bytes``: bytes left over after the last element (or after the deflate stream);
- ``vr_encoding_mismatch``: Explicit VR data on an Implicit VR context, or the reverse;
- ``unknown_vr``: a VR code PS3.5 6.2 does not define;
- ``malformed``: elements out of order or repeated, an item or delimiter where none belongs, an
  element crossing the end of its item, undefined length where PS3.5 7.5 allows none, nesting
  deeper than `MAX_DEPTH`;
- ``inflated_too_large``: a deflated dataset inflating past the limit (checked while inflating,
  so a deflate bomb costs at most the limit in disk and a few chunks of memory).

Values stay on disk: the file is memory-mapped and only element headers are touched, so the walk
costs microseconds per element whatever the pixel data's size.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

MAX_DEPTH = 32  # nested sequences; real IODs use fewer than 8
_INFLATE_CHUNK = 1 << 20

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


class Malformed(Exception):
    """The file is not a whole, well-formed dataset; ``reason`` is the coded refusal."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Walked:
    """What the walk saw of the top-level dataset."""

    transfer_syntax: UID
    inflated: bool  # the dataset was deflated: parse it from the inflated file
    elements: int  # elements at every depth
    fragments: int | None  # encapsulated Pixel Data: fragments after the Basic Offset Table
    offset_table_bytes: int | None  # its Basic Offset Table's length


def _tag_name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


class _Walker:
    def __init__(self, buf, size: int, little: bool, encapsulated: bool) -> None:
        self.buf, self.size = buf, size
        order = "<" if little else ">"
        self._tag = struct.Struct(order + "HH").unpack_from
        self._u16 = struct.Struct(order + "H").unpack_from
        self._u32 = struct.Struct(order + "L").unpack_from
        self._le_u32 = struct.Struct("<L").unpack_from  # delimiters and items: always 4-byte lengths
        self.encapsulated = encapsulated
        self.elements = 0
        self.fragments: int | None = None
        self.offset_table: int | None = None

    def _need(self, pos: int, n: int, end: int, what: str) -> None:
        if pos + n > end:
            if end >= self.size:
                raise Malformed("truncated", f"{what} at offset {pos} needs {n} bytes, the file ends at {self.size}")
            raise Malformed("malformed", f"{what} at offset {pos} crosses the end of its item at {end}")

    def tag(self, pos: int) -> int:
        group, element = self._tag(self.buf, pos)
        return (group << 16) | element

    def dataset(self, pos: int, end: int, explicit: bool, depth: int, in_item: bool) -> int:
        """Walk the elements from ``pos``; a dataset of defined extent ends exactly at ``end``, an
        item of undefined length at its Item Delimitation Item. Returns the position after it."""
        last = -1
        while True:
            if pos == end and not in_item:
                return pos
            if depth == 0 and pos + 8 > end:
                raise Malformed("trailing_bytes", f"{end - pos} bytes after the last element, too few for another")
            self._need(pos, 8, end, "an element")
            tag = self.tag(pos)
            if tag == _ITEM_END:
                if not in_item:
                    raise Malformed("malformed", f"an Item Delimitation Item outside an item at offset {pos}")
                if self._u32(self.buf, pos + 4)[0] != 0:
                    raise Malformed("malformed", f"an Item Delimitation Item with a length at offset {pos}")
                return pos + 8
            if tag in (_ITEM, _SEQ_END) or tag >> 16 == 0xFFFE:
                raise Malformed("malformed", f"{_tag_name(tag)} where an element belongs, at offset {pos}")
            if tag <= last:
                raise Malformed("malformed", f"element {_tag_name(tag)} after {_tag_name(last)} at offset {pos}: "
                                             "elements must be in ascending order, each once")
            last = tag
            self.elements += 1
            vr = None
            if explicit:
                vr = bytes(self.buf[pos + 4:pos + 6])
                if vr in _LONG_VRS:
                    self._need(pos, 12, end, f"element {_tag_name(tag)}")
                    length, value = self._u32(self.buf, pos + 8)[0], pos + 12
                elif vr in _SHORT_VRS:
                    length, value = self._u16(self.buf, pos + 6)[0], pos + 8
                else:
                    raise Malformed("unknown_vr", f"element {_tag_name(tag)} at offset {pos} has VR {vr!r}")
            else:
                length, value = self._u32(self.buf, pos + 4)[0], pos + 8
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and self.encapsulated and vr in (None, b"OB", b"OW"):
                    pos = self.pixel_fragments(value, end, depth)
                elif vr in (b"SQ", b"UN") or (not explicit and tag != _PIXEL_DATA):
                    # UN of undefined length holds an Implicit VR Little Endian sequence (PS3.5 6.2.2)
                    pos = self.sequence(value, None, explicit and vr != b"UN", depth + 1, end)
                else:
                    what = "native " if tag == _PIXEL_DATA else ""
                    raise Malformed("malformed", f"element {_tag_name(tag)} ({what}VR {(vr or b'implicit').decode()}) "
                                                 f"has undefined length at offset {pos}")
                continue
            stop = value + length
            if stop > end:
                if end >= self.size:
                    raise Malformed("truncated", f"element {_tag_name(tag)} declares {length} bytes, "
                                                 f"the file ends {stop - self.size} bytes short")
                raise Malformed("malformed", f"element {_tag_name(tag)} at offset {pos} crosses the end of its item")
            if tag == _PIXEL_DATA and depth == 0 and self.encapsulated:
                raise Malformed("malformed", "Pixel Data of defined length in an encapsulated transfer syntax")
            if vr == b"SQ" or (not explicit and _dictionary_vr(tag) == "SQ"):
                self.sequence(value, stop, explicit, depth + 1, stop)
            pos = stop

    def sequence(self, pos: int, stop: int | None, explicit: bool, depth: int, outer: int) -> int:
        """Items from ``pos`` to ``stop`` (defined length) or to the Sequence Delimitation Item."""
        if depth > MAX_DEPTH:
            raise Malformed("malformed", f"sequences nested deeper than {MAX_DEPTH} at offset {pos}")
        end = stop if stop is not None else outer
        while True:
            if stop is not None and pos == stop:
                return pos
            self._need(pos, 8, end, "an item")
            tag = self.tag(pos)
            length = self._u32(self.buf, pos + 4)[0]
            if tag == _SEQ_END:
                if stop is not None:
                    raise Malformed("malformed", f"a Sequence Delimitation Item in a sequence of defined length at {pos}")
                if length != 0:
                    raise Malformed("malformed", f"a Sequence Delimitation Item with a length at offset {pos}")
                return pos + 8
            if tag != _ITEM:
                raise Malformed("malformed", f"{_tag_name(tag)} where an item belongs, at offset {pos}")
            if length == _UNDEFINED:
                pos = self.dataset(pos + 8, end, explicit, depth, in_item=True)
            else:
                item_end = pos + 8 + length
                if item_end > end:
                    self._need(pos, 8 + length, end, "an item")
                pos = self.dataset(pos + 8, item_end, explicit, depth, in_item=False)

    def pixel_fragments(self, pos: int, end: int, depth: int) -> int:
        """Encapsulated Pixel Data (PS3.5 A.4): the Basic Offset Table item, fragment items of
        defined length, then the Sequence Delimitation Item."""
        offset_table, fragments = None, 0
        while True:
            self._need(pos, 8, end, "a pixel data fragment")
            tag = self.tag(pos)
            length = self._u32(self.buf, pos + 4)[0]
            if tag == _SEQ_END:
                if length != 0:
                    raise Malformed("malformed", f"a Sequence Delimitation Item with a length at offset {pos}")
                if offset_table is None:
                    raise Malformed("malformed", "encapsulated Pixel Data without its Basic Offset Table item")
                if depth == 0:
                    self.fragments, self.offset_table = fragments, offset_table
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise Malformed("malformed", f"{_tag_name(tag)} of length {length:#x} where a pixel data fragment "
                                             f"belongs, at offset {pos}")
            self._need(pos, 8 + length, end, "a pixel data fragment")
            if offset_table is None:
                offset_table = length
            else:
                fragments += 1
            pos += 8 + length


def _sniff(buf, pos: int, size: int, explicit: bool, little: bool) -> None:
    """The VR encoding of the first element against the negotiated one (as pydicom's reader
    checks, but refusing instead of guessing)."""
    if pos + 8 > size:
        return
    group, element = struct.unpack_from("<HH" if little else ">HH", buf, pos)
    tag = (group << 16) | element
    vr = bytes(buf[pos + 4:pos + 6])
    known = vr in _LONG_VRS or vr in _SHORT_VRS
    if explicit and not known:
        raise Malformed("vr_encoding_mismatch", f"the first element {_tag_name(tag)} has no VR: Implicit VR data "
                                                "on an Explicit VR context")
    if not explicit and known and _dictionary_vr(tag) == vr.decode():
        raise Malformed("vr_encoding_mismatch", f"the first element {_tag_name(tag)} carries its VR {vr.decode()}: "
                                                "Explicit VR data on an Implicit VR context")


def _meta(buf, size: int) -> tuple[int, UID]:
    """The offset after the File Meta Information (group 0002, always Explicit VR Little Endian)
    and the transfer syntax it names."""
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise Malformed("malformed", "not a Part-10 file (no DICM prefix)")
    pos, syntax = 132, b""
    while pos + 8 <= size and struct.unpack_from("<H", buf, pos)[0] == 0x0002:
        element = struct.unpack_from("<H", buf, pos + 2)[0]
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > size:
                break
            length, value = struct.unpack_from("<L", buf, pos + 8)[0], pos + 12
        elif vr in _SHORT_VRS:
            length, value = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
        else:
            raise Malformed("malformed", f"File Meta Information element at offset {pos} has VR {vr!r}")
        if element == 0x0010:
            syntax = bytes(buf[value:value + min(length, 64)])
        pos = value + length
    if pos > size:
        raise Malformed("truncated", "the File Meta Information runs past the end of the file")
    uid = UID(syntax.rstrip(b"\0 ").decode("ascii", "replace"))
    if not uid.is_transfer_syntax:
        raise Malformed("unparseable", f"unknown transfer syntax {str(uid)[:64]!r}")
    return pos, uid


def _walk(buf, start: int, size: int, syntax: UID, explicit: bool, little: bool, encapsulated: bool,
          inflated: bool = False) -> Walked:
    _sniff(buf, start, size, explicit, little)
    walker = _Walker(buf, size, little, encapsulated)
    try:
        end = walker.dataset(start, size, explicit, 0, in_item=False)
    except struct.error as exc:  # a header read past the end: only reachable through a bug above
        raise Malformed("truncated", str(exc)) from exc
    if end != size:
        raise Malformed("trailing_bytes", f"{size - end} bytes after the last element")
    return Walked(syntax, inflated, walker.elements, walker.fragments, walker.offset_table)


def _mapped(path: Path):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b"", 0
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def check_part10(path: Path, inflate_into: Path, max_inflated_bytes: int) -> Walked:
    """Walk a received Part-10 file in the transfer syntax its meta names. A deflated dataset is
    inflated into ``inflate_into`` first (raw dataset bytes, Explicit VR Little Endian, no meta;
    left for the caller to parse and remove when the walk passes, removed here when it refuses),
    refused once it passes ``max_inflated_bytes``."""
    buf, size = _mapped(path)
    try:
        start, syntax = _meta(buf, size)
        if start == size:
            raise Malformed("truncated", "the file holds no dataset after its File Meta Information")
        if not syntax.is_deflated:
            return _walk(buf, start, size, syntax, not syntax.is_implicit_VR, syntax.is_little_endian,
                         syntax.is_encapsulated)
        try:
            _inflate(buf, start, size, inflate_into, max_inflated_bytes)
        except BaseException:
            inflate_into.unlink(missing_ok=True)
            raise
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
    buf, size = _mapped(inflate_into)
    try:
        if size == 0:
            raise Malformed("truncated", "the deflated dataset is empty")
        return _walk(buf, 0, size, syntax, True, True, False, inflated=True)
    except BaseException:
        inflate_into.unlink(missing_ok=True)
        raise
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _inflate(buf, start: int, size: int, into: Path, max_bytes: int) -> int:
    """Inflate the deflated dataset ``buf[start:size]`` into ``into``, refusing once more than
    ``max_bytes`` come out; returns the inflated size. Memory stays at a chunk's worth however
    far the stream would expand."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written, crc = 0, 0
    try:
        with open(into, "wb") as out:
            pos = start
            while not inflater.eof:
                if inflater.unconsumed_tail:
                    chunk = inflater.unconsumed_tail
                elif pos < size:
                    chunk = buf[pos:pos + _INFLATE_CHUNK]
                    pos += len(chunk)
                else:
                    raise Malformed("truncated", "the deflate stream ends before its last block")
                data = inflater.decompress(chunk, _INFLATE_CHUNK)
                written += len(data)
                if written > max_bytes:
                    raise Malformed("inflated_too_large", f"the deflated dataset inflates past {max_bytes} bytes "
                                                          f"(limits.max_inflated_bytes), from {size - start} sent")
                out.write(data)
                crc = zlib.crc32(data, crc)
    except zlib.error as exc:
        raise Malformed("malformed", f"the deflate stream is corrupt: {exc}") from exc
    left = len(inflater.unused_data) + size - pos
    tail = inflater.unused_data + buf[pos:pos + 10]
    # PS3.5 A.5: one NULL may pad the stream to even length. Some writers (David Clunie's dctool
    # among them) leave gzip's trailer, CRC-32 and size, after the stream: accepted when it matches
    # what was inflated, since then it proves the stream whole.
    gzip_trailer = struct.pack("<LL", crc, written & 0xFFFFFFFF)
    if left and tail not in (b"\0", gzip_trailer, gzip_trailer + b"\0"):
        raise Malformed("trailing_bytes", f"{left} bytes after the end of the deflate stream")
    return written
