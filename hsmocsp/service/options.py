"""``twistd hsmocsp`` command-line options; the configuration is loaded and checked here.

A configuration error prints one line (file, key, problem) and exits 78
(``EX_CONFIG``), not twistd's usage text followed by the error: the operator
needs the message, and systemd's ``RestartPreventExitStatus=78`` must see it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from twisted.python import usage

from hsmocsp import __version__
from hsmocsp.config import MAX_HTTP_WORKERS, ROLES, load_config
from hsmocsp.errors import ConfigError

#: Exit status for a configuration error (sysexits' EX_CONFIG); shared contract.
EXIT_CONFIG = 78


def config_error_exit(err: ConfigError) -> NoReturn:
    """One line on stderr, exit 78."""
    print(f"hsmocsp: configuration error: {err}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


class Options(usage.Options):
    synopsis = "--config FILE [--listen STRPORT] [--role all|signer|server]"
    longdesc = "Serve OCSP (RFC 6960/5019) for several CAs, signing with a PKCS#11 HSM."
    optParameters = [
        ["config", "c", "etc/hsmocsp.yaml", "YAML configuration file."],
        ["listen", "l", None, "Listen endpoint (strports), overrides the config's listen."],
        [
            "workers",
            "w",
            None,
            "HTTP processes sharing the listening port (SO_REUSEPORT; tcp only); "
            "overrides the config's http_workers.",
        ],
        [
            "role",
            None,
            None,
            "all (one process does everything), signer (holds the tokens, writes the shared "
            "store) or server (answers from the store, forwards misses to signer_url); "
            "overrides the config's role.",
        ],
    ]

    def opt_version(self) -> NoReturn:
        """Display hsmocsp's version and exit."""
        import twisted

        python = sys.version.split()[0]
        print(f"hsmocsp {__version__} (Twisted {twisted.__version__}, Python {python})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        path = Path(self["config"])
        if self["role"] is not None and self["role"] not in ROLES:
            raise usage.UsageError(f"--role must be one of {', '.join(ROLES)}")
        try:
            self["parsed"] = load_config(path, role=self["role"])
        except ConfigError as err:
            config_error_exit(err)
        if self["workers"] is not None:
            try:
                workers = int(self["workers"])
            except ValueError:
                workers = 0
            if not 1 <= workers <= MAX_HTTP_WORKERS:
                raise usage.UsageError(
                    f"--workers must be a whole number from 1 to {MAX_HTTP_WORKERS}"
                )
            self["workers"] = workers


__all__ = ["EXIT_CONFIG", "Options", "config_error_exit"]
