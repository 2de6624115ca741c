"""A real PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a scratch directory.

PostgreSQL refuses to run as root, so when the tests run as root (CI does) the cluster is
made and run as the unprivileged user ``nobody`` (``runuser``/``setpriv``), in a scratch
directory of its own outside pytest's root-only temp tree. It listens on a free loopback
port with ``trust`` authentication (loopback, test only) and no Unix socket outside its
directory. One cluster per test session; databases are made per test.

Binaries are found on PATH or under Debian's ``/usr/lib/postgresql/<version>/bin``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hsmocsp.devpki.bao import free_port
from tests.waiting import wait_until

RUN_AS = "nobody"


def find_pg_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl`` on PATH, else the newest Debian ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parts[-3]
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    candidates.sort(key=version)
    return candidates[-1] if candidates else None


@dataclass
class PgCluster:
    """A running cluster; ``dsn(db)`` is a libpq string for database ``db``."""

    directory: Path
    port: int = 0
    _as_user: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db} sslmode=disable"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        proc = subprocess.run(
            [*self._as_user, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            check=False,
        )
        if proc.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{tail}"
            )

    def init(self) -> PgCluster:
        initdb = find_pg_bin("initdb")
        if initdb is None:
            raise RuntimeError("initdb not found: install the Debian package 'postgresql'")
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root needs runuser (util-linux) to drop to nobody")
            self._as_user = [runuser, "-u", RUN_AS, "--"]
            shutil.chown(self.directory, RUN_AS)
        self.directory.chmod(0o700)
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale", "C")  # fmt: skip
        self.port = free_port()
        return self

    def start(self) -> None:
        pg_ctl = find_pg_bin("pg_ctl")
        assert pg_ctl is not None
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.directory} -c fsync=off "
                "-c timezone=UTC")  # fmt: skip
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        pg_ctl = find_pg_bin("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        import psycopg

        def created() -> bool:
            try:
                with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
            except psycopg.OperationalError:
                return False  # not accepting connections yet
            return True

        wait_until(created, f"PostgreSQL to accept connections (database {name})")
        return self.dsn(name)


def start_cluster() -> PgCluster:
    """A new, started cluster in a scratch directory (caller stops and removes it)."""
    directory = Path(tempfile.mkdtemp(prefix="hsmocsp-pg-"))
    cluster = PgCluster(directory)
    try:
        cluster.init().start()
    except BaseException:
        remove_cluster(cluster)  # a failed or interrupted start leaves no server behind
        raise
    return cluster


def remove_cluster(cluster: PgCluster) -> None:
    if cluster.running():
        try:
            cluster.stop()
        except RuntimeError:
            pass
    shutil.rmtree(cluster.directory, ignore_errors=True)
