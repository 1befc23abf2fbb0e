from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config


def test_builtin_default_needs_no_file():
    cfg = config.load(environ={})
    assert cfg.node.ae_title == "APPLIANCE"
    assert cfg.completion.idle_seconds == 5.0


def test_show_output_loads_back_identically():
    cfg = config.load(environ={})
    again = config.parse(config.to_toml(cfg))
    assert again == cfg


def test_file_values_and_env_overrides(tmp_path: Path):
    f = tmp_path / "a.toml"
    f.write_text('[node]\nae_title = "CT_BOX"\nport = 4242\n[peers]\nallowed_calling_ae_titles = ["CONSOLE"]\n')
    cfg = config.load(f, environ={"APPLIANCE_NODE__PORT": "104", "APPLIANCE_STORAGE__ROOT": "/data/spool"})
    assert (cfg.node.ae_title, cfg.node.port) == ("CT_BOX", 104)
    assert cfg.storage.root == Path("/data/spool")
    assert cfg.peers.calling_ae_allowed("CONSOLE") and not cfg.peers.calling_ae_allowed("OTHER")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nae_tittle = 'X'\n", "node.ae_tittle"),
        ("[node]\nae_title = 'THIS_AE_TITLE_IS_TOO_LONG'\n", "node.ae_title"),
        ("[peers]\nallowed_source_networks = ['10.0.0.0/33']\n", "allowed_source_networks"),
        ("[dicom]\nuid_root = '1.2.abc.'\n", "dicom.uid_root"),
        ("[node\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, text: str, expected: str):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(f, environ={})
    assert expected in str(err.value)
    assert str(f) in str(err.value)


def test_source_networks():
    peers = config.PeersConfig(allowed_source_networks=["10.1.0.0/16", "127.0.0.1"])
    assert peers.source_allowed("10.1.2.3") and peers.source_allowed("127.0.0.1")
    assert not peers.source_allowed("10.2.0.1") and not peers.source_allowed("not-an-ip")
    assert config.PeersConfig().source_allowed("192.0.2.7")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60)


def test_cli_config_check_reports_a_bad_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_instances_per_series = 0\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2
    assert "limits.max_instances_per_series" in res.stderr
    good = tmp_path / "good.toml"
    good.write_text(_cli("config", "show").stdout)
    res = _cli("config", "check", str(good))
    assert res.returncode == 0, res.stderr


def test_route_to_an_unknown_destination_is_refused():
    with pytest.raises(config.ConfigError) as err:
        config.parse('[[routes]]\npipeline = "passthrough"\ndestinations = ["pacs"]\n')
    assert "unknown destination" in str(err.value) and "pacs" in str(err.value)


def test_destinations_and_routes_from_toml():
    cfg = config.parse(
        '[destinations.pacs]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
        '[[routes]]\nmodalities = ["CT"]\nseries_description = "low ?dose"\npipeline = "denoise"\n'
        'destinations = ["pacs"]\n'
    )
    assert cfg.destinations["pacs"].port == 104 and cfg.routes[0].pipeline == "denoise"


def test_env_override_of_one_field_keeps_the_rest_of_a_default_table():
    cfg = config.load(environ={"APPLIANCE_DESTINATIONS__CONSOLE__PORT": "4006"})
    console = cfg.destinations["console"]
    assert (console.ae_title, console.host, console.port) == ("CONSOLE", "127.0.0.1", 4006)


def test_env_override_adds_to_a_table_from_the_file(tmp_path: Path):
    f = tmp_path / "a.toml"
    f.write_text('[destinations.pacs]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
                 '[[routes]]\npipeline = "passthrough"\ndestinations = ["pacs"]\n')
    cfg = config.load(f, environ={"APPLIANCE_DESTINATIONS__PACS__PORT": "11112"})
    assert list(cfg.destinations) == ["pacs"] and cfg.destinations["pacs"].port == 11112
