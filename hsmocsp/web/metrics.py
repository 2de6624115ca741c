"""Prometheus metrics, one registry per app (no process-global state).

Gauges are fed by functions at scrape time (cache size, signer queue depth,
source age), so the request path only bumps one counter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hsmocsp.health import Health, State
from hsmocsp.sources.state import SourceState

if TYPE_CHECKING:
    from hsmocsp.presign import Presigner
    from hsmocsp.responder import Handle


class StoreView(Protocol):
    """What the metrics read from the response store."""

    @property
    def write_errors(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    def health(self) -> Health: ...


class Metrics:
    def __init__(self, handles: Sequence[Handle]) -> None:
        self.registry = CollectorRegistry()
        self._responses = Counter(
            "hsmocsp_responses",
            "OCSP responses sent, by handle, OCSP response status and HTTP method",
            ["handle", "status", "method"],
            registry=self.registry,
        )
        self._sign_latency = Histogram(
            "hsmocsp_sign_seconds",
            "Time from handing tbsResponseData to the signer to getting the signature",
            ["handle"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str], Any] = {}
        self._presign_gauges: list[Gauge] | None = None
        self._front_answers = Counter(
            "hsmocsp_front_answers",
            "Cached OCSP answers sent by each extra HTTP process (--workers)",
            ["front"],
            registry=self.registry,
        )
        cache_hits = Gauge(
            "hsmocsp_cache_hits", "Signed-response cache hits", ["handle"], registry=self.registry
        )
        cache_misses = Gauge(
            "hsmocsp_cache_misses",
            "Signed-response cache misses",
            ["handle"],
            registry=self.registry,
        )
        cache_size = Gauge(
            "hsmocsp_cache_entries", "Signed responses held", ["handle"], registry=self.registry
        )
        signatures = Gauge(
            "hsmocsp_signatures", "Signatures made", ["handle"], registry=self.registry
        )
        in_flight = Gauge(
            "hsmocsp_sign_in_flight",
            "Distinct signatures being produced",
            ["handle"],
            registry=self.registry,
        )
        queue = Gauge(
            "hsmocsp_signer_queue_depth",
            "Requests waiting for a signing worker",
            ["handle"],
            registry=self.registry,
        )
        generation = Gauge(
            "hsmocsp_source_generation",
            "Times the source data changed",
            ["handle"],
            registry=self.registry,
        )
        age = Gauge(
            "hsmocsp_source_age_seconds",
            "Seconds since the source last confirmed its data current (NaN before the first load)",
            ["handle"],
            registry=self.registry,
        )
        ready = Gauge(
            "hsmocsp_source_ready",
            "1 when the source is loaded and reachable",
            ["handle"],
            registry=self.registry,
        )
        source_errors = Gauge(
            "hsmocsp_source_errors",
            "Problems the source met (failed Vault requests, probes and CRL refreshes,"
            " unreadable files), counted since start",
            ["handle"],
            registry=self.registry,
        )
        for h in handles:
            for gauge, read in (
                (cache_hits, _cache_hits),
                (cache_misses, _cache_misses),
                (cache_size, _cache_size),
                (signatures, _signatures),
                (in_flight, _in_flight),
                (queue, _queue_depth),
                (generation, _generation),
                (age, _source_age),
                (ready, _ready),
                (source_errors, _source_errors),
            ):
                gauge.labels(h.name).set_function(partial(read, h))
        _lifecycle_gauges(self.registry, handles)

    def watch_token(self, name: str, health: Callable[[], Health]) -> None:
        """``hsmocsp_token_up{token}`` (1 while the token can sign: ready or degraded)
        and ``hsmocsp_token_state{token,state}`` (1 for its current state), read from
        the token pool's ``health()`` at scrape time."""
        if not hasattr(self, "_token_up"):
            self._token_up = Gauge(
                "hsmocsp_token_up",
                "1 while a signing worker is logged in to the token",
                ["token"],
                registry=self.registry,
            )
            self._token_state = Gauge(
                "hsmocsp_token_state",
                "1 for the token's current state (ready, degraded, failed)",
                ["token", "state"],
                registry=self.registry,
            )
        self._token_up.labels(name).set_function(
            lambda: float(health().state is not State.FAILED)
        )
        for state in State:
            self._token_state.labels(name, state.label).set_function(
                partial(_is_state, health, state)
            )

    def watch_store(self, store: StoreView) -> None:
        """The response store's write health, read at scrape time: failed write attempts,
        rows waiting, rows dropped from a full queue, and 1/0 for writing works."""
        for name, doc, read in (
            ("hsmocsp_store_write_errors", "Failed attempts to write signed responses to"
             " the store (disk full, read-only, locked)", lambda: float(store.write_errors)),
            ("hsmocsp_store_pending_rows", "Signed responses waiting to be written to the"
             " store", lambda: float(store.pending)),
            ("hsmocsp_store_dropped_rows", "Signed responses dropped from a full write queue"
             " while the store could not write", lambda: float(store.dropped)),
            ("hsmocsp_store_ready", "1 while the store writes, 0 while writes fail",
             lambda: float(store.health().state is State.READY)),
        ):  # fmt: skip
            Gauge(name, doc, registry=self.registry).set_function(read)

    def response(self, handle: str, status: str, method: str, n: int = 1) -> None:
        key = (handle, status, method)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._responses.labels(handle, status, method)
        child.inc(n)

    def front_answered(self, front: int, n: int) -> None:
        self._front_answers.labels(str(front)).inc(n)

    def signed(self, handle: str, seconds: float) -> None:
        self._sign_latency.labels(handle).observe(seconds)

    def watch_presigner(self, handle: str, presigner: Presigner) -> None:
        """Token-capacity gauges of one handle's pre-signer (hsmocsp.presign)."""
        if self._presign_gauges is None:
            self._presign_gauges = [
                Gauge(name, text, ["handle"], registry=self.registry)
                for name, text in (
                    ("hsmocsp_token_signatures_per_second",
                     "Signatures/s the token delivered to pre-signing, measured (NaN: not yet)"),
                    ("hsmocsp_presign_needed_signatures_per_second",
                     "Signatures/s needed to re-sign every known response at its refresh point"),
                    ("hsmocsp_freshness_margin_seconds",
                     "Seconds until the first stored response of a known serial expires"),
                    ("hsmocsp_presign_due",
                     "Responses past their refresh point waiting for the token"),
                    ("hsmocsp_presign_expired",
                     "Responses of known serials that expired before being re-signed"),
                )
            ]  # fmt: skip
        reads = (
            presigner.measured_rate,
            presigner.needed_rate,
            presigner.min_margin,
            presigner.due,
            presigner.expired_now,
        )
        for gauge, read in zip(self._presign_gauges, reads, strict=True):
            gauge.labels(handle).set_function(partial(_or_nan, read))

    def render(self) -> tuple[str, bytes]:
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)


