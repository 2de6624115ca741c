"""cfssl's certificate database (certdb): its db-config file, its rows, its queries.

cfssl records every certificate it signs with ``-db-config`` in a table ``certificates``
and keeps pre-signed answers in ``ocsp_responses`` (both from its migration ``001``; a
later cfssl adds columns we do not read). This module knows how cfssl *writes* them, which
is not always what the column types say (measured with Debian's golang-cfssl 1.2.0):

* ``serial_number`` is the decimal serial as text (SQLite stores a TEXT value in the
  ``blob`` column; PostgreSQL ``bytea`` holds the ASCII digits);
* ``authority_key_identifier`` is the issuer's SubjectKeyIdentifier in lowercase hex as a
  current cfssl writes it, but **empty on every row** this cfssl 1.2.0 writes;
* ``status`` is ``good`` or ``revoked``; ``reason`` the RFC 5280 code;
* ``revoked_at`` is Go's zero time (``0001-01-01 00:00:00+00:00``) for good rows and
  ``CURRENT_TIMESTAMP`` (UTC in SQLite; the session's time zone in PostgreSQL, a
  ``timestamp`` without zone) once ``cfssl revoke`` set it;
* ``ocsp_responses.body`` is the DER response (in SQLite a TEXT value holding raw bytes).

All queries here are blocking and run in one thread of our own (:class:`DbThread`), never
on the reactor. Why not ``twisted.enterprise.adbapi``: with ``cp_reconnect`` it logs
"Rollback failed" with a traceback for every query while the database is down (we must say
so once), and without it a broken connection is never replaced; one thread with one
connection we reopen ourselves is all a poller and a few point lookups need.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from hsmocsp.errors import ConfigError, SourceError, SourceUnavailable
from hsmocsp.status import CertStatus, CRLReason, Status

__all__ = [
    "CertDB",
    "CertRow",
    "DbConfig",
    "DbThread",
    "parse_when",
    "read_db_config",
]

_T = TypeVar("_T")

#: Rows per fetch when streaming a whole table.
FETCH_ROWS = 10_000
#: PostgreSQL: refuse to wait longer than this for a connection or a statement.
PG_CONNECT_TIMEOUT = 5
PG_STATEMENT_TIMEOUT_MS = 30_000


@dataclass(frozen=True, slots=True)
class DbConfig:
    """cfssl's db-config (``{"driver": ..., "data_source": ...}``), checked.

    ``data_source`` may hold a password: it is never logged nor put in an error; use
    :meth:`describe` for messages.
    """

    file: Path
    driver: Literal["sqlite3", "postgres"]
    data_source: str
    sqlite_path: Path | None = None

    def describe(self) -> str:
        if self.sqlite_path is not None:
            return f"cfssl certdb {self.sqlite_path}"
        return f"cfssl certdb postgres {_pg_where(self.data_source)} (from {self.file})"


def _pg_where(dsn: str) -> str:
    """host:port/dbname of a libpq connection string, without user or password."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable data_source)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    return f"{host}:{port}/{parts.get('dbname') or '(default db)'}"


def read_db_config(file: Path) -> DbConfig:
    """Read and check cfssl's db-config JSON; errors name the file and the key.

    A relative SQLite path is taken relative to the db-config file (cfssl itself resolves
    it against its working directory, which a service file seldom makes obvious).
    """
    try:
        data = json.loads(file.read_text())
    except OSError as err:
        raise ConfigError(str(file), "(file)", f"cannot read: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(str(file), "(file)", f"not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(str(file), "(top level)", "must be a JSON object")
    driver = data.get("driver")
    source = data.get("data_source")
    if driver == "mysql":
        raise ConfigError(
            str(file), "driver", "mysql is not supported by hsmocsp (use sqlite3 or postgres)"
        )
    if driver not in ("sqlite3", "postgres"):
        raise ConfigError(str(file), "driver", f"{driver!r} is not one of sqlite3, postgres")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(str(file), "data_source", "must be a non-empty string")
    if driver == "sqlite3":
        path_text = source
        if path_text.startswith("file:"):
            path_text = path_text[len("file:") :].split("?", 1)[0]
        path = Path(path_text).expanduser()
        if not path.is_absolute():
            path = (file.parent / path).resolve()
        if not path.is_file():
            raise ConfigError(str(file), "data_source", f"SQLite database {path} does not exist")
        return DbConfig(file=file, driver="sqlite3", data_source=source, sqlite_path=path)
    try:
        from psycopg.conninfo import conninfo_to_dict

        conninfo_to_dict(source)
    except ImportError as err:
        raise ConfigError(
            str(file), "driver", "postgres needs the Python package psycopg (pip install psycopg)"
        ) from err
    except Exception as err:
        # The message of a libpq parse error may quote the string: say only what is wrong.
        raise ConfigError(str(file), "data_source", "not a valid libpq connection string") from err
    return DbConfig(file=file, driver="postgres", data_source=source)


# --- values -------------------------------------------------------------------------------

_WHEN = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d+))?\s*(Z|[+-]\d\d:?\d\d)?(?:\s+\w+)?$"
)


