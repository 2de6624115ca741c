"""``hsmocsp``: the operator's command beside ``twistd hsmocsp``.

``hsmocsp check --config FILE``
    Everything start-up checks (configuration, one PIN login per token, keys
    found, certificates against keys and issuers, sources readable, Vault
    reachable and authorised), without listening. One line per handle; exit 0
    if every handle would serve, 1 otherwise, 78 for a configuration error.
    With ``role: server`` (or ``--role server``) no token is used: lines
    ``configuration``, ``store`` (Redis answers, a signer's marker is there)
    and ``signer`` (``signer_url``/readyz answers 200); see
    :mod:`hsmocsp.cli.checkserver`.

``hsmocsp csr --config FILE --handle NAME --subject '/CN=...'``
``hsmocsp csr --config FILE --token NAME --key-label LABEL --subject '/CN=...'``
    A PKCS#10 request for the handle's (or token key's) public key, signed
    inside the HSM by that key through a one-worker signing pool; PEM on
    stdout, for the CA to issue the delegated OCSP signer certificate.

Both run their own short-lived reactor; PKCS#11 work happens in the signing
worker process, as in the service. Log lines (warnings and errors) go to
stderr, never to stdout, which carries only the result.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from hsmocsp import __version__

EXIT_OK = 0
EXIT_FAILED = 1
#: A configuration error (the shared contract's 78, as ``twistd hsmocsp`` exits).
EXIT_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsmocsp", description="hsmocsp operator commands (the service: twistd hsmocsp)."
    )
    parser.add_argument("--version", action="version", version=f"hsmocsp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="check a configuration as start-up would, not listening")
    check.add_argument("--config", "-c", required=True, help="YAML configuration file")
    check.add_argument(
        "--role",
        choices=("all", "signer", "server"),
        help="check as this role instead of the file's (as twistd hsmocsp --role)",
    )

    csr = sub.add_parser("csr", help="a PKCS#10 request signed inside the HSM (PEM on stdout)")
    csr.add_argument("--config", "-c", required=True, help="YAML configuration file")
    which = csr.add_mutually_exclusive_group(required=True)
    which.add_argument("--handle", help="the handle whose signer key signs the request")
    which.add_argument("--token", help="a token of the configuration (with --key-label/--key-id)")
    csr.add_argument("--key-label", help="CKA_LABEL of the key on --token")
    csr.add_argument("--key-id", help="CKA_ID of the key on --token, in hex")
    csr.add_argument("--subject", required=True, help="OpenSSL-style subject, '/CN=OCSP signer'")
    csr.add_argument(
        "--no-ocsp-extensions",
        action="store_true",
        help="do not request extendedKeyUsage OCSPSigning + keyUsage digitalSignature",
    )
    return parser


def _react(main: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(reactor)`` on a fresh reactor; its int is the exit status."""
    from twisted.internet import defer, task

    outcome: list[int] = []

    def run(reactor: Any) -> defer.Deferred[None]:
        d = defer.Deferred.fromCoroutine(main(reactor))
        return d.addCallback(outcome.append)

    try:
        task.react(run)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return exit_.code if isinstance(exit_.code, int) else EXIT_FAILED
    return outcome[0] if outcome else EXIT_FAILED


def _log_to_stderr() -> None:
    """Warnings and errors from the components, on stderr (stdout is the result)."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hsmocsp.config import load_config
    from hsmocsp.errors import ConfigError

    role = getattr(args, "role", None)
    try:
        cfg = load_config(Path(args.config), role)
    except ConfigError as err:
        print(f"hsmocsp: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG if args.command == "check" else EXIT_FAILED
    if args.command == "check" and cfg.role == "server":
        from hsmocsp.cli.checkserver import redis_connect, run_server_check

        try:  # the store's password and TLS files, read before any reactor runs
            connect_on = redis_connect(cfg)
        except ConfigError as err:
            print(f"hsmocsp: configuration error: {err}", file=sys.stderr)
            return EXIT_CONFIG
        _log_to_stderr()
        return _react(
            lambda reactor: run_server_check(reactor, cfg, sys.stdout, connect_on(reactor))
        )
    _log_to_stderr()
    if args.command == "check":
        from hsmocsp.cli.check import run_check

        return _react(lambda reactor: run_check(reactor, cfg, sys.stdout))
    from hsmocsp.cli.csrcmd import run_csr

    return _react(lambda reactor: run_csr(reactor, cfg, args, sys.stdout))


__all__ = ["main"]
