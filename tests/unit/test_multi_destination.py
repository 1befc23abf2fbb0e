"""A job is done, and its sources released, only when every destination has the whole series."""

from __future__ import annotations

import time

from pynetdicom import AE, AllStoragePresentationContexts, evt

from appliance.config import Destination, RouteRule
from appliance.daemon import Daemon
from appliance.dicom.scu import send_folder
from appliance.pipeline.jobs import DONE, EXPORTING
from appliance.synth.series import axial_geometry
from tests.helpers import free_port, ramp_volume, write_series


class Receiver:
    def __init__(self, port: int) -> None:
        self.port, self.received, self.server = port, [], None

    def start(self) -> "Receiver":
        ae = AE(ae_title="PEER")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda e: self.received.append(e.request.AffectedSOPInstanceUID) or 0x0000)])
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()


def _wait(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sources_stay_until_the_last_destination_has_the_series(cfg, tmp_path):
    up, down = Receiver(free_port()).start(), Receiver(free_port())
    cfg.destinations = {"console": Destination(ae_title="PEER", host="127.0.0.1", port=up.port),
                        "pacs": Destination(ae_title="PEER", host="127.0.0.1", port=down.port)}
    cfg.routes = [RouteRule(pipeline="passthrough", destinations=["console", "pacs"])]
    cfg.export.retry_initial_s = cfg.export.retry_max_s = 0.3
    d = Daemon(cfg)
    d.start()
    try:
        write_series(tmp_path / "s", ramp_volume((4, 8, 8)), axial_geometry((4, 8, 8), 1.0, 1.0))
        assert send_folder(tmp_path / "s", "127.0.0.1", d.scp.port).sent == 4
        assert _wait(lambda: len(up.received) == 4)
        time.sleep(1.0)  # the pacs keeps failing meanwhile
        assert d.jobs.get(1).state == EXPORTING
        assert len(d.spool.instance_paths(d.jobs.get(1).series_uid)) == 4  # sources kept
        down.start()
        assert _wait(lambda: len(down.received) == 4)
        assert _wait(lambda: d.jobs.get(1).state == DONE)
        assert _wait(lambda: d.spool.series(d.jobs.get(1).series_uid).state == "released")
        assert len(up.received) == 4  # nothing sent twice to the destination that had it
    finally:
        d.stop(5)
        up.stop()
        down.stop()
