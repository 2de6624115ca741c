"""``make run-replicas``'s config: etc/hsmocsp-dev.yaml with etc/hsmocsp-replicas.yaml laid
over it (hsmocsp.devpki.run.replicas_config), so the handles are written down once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hsmocsp.devpki.run import _url, replicas_config
from hsmocsp.devpki.tools import DevPkiError

REPO = Path(__file__).resolve().parents[2]
DEV = REPO / "etc" / "hsmocsp-dev.yaml"
REPLICAS = REPO / "etc" / "hsmocsp-replicas.yaml"


def test_the_repository_files_merge_with_absolute_paths(tmp_path: Path) -> None:
    out = tmp_path / "replicas.yaml"
    merged = replicas_config(DEV, REPLICAS, out)
    assert yaml.safe_load(out.read_text()) == merged
    dev = yaml.safe_load(DEV.read_text())
    # Every handle and the token come from the dev config, unchanged but for the paths.
    assert merged["handles"].keys() == dev["handles"].keys()
    assert merged["handles"]["root"]["path"] == "/ocsp"
    assert merged["tokens"]["dev"]["pin_file"] == str(REPO / "var" / "devpki" / "pin")
    assert merged["data_dir"] == str(REPO / "var" / "data")
    # The replica keys, the Redis socket under var/redis.
    assert merged["store"] == {
        "kind": "redis",
        "address": f"unix:{REPO / 'var' / 'redis' / 'redis.sock'}",
        "key_prefix": "hsmocsp:",
    }
    assert merged["signer_url"] == "http://127.0.0.1:8080"
    assert merged["hot_cache_entries"] > 0
    # The signer's URL is where `make run` (and so the signer) listens.
    assert merged["listen"] == "tcp:8080:interface=127.0.0.1"
    assert _url(merged["listen"]) == merged["signer_url"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("store: {kind: redis, address: 127.0.0.1:6379}\nsigner_url: http://x:1\n", "unix:"),
        ("store: {kind: redis, address: unix:/r.sock}\n", "signer_url"),
        ("- a list\n", "not a mapping"),
    ],
)
def test_bad_overrides_name_the_file(tmp_path: Path, overrides: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(overrides)
    with pytest.raises(DevPkiError, match=message) as err:
        replicas_config(DEV, bad, tmp_path / "out.yaml")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out.yaml").exists()


def test_listen_endpoints_become_urls() -> None:
    assert _url("tcp:8081:interface=127.0.0.1") == "http://127.0.0.1:8081"
    assert _url("tcp:8082") == "http://127.0.0.1:8082"
    with pytest.raises(DevPkiError):
        _url("unix:/tmp/x")
