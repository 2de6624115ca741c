"""cfssl's db-config and certdb rows, the cfssl source over a real SQLite file, response files.

The SQLite rows are written the way Debian's cfssl 1.2.0 writes them (seen with ``cfssl
sign -db-config``/``cfssl revoke``): decimal serial as TEXT, empty AKI, Go's zero time in
``revoked_at`` for good rows, ``CURRENT_TIMESTAMP`` once revoked.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.internet import reactor

from hsmocsp.config import CfsslSourceConfig, load_config
from hsmocsp.errors import ConfigError, SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.health import State
from hsmocsp.presigned import parse_presigned
from hsmocsp.sources.certdb import (
    SCHEMA,
    DbConfig,
    decode_row,
    parse_when,
    read_db_config,
)
from hsmocsp.sources.cfssl import issuer_aki
from hsmocsp.sources.responsefile import read_response_file
from hsmocsp.status import CRLReason, Status
from tests.factories import cfssl_source
from tests.unit.test_crl import make_ca
from tests.waiting import wait_for

GO_ZERO = "0001-01-01 00:00:00+00:00"


def db_config(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "db.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data,key,problem",
    [
        ({"driver": "mysql", "data_source": "u:p@tcp(h)/db"}, "driver", "mysql is not supported"),
        ({"driver": "oracle", "data_source": "x"}, "driver", "not one of sqlite3, postgres"),
        ({"driver": "sqlite3"}, "data_source", "non-empty string"),
        ({"driver": "sqlite3", "data_source": "nope.db"}, "data_source", "does not exist"),
        ("{not json", "(file)", "not valid JSON"),
        ([1, 2], "(top level)", "JSON object"),
    ],
)
def test_db_config_errors_name_file_and_key(
    tmp_path: Path, data: Any, key: str, problem: str
) -> None:
    path = db_config(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        read_db_config(path)
    assert str(path) in str(err.value)
    assert err.value.key == key
    assert problem in str(err.value)


def test_postgres_dsn_never_in_messages(tmp_path: Path) -> None:
    secret = "s3cr3t-pw"
    cfg = read_db_config(db_config(tmp_path, {
        "driver": "postgres",
        "data_source": f"postgres://cfssl:{secret}@db.example:5433/certdb?sslmode=disable",
    }))  # fmt: skip
    assert cfg.driver == "postgres"
    assert secret not in cfg.describe() and "db.example:5433/certdb" in cfg.describe()
    with pytest.raises(ConfigError) as err:
        read_db_config(db_config(tmp_path, {"driver": "postgres", "data_source": f"'{secret}"}))
    assert secret not in str(err.value)


def test_sqlite_path_relative_to_the_db_config(tmp_path: Path) -> None:
    (tmp_path / "certs.db").touch()
    cfg = read_db_config(db_config(tmp_path, {"driver": "sqlite3", "data_source": "certs.db"}))
    assert cfg.sqlite_path == tmp_path / "certs.db"
    cfg = read_db_config(
        db_config(tmp_path, {"driver": "sqlite3", "data_source": "file:certs.db?cache=shared"})
    )
    assert cfg.sqlite_path == tmp_path / "certs.db"


def test_when_as_cfssl_drivers_write_it() -> None:
    assert parse_when(GO_ZERO) is None
    assert parse_when(None) is None
    assert parse_when(datetime(1, 1, 1)) is None
    assert parse_when("2026-12-02 07:42:28") == datetime(2026, 12, 2, 7, 42, 28, tzinfo=UTC)
    assert parse_when("2026-12-06 07:42:33.668822233+00:00") == datetime(
        2026, 12, 6, 7, 42, 33, 668822, tzinfo=UTC
    )
    assert parse_when("2026-12-06T09:42:33+02:00") == datetime(2026, 12, 6, 7, 42, 33, tzinfo=UTC)
    assert parse_when(datetime(2026, 1, 2, 3, 4, 5)) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_when("yesterday")


def test_rows_decode_and_refuse_garbage() -> None:
    row = decode_row(b"12345", b"AB:CD", b"revoked", 1, "2026-12-02 07:42:28")
    assert row.serial == 12345 and row.aki == "abcd"
    assert row.status.status is Status.revoked and row.status.reason is CRLReason.keyCompromise
    assert decode_row("7", "", "good", 0, GO_ZERO).status.status is Status.good
    with pytest.raises(ValueError, match="not a decimal"):
        decode_row("0x7", "", "good", 0, GO_ZERO)
    with pytest.raises(ValueError, match="neither good nor revoked"):
        decode_row("7", "", "expired", 0, GO_ZERO)


def test_config_kinds_and_signer_none(tmp_path: Path) -> None:
    (tmp_path / "certs.db").touch()
    db_config(tmp_path, {"driver": "sqlite3", "data_source": "certs.db"})
    for name in ("ca.pem", "ocsp.pem", "key.pem", "dump.txt"):
        (tmp_path / name).write_text("x")
    cfg_path = tmp_path / "hsmocsp.yaml"

    def load(handle: str) -> Any:
        cfg_path.write_text("handles:\n  h:\n    path: /ocsp\n" + handle)
        return load_config(cfg_path)

    cfg = load("    issuer: ca.pem\n    responder_cert: ocsp.pem\n    signer: {file: key.pem}\n"
               "    source: {kind: cfssl, db_config: db.json, poll_interval: 1}\n")  # fmt: skip
    src = cfg.handles[0].source
    assert isinstance(src, CfsslSourceConfig) and src.db.sqlite_path == tmp_path / "certs.db"
    cfg = load("    signer: none\n    source: {kind: cfssl, db_config: db.json}\n")
    assert cfg.handles[0].signer is None and cfg.handles[0].issuer is None
    cfg = load("    signer: none\n    source: {kind: response-file, path: dump.txt}\n")
    assert cfg.handles[0].signer is None
    for handle, key, problem in [
        ("    signer: {file: key.pem}\n    responder_cert: ocsp.pem\n"
         "    source: {kind: response-file, path: dump.txt}\n", "handles.h.signer", "signer: none"),
        ("    signer: none\n    issuer: ca.pem\n    source: {kind: openssl, index: dump.txt}\n",
         "handles.h.signer", "only for"),
        ("    signer: {file: key.pem}\n    responder_cert: ocsp.pem\n"
         "    source: {kind: cfssl, db_config: db.json}\n", "handles.h.issuer", "required"),
        ("    signer: none\n    source: {kind: cfssl, db_config: nope.json}\n",
         "handles.h.source.db_config", "does not exist"),
        ("    signer: none\n    source: {kind: response-file}\n", "handles.h.source.path",
         "required"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load(handle)
        assert err.value.key == key, err.value
        assert problem in str(err.value)


# --- the source over a real SQLite certdb --------------------------------------------------


class CertDb:
    """A SQLite certdb with cfssl's schema, written as cfssl 1.2.0 writes it."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "certdb.sqlite"
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        for statement in SCHEMA["sqlite3"]:
            self.conn.execute(statement)

    def add(self, serial: int | str, aki: str = "", status: str = "good", reason: int = 0,
            revoked_at: str = GO_ZERO) -> None:  # fmt: skip
        self.conn.execute(
            "INSERT INTO certificates VALUES (?, ?, '', ?, ?, '2030-01-01 00:00:00+00:00', ?, 'x')",
            (str(serial), aki, status, reason, revoked_at),
        )

    def revoke(self, serial: int, aki: str, reason: int) -> None:
        # What `cfssl revoke` runs.
        self.conn.execute(
            "UPDATE certificates SET status='revoked', revoked_at=CURRENT_TIMESTAMP, reason=? "
            "WHERE serial_number=? AND authority_key_identifier=?",
            (reason, str(serial), aki),
        )

    def config(self) -> DbConfig:
        return DbConfig(self.path, "sqlite3", str(self.path), sqlite_path=self.path)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_source_over_sqlite_certdb(tmp_path: Path) -> None:
    ca, _ = make_ca("cfssl unit CA")
    other, _ = make_ca("another CA")
    aki = issuer_aki(ca)
    db = CertDb(tmp_path)
    db.add(1)  # cfssl 1.2.0: empty AKI
    db.add(2, aki, "revoked", 1, "2026-01-02 03:04:05")
    db.add(3, "ffff")  # another CA's row in a shared certdb
    db.add("not-a-serial")
    source = cfssl_source(db.config(), ca, poll_interval=0.05, reactor=reactor)
    changes: list[frozenset[int] | None] = []
    source.on_change(changes.append)
    await source.start()
    try:
        assert source.ready() and source.health().ready
        assert (await source.status(ca, 1)).status is Status.good
        revoked = await source.status(ca, 2)
        assert revoked.reason is CRLReason.keyCompromise
        assert revoked.revocation_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert (await source.status(ca, 3)).status is Status.unknown
        assert (await source.status(ca, 99)).status is Status.unknown
        with pytest.raises(UnknownIssuer):
            await source.status(other, 1)
        assert sorted(source.known_serials(ca)) == [1, 2]

        # Issued after an "unknown" answer: the change names it (the cache drops "unknown").
        db.add(99)
        await wait_for(lambda: any(c and 99 in c for c in changes), "a change naming serial 99", 10)
        assert (await source.status(ca, 99)).status is Status.good
        # cfssl revoke: seen by the revoked_at watermark, with its reason.
        db.conn.execute(
            "UPDATE certificates SET authority_key_identifier=? WHERE serial_number='1'", (aki,)
        )
        db.revoke(1, aki, 4)
        await wait_for(lambda: any(c and 1 in c for c in changes), "a change naming serial 1", 10)
        now = await source.status(ca, 1)
        assert now.status is Status.revoked and now.reason is CRLReason.superseded
        assert now.revocation_time is not None
        assert abs(now.revocation_time - datetime.now(UTC)) < timedelta(minutes=5)
    finally:
        await source.stop()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_database_gone_known_serials_served_new_ones_try_later(tmp_path: Path) -> None:
    ca, _ = make_ca("cfssl unit CA")
    db = CertDb(tmp_path)
    db.add(1)
    source = cfssl_source(db.config(), ca, poll_interval=0.05, reactor=reactor)
    await source.start()
    try:
        # The database file goes away (both connections are reopened from its path).
        gone = DbConfig(db.path, "sqlite3", "x", sqlite_path=tmp_path / "moved.sqlite")
        for certdb in (source._db, source._lookup_db):
            certdb.close()
            certdb.cfg = gone
        await wait_for(lambda: not source.ready(), "the source to be not ready", 10)
        assert source.health().state is State.DEGRADED
        assert "new serials get tryLater" in source.health().reason
        assert (await source.status(ca, 1)).status is Status.good  # loaded: still answered
        opened: list[int] = []
        real_open = source._lookup_db._open

        def counting_open() -> Any:
            opened.append(1)
            return real_open()

        source._lookup_db._open = counting_open  # type: ignore[method-assign]
        for _ in range(3):
            with pytest.raises(SourceUnavailable):
                await source.status(ca, 2)  # needs the database: tryLater
        assert opened == []  # known down: no connection attempt per new serial
        for certdb in (source._db, source._lookup_db):
            certdb.cfg = db.config()
        await wait_for(source.ready, "the source to be ready again", 10)
        assert (await source.status(ca, 2)).status is Status.unknown
    finally:
        await source.stop()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_source_without_tables_says_which_migration(tmp_path: Path) -> None:
    ca, _ = make_ca()
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).close()
    cfg = DbConfig(path, "sqlite3", str(path), sqlite_path=path)
    source = cfssl_source(cfg, ca, reactor=reactor)
    with pytest.raises(SourceError, match="migration 001"):
        await source.start()


# --- pre-signed responses ------------------------------------------------------------------


def _response(ca: x509.Certificate, key: Any, serial: int) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=b"\x01" * 20, issuer_key_hash=b"\x02" * 20, serial_number=serial,
            algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now, next_update=now + timedelta(hours=1), revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
    )  # fmt: skip
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_response_file_lines_checked_and_named(tmp_path: Path) -> None:
    ca, key = make_ca()
    lines = [base64.b64encode(_response(ca, key, s)) for s in (5, 6)]
    dump = tmp_path / "dump.txt"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    responses, _ = read_response_file(dump)
    assert [r.serial for r in responses] == [5, 6]
    assert responses[0].der == base64.b64decode(lines[0])
    dump.write_bytes(lines[0] + b"\n" + base64.b64encode(b"\x30\x03\x0a\x01\x06") + b"\n")
    with pytest.raises(SourceError, match=r"dump.txt: line 2: .*UNAUTHORIZED"):
        read_response_file(dump)
    dump.write_bytes(b"%%%\n")
    with pytest.raises(SourceError, match="line 1"):
        read_response_file(dump)
    assert parse_presigned(base64.b64decode(lines[1]))[0].next_update is not None
