"""OpenSSLSource over real files, polled with a task.Clock (parsing runs inline).

Tests at the end use the real reactor: the index is parsed in a child process
(hsmocsp.sources.indexproc), the CRL and the diff in its thread pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver, Logger, formatEvent

from hsmocsp.errors import SourceError, SourceUnavailable, UnknownIssuer
from hsmocsp.health import Health, State
from hsmocsp.sources.indexproc import read_index
from hsmocsp.sources.openssl import IndexReader, OpenSSLSource
from hsmocsp.status import CertStatus, CRLReason, Status
from tests.conftest import LoggedErrors
from tests.factories import openssl_source
from tests.unit.test_crl import REVOKED_AT, make_ca, make_crl

POLL = 2.0
CRL_TIME = datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC)
INDEX_TIME = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def row(status: str, revocation: str, serial: int) -> str:
    return f"{status}\t301231235959Z\t{revocation}\t{serial:02X}\tunknown\t/CN=s{serial}\n"


BASE = row("V", "", 1) + row("V", "", 2) + row("R", "240506070809Z,superseded", 3)


class Env:
    """A CA, its index.txt and CRL files, a clock and a source under test."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.index = tmp_path / "index.txt"
        self.crl = tmp_path / "crl.pem"
        self.ca, self.key = make_ca()
        self.clock = task.Clock()
        self.events: list[dict[str, Any]] = []
        self.changes: list[frozenset[int] | None] = []
        self._mtime = 1_700_000_000_000_000_000
        self.write_index(BASE)
        self.write_crl([])

    def _bump(self, path: Path) -> None:
        # Distinct mtimes even when the test writes twice within one clock tick.
        self._mtime += 1_000_000_000
        os.utime(path, ns=(self._mtime, self._mtime))

    def write_index(self, text: str, *, in_place: bool = False) -> None:
        if in_place:
            with self.index.open("r+b" if self.index.exists() else "wb") as f:
                f.truncate(0)
                f.write(text.encode())
            self._bump(self.index)
        else:  # like openssl ca: write index.txt.new, rename over
            new = self.dir / "index.txt.new"
            new.write_text(text)
            self._bump(new)
            os.replace(new, self.index)

    def write_crl(self, entries: list[tuple[int, datetime, x509.ReasonFlags | None]]) -> bytes:
        crl = make_crl(self.ca, self.key, [(s, t, r, None) for s, t, r in entries])
        der = crl.public_bytes(Encoding.DER)
        self.crl.write_bytes(crl.public_bytes(Encoding.PEM))
        self._bump(self.crl)
        return der

    def source(self, *, crl: bool = True, read_index: IndexReader | None = None) -> OpenSSLSource:
        src: OpenSSLSource = openssl_source(
            self.ca,
            self.index,
            self.crl if crl else None,
            poll_interval=POLL,
            reactor=self.clock,
            read_index=read_index,
        )
        src._log = Logger(observer=cast(ILogObserver, self.events.append))
        src.on_change(self.changes.append)
        return src

    def started(self, *, crl: bool = True, read_index: IndexReader | None = None) -> OpenSSLSource:
        src = self.source(crl=crl, read_index=read_index)
        result = _result(src.start())
        assert result is None
        return src

    def poll(self) -> None:
        self.clock.advance(POLL)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"].name == "warn"]


