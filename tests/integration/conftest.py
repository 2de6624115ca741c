"""Session fixtures: a real dev PKI on SoftHSM and a running responder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmocsp.devpki.opensslca import DevPki, build_level1
from tests.integration.harness import Responder

SOFTHSM_PIN = "1234"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SoftHSM token "T" (PIN 1234) with keys rsa (01), p256 (02), p384 (03);
    SOFTHSM2_CONF points at it while the module runs (the signing workers inherit it)."""
    from tests.integration.softhsm_helpers import gen_keypair, init_token

    directory = tmp_path_factory.mktemp("softhsm")
    conf = init_token(directory, "T", SOFTHSM_PIN, "5678")
    gen_keypair(conf, "rsa", "01", "rsa:2048")
    gen_keypair(conf, "p256", "02", "EC:prime256v1")
    gen_keypair(conf, "p384", "03", "EC:secp384r1")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield conf
    if old is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="session")
def devpki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return build_level1(tmp_path_factory.mktemp("devpki"))


def dev_env(dev: DevPki) -> dict[str, str]:
    return dict(os.environ, SOFTHSM2_CONF=str(dev.softhsm_conf))


def level1_config(dev: DevPki, directory: Path, poll: float = 0.3, extra: str = "") -> Path:
    cfg = directory / "hsmocsp.yaml"
    cfg.write_text(f"""
data_dir: {directory / "data"}
tokens:
  dev:
    module: {dev.module}
    token_label: {dev.token_label}
    pin_file: {dev.pin_file}
    workers: 2
handles:
  root:
    path: /ocsp
    issuer: {dev.ca_pem}
    responder_cert: {dev.ocsp_pem}
    signer: {{token: dev, key_label: {dev.ocsp_key_label}}}
    source: {{kind: openssl, index: {dev.index}, crl: {dev.crl_der}, poll_interval: {poll}}}
    validity: 3600
    publish: {{ca: /ca/root.der, crl: /crl/root.crl}}
  root-ec:
    path: /ec/ocsp
    issuer: {dev.ca_pem}
    responder_cert: {dev.ocsp_ec_pem}
    signer: {{token: dev, key_id: "12"}}
    source: {{kind: openssl, index: {dev.index}, crl: {dev.crl_der}, poll_interval: {poll}}}
    validity: 600
{extra}
""")
    return cfg


@pytest.fixture(scope="session")
def responder(devpki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Responder]:
    work = tmp_path_factory.mktemp("responder")
    r = Responder(config=level1_config(devpki, work), env=dev_env(devpki), workdir=work)
    r.start()
    yield r
    r.stop()
