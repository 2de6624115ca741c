"""Config validation: every error names the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmocsp.config import FileKeyConfig, Pkcs11KeyConfig, Secret, VaultSourceConfig, load_config
from hsmocsp.errors import ConfigError

BASE = """
tokens:
  hsm:
    module: {module}
    token_label: t
    pin_env: TEST_PIN
handles:
  root:
    path: /ocsp
    issuer: ca.pem
    responder_cert: ocsp.pem
    signer: {{token: hsm, key_label: k}}
    source: {{kind: openssl, index: index.txt}}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("ca.pem", "ocsp.pem", "index.txt", "module.so", "key.pem"):
        (tmp_path / name).write_text("x")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    cfg = folder / "hsmocsp.yaml"
    cfg.write_text(text.format(module=folder / "module.so"))
    return cfg


def error_of(folder: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(folder, text))
    assert str(folder / "hsmocsp.yaml") in str(info.value)
    return info.value


def test_valid_config_resolves_paths_relative_to_file(folder: Path) -> None:
    cfg = load_config(write(folder, BASE))
    (handle,) = cfg.handles
    assert handle.issuer == folder / "ca.pem"
    assert isinstance(handle.signer, Pkcs11KeyConfig) and handle.signer.key_label == "k"
    assert cfg.tokens["hsm"].pin == Secret(env="TEST_PIN")
    assert handle.validity == 3600 and handle.nonce == "echo"


@pytest.mark.parametrize(
    "change,key,problem",
    [
        (("path: /ocsp", "path: ocsp"), "handles.root.path", "not a URL path"),
        (("path: /ocsp", "path: /healthz"), "handles.root.path", "reserved"),
        (("issuer: ca.pem", "issuer: nope.pem"), "handles.root.issuer", "does not exist"),
        (("key_label: k", "key_id: zz"), "handles.root.signer.key_id", "hex"),
        (("token: hsm,", "token: other,"), "handles.root.signer.token", "no token named"),
        (("kind: openssl", "kind: ldap"), "handles.root.source.kind", "not one of"),
        (("pin_env: TEST_PIN", "pin: 1234"), "tokens.hsm.pin", "not read from the config"),
        (("token_label: t", "slot: -1"), "tokens.hsm.slot", "non-negative"),
        (("token_label: t", "workers: 2"), "tokens.hsm.token_label", "exactly one"),
        # Checked here once, not again by TokenPool:
        (
            ("pin_env: TEST_PIN", "pin_env: TEST_PIN\n    pipeline: 0"),
            "tokens.hsm.pipeline",
            "least 1",
        ),
        (
            ("pin_env: TEST_PIN", "pin_env: TEST_PIN\n    workers: 0"),
            "tokens.hsm.workers",
            "least 1",
        ),
        (
            ("pin_env: TEST_PIN", "pin_env: TEST_PIN\n    max_queue: 0"),
            "tokens.hsm.max_queue",
            "least 1",
        ),
        (
            ("    path: /ocsp", "    path: /ocsp\n    colour: blue"),
            "handles.root.colour",
            "unknown key",
        ),
        (
            ("    path: /ocsp", "    path: /ocsp\n    validity: 5"),
            "handles.root.validity",
            "at least",
        ),
    ],
)
def test_errors_name_key(folder: Path, change: tuple[str, str], key: str, problem: str) -> None:
    err = error_of(folder, BASE.replace(*change))
    assert err.key == key
    assert problem in err.problem


def test_duplicate_paths_and_yaml_errors(folder: Path) -> None:
    dup = BASE + BASE.split("handles:\n")[1].replace("  root:", "  two:")
    assert "already used" in str(error_of(folder, dup))
    assert "not valid YAML" in str(error_of(folder, "handles: [\n"))


def test_file_signer_and_vault_source(folder: Path) -> None:
    text = """
handles:
  v:
    path: /pki/ocsp
    responder_cert: ocsp.pem
    signer: {{file: key.pem}}
    source:
      kind: vault
      address: http://127.0.0.1:8200/
      mount: /pki/
      auth: {{method: approle, role_id: r1, secret_id_file: sid}}
"""
    cfg = load_config(write(folder, text))
    (h,) = cfg.handles
    assert isinstance(h.signer, FileKeyConfig)
    assert isinstance(h.source, VaultSourceConfig)
    assert h.source.mount == "pki" and h.source.address == "http://127.0.0.1:8200"
    assert h.source.auth.secret_id == Secret(file=folder / "sid")


def test_secret_read_errors_do_not_leak(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_PIN", raising=False)
    with pytest.raises(ConfigError, match="TEST_PIN"):
        Secret(env="TEST_PIN").read("tokens.hsm.pin")
    monkeypatch.setenv("TEST_PIN", "s3cret")
    assert Secret(env="TEST_PIN").read("x") == "s3cret"
    with pytest.raises(ConfigError, match="cannot read"):
        Secret(file=folder / "missing").read("tokens.hsm.pin_file")


@pytest.mark.parametrize(
    "value, problem",
    [("0", "must be at least 1"), ("65", "must be at most 64"), ("two", "must be an integer")],
)
def test_http_workers_bounds(folder: Path, value: str, problem: str) -> None:
    err = error_of(folder, BASE + f"http_workers: {value}\n")
    assert "http_workers" in str(err) and problem in str(err)


def test_http_workers_default_and_set(folder: Path) -> None:
    assert load_config(write(folder, BASE)).http_workers == 1
    assert load_config(write(folder, BASE + "http_workers: 4\n")).http_workers == 4


def test_max_cached(folder: Path) -> None:
    (handle,) = load_config(write(folder, BASE)).handles
    assert handle.max_cached == 1_000_000
    (handle,) = load_config(write(folder, BASE + "    max_cached: 5000\n")).handles
    assert handle.max_cached == 5000
    err = error_of(folder, BASE + "    max_cached: 0\n")
    assert "handles.root.max_cached" in str(err) and "at least 1" in str(err)


def test_max_unknown_cached(folder: Path) -> None:
    (handle,) = load_config(write(folder, BASE)).handles
    assert handle.max_unknown_cached == 10_000
    (handle,) = load_config(write(folder, BASE + "    max_unknown_cached: 50\n")).handles
    assert handle.max_unknown_cached == 50
    err = error_of(folder, BASE + "    max_unknown_cached: 0\n")
    assert "handles.root.max_unknown_cached" in str(err) and "at least 1" in str(err)


def test_http_limits_and_access_log(folder: Path) -> None:
    cfg = load_config(write(folder, BASE))
    assert (cfg.request_timeout, cfg.idle_timeout, cfg.max_connections, cfg.max_url_length,
            cfg.access_log, cfg.access_log_file) == (10.0, 60.0, 0, 8192, "off", None)  # fmt: skip
    cfg = load_config(write(folder, BASE + "request_timeout: 5\nmax_connections: 500\n"
                                           "access_log: json\naccess_log_file: access.log\n"))
    assert (cfg.request_timeout, cfg.max_connections, cfg.access_log) == (5.0, 500, "json")
    assert cfg.access_log_file == folder / "access.log"
    assert load_config(write(folder, BASE + "access_log: off\n")).access_log == "off"
    for text, key in (("access_log: xml\n", "access_log"), ("request_timeout: 0\n",
                      "request_timeout"), ("max_url_length: 10\n", "max_url_length")):  # fmt: skip
        assert key in str(error_of(folder, BASE + text))
