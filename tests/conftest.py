from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from tests.helpers import free_port


@pytest.fixture
def cfg(tmp_path: Path) -> ApplianceConfig:
    """A configuration for tests: storage under tmp_path, any free port, fast completion."""
    c = ApplianceConfig()
    c.storage.root = tmp_path / "spool"
    c.node.bind_address = "127.0.0.1"
    c.node.port = free_port()
    c.completion.idle_seconds = 1.0
    c.completion.poll_interval_s = 0.1
    c.limits.free_space_reserve_bytes = 0
    c.events.endpoint = "tcp://127.0.0.1:*"  # any free port: tests never collide
    return c


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where pycuda finds a CUDA device (the leased GPU machine)."""
    if not any("gpu" in item.keywords for item in items):
        return
    from kernels import gpu

    if gpu.available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (gpu tests run on the leased GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
