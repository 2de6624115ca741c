"""Keeping every handle fit to answer over the years: certificate files and expiry.

Two things change under a running responder without a restart:

* files the operator replaces: a renewed responder certificate (same HSM key), a
  renewed CA certificate (same CA key), a new CRL. SIGHUP (``systemctl reload``)
  reloads the certificates with the same checks as at start-up
  (:func:`reload_certificates`; the sources reload their CRLs themselves); a file
  that fails keeps the one in use, and one log line says why.
* time: a responder certificate nears its notAfter, a CRL passes its nextUpdate.
  :class:`ExpiryWatch` warns at the configured lead times (30, 7 and 1 days by
  default) and once per overdue CRL, and asks each handle for its health every
  few seconds, so that a change of state is logged (once, by
  :meth:`~hsmocsp.handle.Handle.health`) even when no probe asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hsmocsp.config import Config, HandleConfig
from hsmocsp.errors import ConfigError, ResponderCertError, SourceError
from hsmocsp.handle import Handle
from hsmocsp.service.builder import load_cert
from hsmocsp.sources import StatusSource

log = Logger()

DAY = 86400.0


# --- SIGHUP: certificate files ------------------------------------------------------------


def reload_certificates(
    cfg: Config, handles: Sequence[Handle], sources: Mapping[str, StatusSource]
) -> int:
    """Read every handle's issuer and responder certificate files again; apply what
    passes the start-up checks. Returns how many files were refused (each logged)."""
    by_name = {handle.name: handle for handle in handles}
    refused = 0
    for hc in cfg.handles:
        handle = by_name.get(hc.name)
        if handle is not None:
            refused += _reload_handle(cfg, hc, handle, sources.get(hc.name, handle.source))
    return refused


def _refuse(key: str, path: Path, why: str) -> int:
    log.warn(
        "SIGHUP: {key} ({path}) not reloaded, keeping the one in use: {why}",
        key=key,
        path=str(path),
        why=why,
    )
    return 1


def _read(cfg: Config, path: Path, key: str) -> x509.Certificate | None:
    try:
        return load_cert(path, key, cfg)
    except ConfigError as err:
        _refuse(key, path, err.problem)
        return None


def _reload_handle(cfg: Config, hc: HandleConfig, handle: Handle, source: StatusSource) -> int:
    """Issuer first (a renewal of the same CA), then the responder certificate checked
    against the issuer as it is then; an issuer the responder certificate does not fit
    is put back."""
    refused = 0
    if hc.responder_cert is None:
        return refused  # signer: none: pre-signed responses, no certificate of ours
    rkey = f"handles.{hc.name}.responder_cert"
    responder = _read(cfg, hc.responder_cert, rkey)
    refused += responder is None
    previous_issuer: x509.Certificate | None = None
    replace_issuer = getattr(source, "replace_issuer", None)
    ikey = f"handles.{hc.name}.issuer"
    if hc.issuer is not None and replace_issuer is not None:
        issuer = _read(cfg, hc.issuer, ikey)
        refused += issuer is None
        if issuer is not None:
            current = source.issuers()[0]
            try:
                if replace_issuer(issuer):
                    previous_issuer = current
            except SourceError as err:
                refused += _refuse(ikey, hc.issuer, str(err))
    if responder is None and previous_issuer is None:
        return refused
    try:
        handle.replace_responder_cert(
            responder or handle.responder_cert, recheck=previous_issuer is not None
        )
    except ResponderCertError as err:
        if previous_issuer is None:
            return refused + _refuse(rkey, hc.responder_cert, str(err))
        assert hc.issuer is not None and replace_issuer is not None
        replace_issuer(previous_issuer)
        refused += _refuse(ikey, hc.issuer, f"the responder certificate does not fit it: {err}")
        if responder is not None:
            try:
                handle.replace_responder_cert(responder, recheck=True)
            except ResponderCertError as err2:
                refused += _refuse(rkey, hc.responder_cert, str(err2))
        return refused
    if previous_issuer is not None:
        log.info(
            "handle {handle}: CA certificate reloaded ({subject}, notAfter {when:%Y-%m-%d})",
            handle=handle.name,
            subject=source.issuers()[0].subject.rfc4514_string(),
            when=source.issuers()[0].not_valid_after_utc,
        )
    return refused


# --- time: expiry -------------------------------------------------------------------------


class ExpiryWatch:
    """Warns before responder certificates expire and when CRLs are overdue.

    A warning is logged once per lead time crossed (at start, only the nearest
    one already crossed), again for a new certificate; an overdue CRL once per
    CRL (a new CRL that is overdue too is warned about again).
    """

    def __init__(
        self,
        handles: Sequence[Handle],
        clock: Any,
        warn_days: Sequence[float] = (30.0, 7.0, 1.0),
        interval: float = 5.0,
    ) -> None:
        self.handles = list(handles)
        self._clock = clock
        self.warn_days = tuple(sorted(warn_days, reverse=True))
        self.interval = interval
        self._cert_warned: dict[str, tuple[bytes, float]] = {}
        self._crl_warned: dict[str, float] = {}
        self._loop: LoopingCall | None = None
        self.warnings = 0

    def start(self) -> None:
        loop = self._loop = LoopingCall(self.check)
        loop.clock = self._clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("expiry watch stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """One look at every handle (also logs any change of state, via ``health()``)."""
        now = self._clock.seconds()
        for handle in self.handles:
            self._certificate(handle, now)
            self._crl(handle, now)
            handle.health()

    def _certificate(self, handle: Handle, now: float) -> None:
        remaining = handle.cert_not_after - now
        if remaining <= 0:
            return  # the handle is failed: its state change says so
        crossed = [d for d in self.warn_days if remaining <= d * DAY]
        if not crossed:
            return
        lead = min(crossed)
        warned = self._cert_warned.get(handle.name)
        if warned is not None and warned[0] == handle.cert_fp and warned[1] <= lead:
            return
        self._cert_warned[handle.name] = (handle.cert_fp, lead)
        self.warnings += 1
        cert = handle.responder_cert
        log.warn(
            "handle {handle}: responder certificate {subject!r} (serial {serial}) expires in "
            "{left} at {when:%Y-%m-%d %H:%M:%S} UTC: renew it for the same key and send "
            "SIGHUP (warning at {lead:g} days)",
            handle=handle.name,
            subject=cert.subject.rfc4514_string(),
            serial=f"{cert.serial_number:X}",
            left=_duration(remaining),
            when=cert.not_valid_after_utc,
            lead=lead,
        )

    def _crl(self, handle: Handle, now: float) -> None:
        next_update = handle.crl_next_update()
        if next_update is None or now <= next_update:
            return
        if self._crl_warned.get(handle.name) == next_update:
            return
        self._crl_warned[handle.name] = next_update
        self.warnings += 1
        log.warn(
            "handle {handle}: the CRL is past its nextUpdate ({when:%Y-%m-%d %H:%M:%S} UTC): "
            "publish a new one; the handle is degraded until then",
            handle=handle.name,
            when=datetime.fromtimestamp(next_update, UTC),
        )


def _duration(seconds: float) -> str:
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.0f} days"
    if seconds >= 7200:
        return f"{seconds / 3600:.0f} hours"
    return f"{max(1, int(seconds // 60))} minutes"


__all__ = ["ExpiryWatch", "reload_certificates"]