def parse_when(value: object) -> datetime | None:
    """A timestamp as cfssl's drivers store it, as aware UTC; None for NULL or Go's zero time.

    SQLite holds text (``2027-12-02 07:37:00+00:00``, ``...07:42:33.668822233+00:00``,
    ``CURRENT_TIMESTAMP``'s ``2026-12-02 07:42:28``); PostgreSQL gives a naive
    ``datetime`` of a ``timestamp`` column, taken as UTC (what cfssl's Go values are).
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    else:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        m = _WHEN.match(text.strip())
        if m is None:
            raise ValueError(f"not a timestamp: {text[:40]!r}")
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
        if year <= 1:
            return None
        tz = UTC
        offset = m.group(8)
        if offset and offset != "Z":
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            tz = timezone(sign * delta)
        when = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    if when.year <= 1:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _text(value: object) -> str:
    if type(value) is str:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("ascii", "replace")
    return "" if value is None else str(value)


def normalize_aki(value: object) -> str:
    """An authority key identifier as cfssl writes it: lowercase hex, no colons."""
    if not value:
        return ""
    return _text(value).strip().replace(":", "").lower()


@dataclass(frozen=True, slots=True)
class CertRow:
    """One ``certificates`` row, decoded."""

    serial: int
    aki: str
    status: CertStatus
    revoked_at: datetime | None
    rowid: int = 0


def decode_row(serial: object, aki: object, status: object, reason: object,
               revoked_at: object, rowid: object = 0) -> CertRow:  # fmt: skip
    """Decode one row; raises ValueError with what is wrong."""
    serial_text = _text(serial)
    if not serial_text.isdigit():
        serial_text = serial_text.strip()
    if not serial_text.isdigit():
        raise ValueError(f"serial_number {serial_text[:60]!r} is not a decimal number")
    state = _text(status)
    if state not in ("good", "revoked"):
        state = state.strip().lower()
    if state == "good":
        # revoked_at of a good row is Go's zero time: not parsed (a million rows load faster).
        cs, when = CertStatus.good(), None
    elif state == "revoked":
        when = parse_when(revoked_at)
        why = (
            CRLReason(reason)
            if isinstance(reason, int) and reason in CRLReason._value2member_map_
            else None
        )
        # cfssl revoke without -reason records 0 (unspecified); keep what it recorded.
        cs = CertStatus.revoked(when or datetime(1970, 1, 1, tzinfo=UTC), why)
    else:
        raise ValueError(f"status {state[:20]!r} is neither good nor revoked")
    return CertRow(int(serial_text), normalize_aki(aki), cs, when,
                   rowid if isinstance(rowid, int) else 0)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Loaded:
    """A whole ``certificates`` table, as statuses of one CA."""

    good: set[int]
    revoked: dict[int, CertStatus]
    max_rowid: int
    newest_revocation: datetime | None


# --- blocking access ------------------------------------------------------------------------

_COLS = "serial_number, authority_key_identifier, status, reason, revoked_at"


class CertDB:
    """Blocking queries over one connection; call only from the :class:`DbThread`.

    Every failure to reach the database becomes :class:`SourceUnavailable` (the connection
    is dropped and reopened by the next call); a missing table is a :class:`SourceError`
    that says which migration to apply.
    """

    def __init__(self, cfg: DbConfig) -> None:
        self.cfg = cfg
        self._conn: Any = None
        self.is_sqlite = cfg.driver == "sqlite3"
        self._ph = "?" if self.is_sqlite else "%s"

    # connection ------------------------------------------------------------------------

    def _open(self) -> Any:
        if self.is_sqlite:
            assert self.cfg.sqlite_path is not None
            uri = f"file:{quote(str(self.cfg.sqlite_path))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            return conn
        import psycopg

        return psycopg.connect(
            self.cfg.data_source,
            autocommit=True,
            connect_timeout=PG_CONNECT_TIMEOUT,
            options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.is_sqlite:
            return (sqlite3.Error,)
        import psycopg

        return (psycopg.Error,)

    def run(self, work: Callable[[Any], _T]) -> _T:
        """Run ``work(connection)``, mapping driver errors to our exception types.

        A connection opened before the database restarted fails on first use: the work is
        tried once more on a new connection before the database counts as unreachable.
        """
        reused = self._conn is not None
        try:
            return self._run_once(work)
        except SourceUnavailable:
            if not reused:
                raise
            return self._run_once(work)

    def _run_once(self, work: Callable[[Any], _T]) -> _T:
        try:
            if self._conn is None:
                self._conn = self._open()
            return work(self._conn)
        except self._errors() as err:
            self.close()
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "no such table" in text or ("relation" in text and "does not exist" in text):
                raise SourceError(
                    f"{self.cfg.describe()}: {text} (apply cfssl's certdb migration 001 "
                    "first: see docs/cfssl.md)"
                ) from None
            raise SourceUnavailable(f"{self.cfg.describe()}: {text}") from None

    # queries (take the open connection) ---------------------------------------------------

    def _select(self, conn: Any, where: str = "", params: Sequence[object] = ()) -> Iterator[
        tuple[Any, ...]
    ]:
        cols = ("rowid, " if self.is_sqlite else "") + _COLS
        sql = f"SELECT {cols} FROM certificates {where}"
        cur = conn.cursor()
        try:
            cur.execute(sql, tuple(params))
            while True:
                rows = cur.fetchmany(FETCH_ROWS)
                if not rows:
                    return
                yield from rows
        finally:
            cur.close()

    def _decode(self, raw: Iterable[tuple[Any, ...]], bad: list[str]) -> list[CertRow]:
        out: list[CertRow] = []
        for row in raw:
            try:
                if self.is_sqlite:
                    rowid, serial, aki, status, reason, revoked_at = row
                    out.append(decode_row(serial, aki, status, reason, revoked_at, rowid))
                else:
                    serial, aki, status, reason, revoked_at = row
                    out.append(decode_row(serial, aki, status, reason, revoked_at))
            except ValueError as err:
                if len(bad) < 5:
                    bad.append(str(err))
        return out

    def load_all(self, conn: Any, aki: str, bad: list[str]) -> Loaded:
        """The whole table as statuses of the CA with key id ``aki`` (or an empty AKI).

        The one path that sees every row, so it avoids :func:`decode_row` for the common
        good row: a million rows take seconds, not tens of them.
        """
        good: set[int] = set()
        revoked: dict[int, CertStatus] = {}
        newest: datetime | None = None
        rows = self._select(conn)
        if self.is_sqlite:
            rows = (row[1:] for row in rows)
        for serial, row_aki, status, reason, revoked_at in rows:
            if row_aki and normalize_aki(row_aki) != aki:
                continue
            if status == "good" or status == b"good":
                try:
                    number = int(serial)
                except ValueError:
                    number = -1
                if number >= 0:
                    if number not in revoked:
                        good.add(number)
                    continue
            try:
                row = decode_row(serial, row_aki, status, reason, revoked_at)
            except ValueError as err:
                if len(bad) < 5:
                    bad.append(str(err))
                continue
            if row.status.status is Status.revoked:
                revoked[row.serial] = row.status
                good.discard(row.serial)
                if row.revoked_at is not None and (newest is None or row.revoked_at > newest):
                    newest = row.revoked_at
            elif row.serial not in revoked:
                good.add(row.serial)
        max_rowid = 0
        if self.is_sqlite:
            cur = conn.cursor()
            try:
                cur.execute("SELECT max(rowid) FROM certificates")
                found = cur.fetchone()
                max_rowid = int(found[0]) if found and found[0] is not None else 0
            finally:
                cur.close()
        return Loaded(good, revoked, max_rowid, newest)

    def rows_after(self, conn: Any, rowid: int, bad: list[str]) -> list[CertRow]:
        """SQLite: rows inserted since ``rowid`` (cfssl never rewrites a row's rowid)."""
        return self._decode(self._select(conn, f"WHERE rowid > {self._ph}", (rowid,)), bad)

    def revoked_since(self, conn: Any, since: datetime, bad: list[str]) -> list[CertRow]:
        """Rows whose ``revoked_at`` is after ``since`` (what ``cfssl revoke`` sets)."""
        param: object
        if self.is_sqlite:
            # Text comparison: both cfssl's formats start with 'YYYY-MM-DD HH:MM:SS'.
            param = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        else:
            param = since.astimezone(UTC).replace(tzinfo=None)
        return self._decode(self._select(conn, f"WHERE revoked_at > {self._ph}", (param,)), bad)

    def rows_for(self, conn: Any, serials: Sequence[int], bad: list[str]) -> list[CertRow]:
        """Rows of these serials (point lookups on the primary key)."""
        if not serials:
            return []
        texts = [str(s) for s in serials]
        if self.is_sqlite:
            marks = ", ".join("?" * len(texts))
            # cfssl 1.2.0 stores TEXT; another writer may have stored BLOBs of the digits.
            where = f"WHERE serial_number IN ({marks}) OR serial_number IN ({marks.replace('?', 'CAST(? AS BLOB)')})"  # noqa: E501
            return self._decode(self._select(conn, where, texts + texts), bad)
        return self._decode(
            self._select(conn, "WHERE serial_number = ANY(%s)", ([t.encode() for t in texts],)),
            bad,
        )

    def responses(self, conn: Any) -> list[bytes]:
        """Every body in ``ocsp_responses`` (DER OCSPResponse)."""
        body = "CAST(body AS BLOB)" if self.is_sqlite else "body"
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT {body} FROM ocsp_responses")
            return [bytes(r[0]) for r in cur.fetchall() if r[0] is not None]
        finally:
            cur.close()

    def responses_signature(self, conn: Any) -> tuple[object, ...]:
        """Something that changes when ``cfssl ocsprefresh`` rewrites the table."""
        cur = conn.cursor()
        try:
            cur.execute("SELECT count(*), max(expiry) FROM ocsp_responses")
            row = cur.fetchone()
            return tuple(row) if row is not None else ()
        finally:
            cur.close()


class DbThread:
    """One thread of our own that owns the :class:`CertDB` connection."""

    def __init__(self, db: CertDB, reactor: Any, name: str = "hsmocsp-certdb") -> None:
        self.db = db
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.callInThread(self.db.close)
            self._pool.stop()

    def run(self, work: Callable[[Any], _T]) -> Deferred[_T]:
        """``work(connection)`` in the thread; errors as :meth:`CertDB.run` maps them."""
        return deferToThreadPool(self._reactor, self._pool, self.db.run, work)


# --- the schema (cfssl's migration 001, which cfssl does not apply itself) ------------------

#: ``certificates`` and ``ocsp_responses`` as cfssl's 001 migration makes them, plus an
#: index on ``revoked_at`` so our revocation poll reads only new revocations. For tools
#: that set up a certdb (the dev PKI, tests); hsmocsp itself only reads.
SCHEMA: dict[str, tuple[str, ...]] = {
    "sqlite3": (
        """CREATE TABLE IF NOT EXISTS certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY (serial_number, authority_key_identifier)
)""",
        """CREATE TABLE IF NOT EXISTS ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY (serial_number, authority_key_identifier),
  FOREIGN KEY (serial_number, authority_key_identifier)
    REFERENCES certificates (serial_number, authority_key_identifier)
)""",
        "CREATE INDEX IF NOT EXISTS certificates_revoked_at ON certificates (revoked_at)",
    ),
    "postgres": (
        """CREATE TABLE IF NOT EXISTS certificates (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  ca_label                 bytea,
  status                   bytea NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      bytea NOT NULL,
  PRIMARY KEY (serial_number, authority_key_identifier)
)""",
        """CREATE TABLE IF NOT EXISTS ocsp_responses (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  body                     bytea NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY (serial_number, authority_key_identifier),
  FOREIGN KEY (serial_number, authority_key_identifier)
    REFERENCES certificates (serial_number, authority_key_identifier)
)""",
        "CREATE INDEX IF NOT EXISTS certificates_revoked_at ON certificates (revoked_at)",
    ),
}


def connect_writable(cfg: DbConfig) -> Any:
    """A read-write DB-API connection (autocommit) for tools; hsmocsp never writes."""
    if cfg.driver == "sqlite3":
        assert cfg.sqlite_path is not None
        return sqlite3.connect(cfg.sqlite_path, isolation_level=None)
    import psycopg

    return psycopg.connect(cfg.data_source, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT)


def create_schema(conn: Any, driver: str) -> None:
    """Apply :data:`SCHEMA` for ``driver`` (idempotent)."""
    cur = conn.cursor()
    try:
        for statement in SCHEMA[driver]:
            cur.execute(statement)
    finally:
        cur.close()
