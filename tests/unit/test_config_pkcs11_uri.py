"""RFC 7512 ``pkcs11:`` URIs for a signer, beside ``{token, key_label | key_id}``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmocsp.config import Pkcs11KeyConfig, Secret, load_config
from hsmocsp.errors import ConfigError

TOKENS = """
tokens:
  hsm:
    module: {module}
    token_label: My Token
    pin_file: pin
"""

HANDLE = """
handles:
  root:
    path: /ocsp
    issuer: ca.pem
    responder_cert: ocsp.pem
    signer: {signer}
    source: {{kind: openssl, index: index.txt}}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("ca.pem", "ocsp.pem", "index.txt", "module.so", "pin"):
        (tmp_path / name).write_text("x")
    return tmp_path


def load(folder: Path, signer: str, tokens: bool = True) -> tuple[Pkcs11KeyConfig, object]:
    text = (TOKENS if tokens else "") + HANDLE
    cfg_file = folder / "hsmocsp.yaml"
    cfg_file.write_text(text.format(module=folder / "module.so", signer=signer))
    cfg = load_config(cfg_file)
    signer_cfg = cfg.handles[0].signer
    assert isinstance(signer_cfg, Pkcs11KeyConfig)
    return signer_cfg, cfg


def test_uri_naming_a_configured_token(folder: Path) -> None:
    signer, _ = load(folder, '"pkcs11:token=My%20Token;object=root-ocsp;type=private"')
    assert signer == Pkcs11KeyConfig(token="hsm", key_label="root-ocsp", key_id=None)


def test_uri_in_a_mapping_with_id_bytes(folder: Path) -> None:
    signer, _ = load(folder, '{uri: "pkcs11:token=My%20Token;id=%01%a2"}')
    assert signer.key_id == b"\x01\xa2" and signer.key_label is None


def test_uri_with_its_own_module_and_pin_source(folder: Path) -> None:
    module = folder / "module.so"
    signer, cfg = load(
        folder,
        f'"pkcs11:token=Other;object=k?module-path={module}&pin-source=file:pin"',
        tokens=False,
    )
    token = cfg.tokens[signer.token]  # type: ignore[attr-defined]
    assert signer.token == "pkcs11:Other" and signer.key_label == "k"
    assert token.module == module and token.token_label == "Other"
    assert token.pin == Secret(file=folder / "pin")


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("token=x;object=k", "starts with 'pkcs11:'"),
        ("pkcs11:token=My%20Token", "name the key"),
        ("pkcs11:object=k", "name the token"),
        ("pkcs11:token=My%20Token;object=k;type=cert", "type must be private"),
        ("pkcs11:token=My%20Token;object=k;serial=1", "'serial' not supported"),
        ("pkcs11:token=My%20Token;object=k?pin-value=1234", "pin-value puts the PIN"),
        ("pkcs11:token=Nope;object=k", "no token under tokens:"),
        ("pkcs11:token=Nope;object=k?module-path=/nonexistent.so&pin-source=p", "does not exist"),
        ("pkcs11:token=My%20Token;object=k;object=j", "given twice"),
    ],
)
def test_bad_uris_are_config_errors_naming_the_key(folder: Path, uri: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(folder, f'"{uri}"')
    assert "handles.root.signer" in str(info.value) and problem in str(info.value)
    assert "1234" not in str(info.value)  # a pin-value is never echoed
