"""Only whole, well-formed instances are accepted (issue 14 item 2): a walk over every element in
the negotiated transfer syntax, then the header checks. The corpus is `tests.malformed`."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         RLELossless)

from appliance.dicom.validate import InstanceRefused, read_header
from appliance.dicom.wellformed import Malformed, check_part10
from tests import malformed
from tests.malformed import corpus, deflate, encode, part10

ROOT = Path(__file__).resolve().parents[2]


def _check(tmp: Path, case: malformed.Case):
    path = tmp / "received.dcm"
    path.write_bytes(part10(case))
    try:
        return read_header(path, case.sop_class_uid, case.sop_instance_uid, [])
    finally:
        path.unlink()


def test_every_malformed_case_is_refused_with_its_reason(tmp_path):
    cases = corpus(tmp_path / "corpus", n=1000)
    assert len(cases) >= 1000
    reasons, accepted = collections.Counter(), []
    for case in cases:
        try:
            _check(tmp_path, case)
            accepted.append(case.name)
        except InstanceRefused as refusal:
            assert refusal.status in (0xA900, 0xC000), (case.name, refusal)
            reasons[refusal.reason] += 1
    assert accepted == []
    assert not list(tmp_path.glob("*.inflated"))  # nothing of a refused deflated instance is left
    for reason in ("truncated", "trailing_bytes", "unknown_vr", "vr_encoding_mismatch", "malformed",
                   "missing_pixel_data", "pixel_data_length", "pixel_fragments", "inflated_too_large"):
        assert reasons[reason] > 0, (reason, reasons)


@pytest.mark.parametrize("name, reason", [
    ("implicit-on-explicit", "vr_encoding_mismatch"),
    ("explicit-on-implicit", "vr_encoding_mismatch"),
    ("trailing-3", "trailing_bytes"),
    ("repeated-element", "malformed"),
    ("rle-fewer-fragments", "pixel_fragments"),
    ("rle-offset-table-short", "pixel_fragments"),
    ("rle-frames-more-than-fragments", "pixel_fragments"),
    ("rle-defined-length", "malformed"),
    ("rle-no-seq-end", "truncated"),
    ("deflate-bomb", "inflated_too_large"),
    ("native-pixel-undefined", "malformed"),
    ("undefined-length-short-vr", "malformed"),
])
def test_named_cases(tmp_path, name, reason):
    case = {c.name: c for c in corpus(tmp_path / "corpus", n=0)}[name]
    with pytest.raises(InstanceRefused) as err:
        _check(tmp_path, case)
    assert err.value.reason == reason, err.value


def test_the_well_formed_originals_are_accepted(tmp_path):
    one, enhanced = malformed._base(tmp_path)
    rle = malformed._copy(enhanced)
    rle.compress(RLELossless, generate_instance_uid=False)
    good = [
        (ExplicitVRLittleEndian, encode(one), one), (ImplicitVRLittleEndian, encode(one, implicit=True), one),
        (DeflatedExplicitVRLittleEndian, deflate(encode(one)), one),
        (DeflatedExplicitVRLittleEndian, deflate(encode(one)) + b"\0", one),  # PS3.5 A.5 padding
        (ExplicitVRLittleEndian, encode(enhanced), enhanced),
        (ImplicitVRLittleEndian, encode(enhanced, implicit=True), enhanced),
        (RLELossless, encode(rle), enhanced),
    ]
    for ts, body, ds in good:
        case = malformed.Case("good", str(ts), body, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        header = _check(tmp_path, case)
        assert header.sop_instance_uid == ds.SOPInstanceUID and header.transfer_syntax_uid == ts


# pydicom's own test files that are broken on purpose (or mislabelled), and why the walk refuses them
_BROKEN = {"MR_truncated.dcm": "truncated", "rtplan_truncated.dcm": "truncated",
           "SC_rgb_jpeg.dcm": "vr_encoding_mismatch", "DICOMDIR-nooffset": "truncated"}


def test_vendor_files_are_walked_as_well_formed(tmp_path):
    """Real files from many writers (GE, Siemens, Philips, Clunie's dctool with its gzip trailer
    after the deflate stream, big endian, RLE, JPEG, sequences nested deep): all walk clean,
    except those pydicom ships broken, which are refused for what is wrong with them."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    walked = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            _ = ts.is_deflated
        except Exception:
            continue  # not a Part-10 file
        try:
            assert check_part10(path, tmp_path / "inflated", 1 << 30).transfer_syntax == ts
            assert path.name not in _BROKEN, path.name
            walked += 1
        except Malformed as bad:
            assert _BROKEN.get(path.name) == bad.reason, (path.name, bad)
    assert walked > 100


_BOMB = """
import json, resource, sys
from pathlib import Path
from tests import malformed
from appliance.dicom.validate import InstanceRefused, read_header
tmp = Path(sys.argv[1])
one, _ = malformed._base(tmp)
body = malformed.deflate_bomb(one, 256 * 1024 * 1024)
path = tmp / "bomb.dcm"
path.write_bytes(malformed.part10("1.2.840.10008.1.2.1.99", body, str(one.SOPClassUID), str(one.SOPInstanceUID)))
del body
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_header(path, str(one.SOPClassUID), str(one.SOPInstanceUID), [])
    reason = None
except InstanceRefused as r:
    reason = r.reason
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reason": reason, "growth_kib": after - before, "sent": path.stat().st_size,
                  "left": sorted(p.name for p in tmp.glob("bomb*"))}))
"""


def test_the_deflate_bomb_is_refused_in_bounded_memory(tmp_path):
    """255 KiB on the wire inflating to 256 MiB: refused at limits.max_inflated_bytes, the
    receiver's peak memory grows by a few MiB (measured in a process of its own)."""
    out = subprocess.run([sys.executable, "-c", _BOMB, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reason"] == "inflated_too_large", result
    assert result["sent"] < 1024 * 1024
    assert result["growth_kib"] < 16 * 1024, result  # the bound is 64 MiB
    assert result["left"] == ["bomb.dcm"]  # the inflated file beside it is gone