def _result(d: Deferred[Any]) -> Any:
    """The synchronous result of a fired Deferred (raises its failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    outcome = results[0]
    if hasattr(outcome, "raiseException"):
        outcome.raiseException()
    return outcome


def status(src: OpenSSLSource, ca: x509.Certificate, serial: int) -> CertStatus:
    result = _result(src.status(ca, serial))
    assert isinstance(result, CertStatus)
    return result


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)


# --- start ------------------------------------------------------------------------------


def test_initial_load(env: Env) -> None:
    src = env.source()
    assert not src.ready()
    with pytest.raises(SourceUnavailable):
        status(src, env.ca, 1)
    assert _result(src.start()) is None
    assert src.ready()
    assert src.generation == 1
    assert src.issuers() == (env.ca,)
    assert status(src, env.ca, 1) == CertStatus.good()
    assert status(src, env.ca, 3) == CertStatus.revoked(INDEX_TIME, CRLReason.superseded)
    assert status(src, env.ca, 9).status is Status.unknown
    assert sorted(src.known_serials(env.ca)) == [1, 2, 3]
    der = src.crl_der(env.ca)
    assert der is not None
    assert x509.load_der_x509_crl(der).issuer == env.ca.subject
    assert env.changes == []


def test_other_issuer(env: Env) -> None:
    src = env.started()
    other, _ = make_ca("Other CA")
    with pytest.raises(UnknownIssuer):
        status(src, other, 1)
    assert src.crl_der(other) is None
    assert list(src.known_serials(other)) == []


def test_no_crl_configured(env: Env) -> None:
    src = env.started(crl=False)
    assert src.crl_der(env.ca) is None
    assert status(src, env.ca, 2) == CertStatus.good()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda e: e.index.unlink(), "index.txt: cannot read"),
        (lambda e: e.index.write_text(BASE + "V\tbroken\n"), r"index.txt:4: "),
        (lambda e: e.crl.write_text("not a crl"), "crl.pem: not a CRL"),
        (lambda e: e.crl.unlink(), "crl.pem: cannot read"),
    ],
)
def test_start_fails_when_a_file_cannot_load(env: Env, breakage: Any, message: str) -> None:
    breakage(env)
    src = env.source()
    with pytest.raises(SourceError, match=message):
        _result(src.start())
    assert not src.ready()


def test_start_fails_on_crl_of_another_ca(env: Env) -> None:
    other, other_key = make_ca("Other CA")
    env.crl.write_bytes(make_crl(other, other_key, []).public_bytes(Encoding.PEM))
    with pytest.raises(SourceError, match="is not the CA"):
        _result(env.source().start())


# --- reloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["rename", "in-place"])
def test_revocation_detected_and_listeners_told(env: Env, in_place: bool) -> None:
    src = env.started()
    env.write_index(
        row("R", "250101000000Z,keyTime,20241231000000Z", 1) + BASE.split("\n", 1)[1],
        in_place=in_place,
    )
    assert status(src, env.ca, 1) == CertStatus.good()  # not before the next poll
    env.poll()
    assert status(src, env.ca, 1) == CertStatus.revoked(
        CRL_TIME, CRLReason.keyCompromise, datetime(2024, 12, 31, tzinfo=UTC)
    )
    assert src.generation == 2
    assert env.changes == [frozenset({1})]


def test_new_serials_reported(env: Env) -> None:
    src = env.started()
    env.write_index(BASE + row("V", "", 0x40) + row("R", "240506070809Z", 0x41))
    env.poll()
    assert env.changes == [frozenset({0x40, 0x41})]
    assert status(src, env.ca, 0x40) == CertStatus.good()
    assert status(src, env.ca, 0x41) == CertStatus.revoked(INDEX_TIME)


def test_unchanged_content_does_not_bump_generation(env: Env) -> None:
    src = env.started()
    env.write_index(BASE)  # new inode and mtime, same rows
    env.poll()
    assert src.generation == 1
    assert env.changes == []


def test_broken_new_file_keeps_old_data_and_logs_once(env: Env) -> None:
    src = env.started()
    env.write_index(row("R", "250101000000Z", 1) + "V\t301231235959Z\t\t02\tunkno")
    for _ in range(4):
        env.poll()
    assert status(src, env.ca, 1) == CertStatus.good()
    assert status(src, env.ca, 3).status is Status.revoked
    assert src.generation == 1
    assert env.changes == []
    warnings = env.warnings()
    assert len(warnings) == 1, warnings
    assert "index.txt:2: last line has no newline" in warnings[0]
    assert "keeping last good data" in warnings[0]
    # The writer finishes: the next poll picks the complete file up.
    env.write_index(row("R", "250101000000Z", 1) + BASE.split("\n", 1)[1])
    env.poll()
    assert status(src, env.ca, 1) == CertStatus.revoked(CRL_TIME)
    assert env.changes == [frozenset({1})]


def test_health_degraded_while_a_file_is_bad_or_missing(env: Env) -> None:
    src = env.source()
    assert src.health().state is State.FAILED  # not loaded yet
    _result(src.start())
    assert src.health() == Health(State.READY)
    env.write_index("garbage\n")
    env.poll()
    health = src.health()
    assert health.state is State.DEGRADED
    assert "index.txt:1" in health.reason and "keeping last good data" in health.reason
    assert src.ready()  # still answers from the last good data
    env.write_index(BASE)
    env.poll()
    assert src.health() == Health(State.READY)
    env.crl.unlink()
    env.poll()
    assert src.health().state is State.DEGRADED and "crl" in src.health().reason.lower()
    env.write_crl([])
    env.poll()
    assert src.health() == Health(State.READY)
    assert src.state.errors == 2


def test_failed_file_retried_once_then_only_after_a_change(env: Env) -> None:
    calls: list[Path] = []

    def counting(path: Path) -> Deferred[Any]:
        calls.append(path)
        return maybeDeferred(read_index, path)

    src = env.started(read_index=counting)
    env.write_index("garbage\n")
    del calls[:]
    for _ in range(5):
        env.poll()
    assert len(calls) == 2  # first sight, one retry in case it was mid-write
    env.write_index("still garbage\n")  # changed, same problem: parsed, not logged again
    env.poll()
    assert len(calls) == 3
    assert len(env.warnings()) == 1
    env.write_index(row("X", "", 1))  # a different problem is logged
    env.poll()
    assert len(calls) == 4
    assert len(env.warnings()) == 2
    assert src.ready()


def test_deleted_file_keeps_old_data(env: Env) -> None:
    src = env.started()
    env.index.unlink()
    env.poll()
    env.poll()
    assert src.ready()
    assert status(src, env.ca, 1) == CertStatus.good()
    assert status(src, env.ca, 3).status is Status.revoked
    warnings = env.warnings()
    assert len(warnings) == 1 and "index.txt" in warnings[0], warnings
    env.write_index(BASE + row("V", "", 7))
    env.poll()
    assert status(src, env.ca, 7) == CertStatus.good()
    assert env.changes == [frozenset({7})]
    env.index.unlink()  # gone again: warned again
    env.poll()
    assert len(env.warnings()) == 2
    assert status(src, env.ca, 7) == CertStatus.good()


# --- the CRL ----------------------------------------------------------------------------


def test_crl_only_revocation_uses_crl_reason(env: Env) -> None:
    src = env.started()
    der = env.write_crl(
        [
            (2, CRL_TIME, x509.ReasonFlags.affiliation_changed),  # good in the index
            (3, CRL_TIME, x509.ReasonFlags.key_compromise),  # revoked in both: index wins
            (0x77, CRL_TIME, None),  # not in the index at all
        ]
    )
    env.poll()
    assert status(src, env.ca, 2) == CertStatus.revoked(CRL_TIME, CRLReason.affiliationChanged)
    assert status(src, env.ca, 3) == CertStatus.revoked(INDEX_TIME, CRLReason.superseded)
    assert status(src, env.ca, 0x77) == CertStatus.revoked(CRL_TIME, None)
    assert status(src, env.ca, 1) == CertStatus.good()
    assert src.crl_der(env.ca) == der
    assert src.generation == 2
    assert env.changes == [frozenset({2, 3, 0x77})]


def test_crl_only_revocation_at_start(env: Env) -> None:
    env.write_crl([(1, REVOKED_AT, x509.ReasonFlags.cessation_of_operation)])
    src = env.started()
    assert status(src, env.ca, 1) == CertStatus.revoked(REVOKED_AT, CRLReason.cessationOfOperation)


def test_new_crl_without_status_change_still_bumps_generation(env: Env) -> None:
    src = env.started()
    old = src.crl_der(env.ca)
    env.write_crl([])  # a re-issued CRL: new signature bytes, same entries
    env.poll()
    assert src.crl_der(env.ca) != old
    assert src.generation == 2
    assert env.changes == [frozenset()]


def test_bad_crl_keeps_old_crl(env: Env) -> None:
    src = env.started()
    old = src.crl_der(env.ca)
    other, other_key = make_ca("Other CA")
    env.crl.write_bytes(
        make_crl(other, other_key, [(1, CRL_TIME, None, None)]).public_bytes(Encoding.PEM)
    )
    env.poll()
    assert src.crl_der(env.ca) == old
    assert status(src, env.ca, 1) == CertStatus.good()
    assert any("is not the CA" in w for w in env.warnings())


def test_index_and_crl_change_together(env: Env) -> None:
    src = env.started()
    env.write_index(BASE + row("V", "", 0x20))
    env.write_crl([(0x20, CRL_TIME, x509.ReasonFlags.superseded)])
    env.poll()
    assert status(src, env.ca, 0x20) == CertStatus.revoked(CRL_TIME, CRLReason.superseded)
    assert env.changes == [frozenset({0x20})]
    assert src.generation == 2


def test_too_many_changes_give_none(env: Env) -> None:
    src = openssl_source(env.ca, env.index, reactor=env.clock, max_changed=2)
    src.on_change(env.changes.append)
    _result(src.start())
    env.write_index(BASE + "".join(row("V", "", s) for s in range(0x10, 0x20)))
    env.clock.advance(2.0)
    assert env.changes == [None]


def test_listener_error_does_not_stop_others(env: Env, logged_errors: LoggedErrors) -> None:
    src = env.started()

    def broken(_: frozenset[int] | None) -> None:
        raise RuntimeError("boom")

    src.on_change(broken)
    later: list[frozenset[int] | None] = []
    src.on_change(later.append)
    env.write_index(BASE + row("V", "", 9))
    env.poll()
    assert later == [frozenset({9})]
    env.write_index(BASE + row("V", "", 9) + row("V", "", 10))
    env.poll()  # polling survived the exception
    assert later == [frozenset({9}), frozenset({10})]
    assert len(logged_errors.take(RuntimeError)) == 2  # logged once per failed call


def test_stop_stops_polling(env: Env) -> None:
    src = env.started()
    assert _result(src.stop()) is None
    env.write_index(BASE + row("V", "", 9))
    env.poll()
    assert status(src, env.ca, 9).status is Status.unknown
    assert env.clock.getDelayedCalls() == []


# --- the real reactor and thread pool -----------------------------------------------------


async def _started_on_reactor(tmp_path: Path) -> tuple[OpenSSLSource, x509.Certificate, Path]:
    """A source on the real reactor (index parsed in a child process), started."""
    from twisted.internet import reactor

    ca, _key = make_ca()
    index = tmp_path / "index.txt"
    index.write_text(BASE)
    src = openssl_source(ca, index, poll_interval=3600.0, reactor=reactor)
    await src.start()
    return src, ca, index


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_reload_on_the_real_reactor(tmp_path: Path) -> None:
    src, ca, index = await _started_on_reactor(tmp_path)
    changes: list[frozenset[int] | None] = []
    src.on_change(changes.append)
    try:
        new = tmp_path / "index.txt.new"
        new.write_text(row("R", "250101000000Z,superseded", 1) + BASE.split("\n", 1)[1])
        os.replace(new, index)
        await src.check_now()
        assert changes == [frozenset({1})]
        result = await src.status(ca, 1)
        assert result == CertStatus.revoked(CRL_TIME, CRLReason.superseded)
    finally:
        await src.stop()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_stop_abandons_a_hung_parse(tmp_path: Path) -> None:
    src, ca, index = await _started_on_reactor(tmp_path)
    index.unlink()
    os.mkfifo(index)  # the child's open() blocks until stop() kills it
    checking = src.check_now()
    await src.stop()
    await checking
    assert src.ready()
    assert (await src.status(ca, 1)) == CertStatus.good()


def test_checked_at_tells_the_age_of_the_data(env: Env) -> None:
    src = env.started()
    assert src.checked_at == env.clock.seconds()
    env.poll()  # unchanged files: confirmed current
    assert src.checked_at == env.clock.seconds()
    env.write_index("garbage\n")
    env.poll()  # a file we could not load: the data we serve is getting older
    failed_at = env.clock.seconds()
    assert src.checked_at == failed_at - POLL
    env.write_index(BASE + row("V", "", 9))
    env.poll()
    assert src.checked_at == env.clock.seconds()
    env.index.unlink()
    env.poll()
    assert src.checked_at == env.clock.seconds() - POLL
