"""``twistd hsmocsp`` command-line options; the configuration is loaded and checked here."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage

from hsmocsp.config import MAX_HTTP_WORKERS, load_config
from hsmocsp.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE [--listen STRPORT]"
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
    ]

    def postOptions(self) -> None:
        path = Path(self["config"])
        try:
            self["parsed"] = load_config(path)
        except ConfigError as err:
            raise usage.UsageError(f"configuration error: {err}") from err
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


__all__ = ["Options"]