def _is_state(health: Callable[[], Health], state: State) -> float:
    return float(health().state is state)


def _cache_hits(h: Handle) -> float:
    return float(h.cache.stats.hits)


def _cache_misses(h: Handle) -> float:
    return float(h.cache.stats.misses)


def _cache_size(h: Handle) -> float:
    return float(len(h.cache))


def _signatures(h: Handle) -> float:
    return float(h.signatures)


def _in_flight(h: Handle) -> float:
    return float(h.cache.in_flight())


def _queue_depth(h: Handle) -> float:
    return float(h.queue_depth())


def _generation(h: Handle) -> float:
    return float(h.source.generation)


def _source_age(h: Handle) -> float:
    checked = h.source.checked_at
    return float("nan") if checked is None else max(0.0, h.now() - checked)


def _ready(h: Handle) -> float:
    return 1.0 if h.source.ready() else 0.0


def _source_errors(h: Handle) -> float:
    state = getattr(h.source, "state", None)
    return float(state.errors) if isinstance(state, SourceState) else 0.0


def _or_nan(read: Any) -> float:
    value = read()
    return float("nan") if value is None else float(value)


def _lifecycle_gauges(registry: CollectorRegistry, handles: Sequence[Handle]) -> None:
    """Certificate and CRL expiry, and each handle's state (see :meth:`Handle.health`)."""
    from hsmocsp.health import State

    expiry = Gauge(
        "hsmocsp_responder_cert_expiry_timestamp_seconds",
        "notAfter of the handle's responder certificate (Unix time)",
        ["handle"],
        registry=registry,
    )
    crl = Gauge(
        "hsmocsp_crl_next_update_timestamp_seconds",
        "Earliest nextUpdate of the CRLs the handle's source publishes (Unix time; NaN: none)",
        ["handle"],
        registry=registry,
    )
    state = Gauge(
        "hsmocsp_handle_state",
        "1 for the handle's current state (ready, degraded, failed), 0 for the others",
        ["handle", "state"],
        registry=registry,
    )
    for h in handles:
        expiry.labels(h.name).set_function(partial(_cert_expiry, h))
        crl.labels(h.name).set_function(partial(_crl_next_update, h))
        for s in State:
            state.labels(h.name, s.label).set_function(partial(_in_state, h, s))


def _cert_expiry(h: Handle) -> float:
    return h.cert_not_after


def _crl_next_update(h: Handle) -> float:
    value = h.crl_next_update()
    return float("nan") if value is None else value


def _in_state(h: Handle, state: object) -> float:
    return 1.0 if h.health().state is state else 0.0
