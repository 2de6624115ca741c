"""Prometheus metrics, one registry per app.

Conventions (https://prometheus.io/docs/practices/naming/), checked by
``promtool check metrics`` on a live ``/metrics`` in the tests: counters are
counters and end in ``_total``; no ``_created`` series; ``hsmocsp_build_info``;
process metrics (``process_*``, ``python_*``) of the main process.

Values the components already count (cache hits, signatures, source errors)
are read at scrape time, as counters through :class:`_HandleCounters`, and
gauges through ``set_function`` (cache size, signer queue depth, source age),
so the request path only bumps one counter and observes one latency.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from hsmocsp.health import Health, State
from hsmocsp.sources.state import SourceState

if TYPE_CHECKING:
    from hsmocsp.handle import Handle
    from hsmocsp.presign import Presigner


class StoreView(Protocol):
    """What the metrics read from the response store."""

    @property
    def write_errors(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    def health(self) -> Health: ...


class ServerView(Protocol):
    """What the metrics read from a ``role: server`` handle (hsmocsp.server.handle)."""

    @property
    def name(self) -> str: ...

    @property
    def hot(self) -> Any: ...

    @property
    def stats(self) -> Any: ...

    def health(self) -> Health: ...


#: Request latency buckets (seconds): a cached answer takes well under a millisecond,
#: a token-class HSM signature up to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, handles: Sequence[Handle]) -> None:
        # The library's one switch for it is process-wide: counters' ``_created``
        # series only double the output and promtool-style checks dislike them.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # Stateless readers of /proc and the interpreter: shared with the default
            # registry, registered in ours too.
            self.registry.register(collector)
        Info(
            "hsmocsp_build", "Versions of hsmocsp and what it runs on", registry=self.registry
        ).info(_build_info())
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
        self._latency = Histogram(
            "hsmocsp_request_duration_seconds",
            "Time from an OCSP request's arrival to its answer being ready, by handle and"
            " result: cached, signed (a signature was made or awaited), or the OCSP error status",
            ["handle", "result"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, str], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._presign_gauges: list[Gauge] | None = None
        self._stores: dict[str, StoreView] | None = None
        self._store_gauges: list[Gauge] = []
        self._evicted = Counter(
            "hsmocsp_http_connections_evicted",
            "Idlest client connections closed to stay under max_connections",
            registry=self.registry,
        )
        self._connections = Gauge(
            "hsmocsp_http_connections",
            "Client connections open in the main process",
            registry=self.registry,
        )
        self._bad_requests = Counter(
            "hsmocsp_bad_requests",
            "Requests refused for what the client sent (HTTP code or OCSP status), "
            "logged only once a minute per kind",
            ["kind"],
            registry=self.registry,
        )
        self._front_answers = Counter(
            "hsmocsp_front_answers",
            "Cached OCSP answers sent by each extra HTTP process (--workers)",
            ["front"],
            registry=self.registry,
        )
        self._front_held = Gauge(
            "hsmocsp_front_hot_cache_entries",
            "Signed responses each extra HTTP process holds (bounded by hot_cache_entries)",
            ["front"],
            registry=self.registry,
        )
        self.registry.register(_HandleCounters(handles))
        cache_size = Gauge(
            "hsmocsp_cache_entries", "Signed responses held", ["handle"], registry=self.registry
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
        for h in handles:
            for gauge, read in (
                (cache_size, _cache_size),
                (in_flight, _in_flight),
                (queue, _queue_depth),
                (generation, _generation),
                (age, _source_age),
                (ready, _ready),
            ):
                gauge.labels(h.name).set_function(partial(read, h))
        self._handle_state = _lifecycle_gauges(self.registry, handles)

    def watch_token(
        self,
        name: str,
        health: Callable[[], Health],
        restart_pending: Callable[[], bool] | None = None,
    ) -> None:
        """``hsmocsp_token_up{token}`` (1 while the token can sign: ready or degraded)
        and ``hsmocsp_token_state{token,state}`` (1 for its current state), read from
        the token pool's ``health()`` at scrape time; ``hsmocsp_token_restart_pending``
        (1 while a worker is starting or a restart is scheduled, 0 when the pool has
        given up until SIGHUP) from ``restart_pending()``."""
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
            self._token_restart_pending = Gauge(
                "hsmocsp_token_restart_pending",
                "1 while a signing worker is starting or a restart is scheduled",
                ["token"],
                registry=self.registry,
            )
        self._token_up.labels(name).set_function(lambda: float(health().state is not State.FAILED))
        if restart_pending is not None:
            self._token_restart_pending.labels(name).set_function(
                lambda: float(restart_pending())
            )
        for state in State:
            self._token_state.labels(name, state.label).set_function(
                partial(_is_state, health, state)
            )

    def watch_store(self, store: StoreView, kind: str = "sqlite") -> None:
        """A response store's write health, read at scrape time, labelled ``store``
        (``sqlite``: the local file; ``redis``: the store shared with replicas): failed
        write attempts and rows dropped from a full queue (counters), rows waiting, 1/0
        for writing works, and for a shared store 1/0 for connected and the failed reads."""
        if self._stores is None:
            self._stores = {}
            self.registry.register(_StoreCounters(self._stores))
            self._store_gauges = [
                Gauge(name, doc, ["store"], registry=self.registry)
                for name, doc in (
                    ("hsmocsp_store_pending_rows",
                     "Signed responses waiting to be written to the store"),
                    ("hsmocsp_store_ready",
                     "1 while the store works (writes, reads, subscription), 0 while it fails"),
                    ("hsmocsp_store_connected",
                     "1 while a connection to the shared store is up (sqlite: always 1)"),
                )
            ]  # fmt: skip
        self._stores[kind] = store
        pending, ready, connected = self._store_gauges
        pending.labels(kind).set_function(lambda: float(store.pending))
        ready.labels(kind).set_function(lambda: float(store.health().state is State.READY))
        connected.labels(kind).set_function(
            lambda: float(getattr(store, "connected", True))
        )

    def watch_servers(
        self, handles: Sequence[ServerView], subscribed: Callable[[], bool],
        messages: Callable[[], int], signer_up: Callable[[], bool],
    ) -> None:  # fmt: skip
        """A server replica's counters (hot cache, store fetches, forwards to the signer),
        its handles' states, and whether invalidations arrive, read at scrape time."""
        self.registry.register(_ServerCounters(handles, messages))
        entries = Gauge("hsmocsp_hotcache_entries", "Responses held in the hot cache",
                        ["handle"], registry=self.registry)  # fmt: skip
        state = self._handle_state
        for h in handles:
            entries.labels(h.name).set_function(partial(_hot_entries, h))
            for s in State:
                state.labels(h.name, s.label).set_function(partial(_in_state, h, s))  # type: ignore[arg-type]
        Gauge("hsmocsp_invalidations_subscribed", "1 while the store's invalidation"
              " subscription is live (the hot caches are trusted)",
              registry=self.registry).set_function(lambda: float(subscribed()))  # fmt: skip
        Gauge("hsmocsp_signer_up", "1 while the signer this server forwards to answers",
              registry=self.registry).set_function(lambda: float(signer_up()))  # fmt: skip

    def response(self, handle: str, status: str, method: str, n: int = 1) -> None:
        key = (handle, status, method)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._responses.labels(handle, status, method)
        child.inc(n)

    def latency(self, handle: str, result: str, seconds: float) -> None:
        """One OCSP request answered after ``seconds``; ``result``: ``cached``,
        ``signed`` or an OCSP error status name."""
        key = (handle, result)
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self._latency.labels(handle, result)
        child.observe(seconds)

    def connection_evicted(self) -> None:
        self._evicted.inc()

    def watch_connections(self, count: Callable[[], int]) -> None:
        """The open client connections of this process, read at scrape time."""
        self._connections.set_function(lambda: float(count()))

    def bad_request(self, kind: str, n: int = 1) -> None:
        self._bad_requests.labels(kind).inc(n)

    def front_answered(self, front: int, n: int) -> None:
        self._front_answers.labels(str(front)).inc(n)

    def front_held(self, front: int, n: int) -> None:
        self._front_held.labels(str(front)).set(n)

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


class _HandleCounters(Collector):
    """Counters the handles keep themselves, read at scrape time."""

    def __init__(self, handles: Sequence[Handle]) -> None:
        self._handles = list(handles)

    def collect(self) -> Iterator[Metric]:
        families = (
            ("hsmocsp_cache_hits", "Answers from the signed-response cache", _cache_hits),
            ("hsmocsp_cache_misses", "Requests the cache could not answer", _cache_misses),
            ("hsmocsp_signatures", "Signatures made", _signatures),
            (
                "hsmocsp_source_errors",
                "Problems the source met (failed Vault requests, probes and CRL refreshes,"
                " unreadable files)",
                _source_errors,
            ),
        )
        for name, text, read in families:
            family = CounterMetricFamily(name, text, labels=["handle"])
            for h in self._handles:
                family.add_metric([h.name], read(h))
            yield family


class _ServerCounters(Collector):
    """Counters of a server replica's handles (hsmocsp.server.handle), read at scrape time."""

    def __init__(self, handles: Sequence[ServerView], messages: Callable[[], int]) -> None:
        self._handles = list(handles)
        self._messages = messages

    def collect(self) -> Iterator[Metric]:
        families = (
            ("hsmocsp_hotcache_hits", "Answers from the hot cache", "hot", "hits"),
            ("hsmocsp_hotcache_misses", "Hot-cache lookups that found no servable answer",
             "hot", "misses"),
            ("hsmocsp_hotcache_evicted", "Hot-cache entries evicted to stay under"
             " hot_cache_entries", "hot", "evicted"),
            ("hsmocsp_hotcache_invalidated", "Hot-cache entries dropped by an invalidation",
             "hot", "invalidated"),
            ("hsmocsp_store_fetch_hits", "Responses found in the shared store", "stats",
             "store_hits"),
            ("hsmocsp_store_fetch_misses", "Lookups the shared store had no response for",
             "stats", "store_misses"),
            ("hsmocsp_store_fetch_errors", "Lookups the shared store could not answer (down,"
             " slow, unreadable value): forwarded to the signer instead", "stats",
             "store_errors"),
            ("hsmocsp_forwarded", "Requests forwarded to the signer", "stats", "forwarded"),
            ("hsmocsp_forward_errors", "Forwarded requests that got no usable answer (signer"
             " out of reach: tryLater; garbage: internalError)", "stats", "forward_errors"),
        )  # fmt: skip
        for name, text, part, field in families:
            family = CounterMetricFamily(name, text, labels=["handle"])
            for h in self._handles:
                counts = h.hot.stats if part == "hot" else h.stats
                family.add_metric([h.name], float(getattr(counts, field)))
            yield family
        family = CounterMetricFamily(
            "hsmocsp_invalidation_messages", "Invalidation messages received from the signer"
        )
        family.add_metric([], float(self._messages()))
        yield family


def _hot_entries(h: ServerView) -> float:
    return float(len(h.hot))


class _ReadCounters(Collector):
    """Unlabelled counters whose values a component keeps, read at scrape time."""

    def __init__(self, counters: Sequence[tuple[str, str, Callable[[], float]]]) -> None:
        self._counters = list(counters)

    def collect(self) -> Iterator[Metric]:
        for name, text, read in self._counters:
            family = CounterMetricFamily(name, text)
            family.add_metric([], float(read()))
            yield family


class _StoreCounters(Collector):
    """The stores' own counters, by ``store`` label, read at scrape time."""

    def __init__(self, stores: dict[str, StoreView]) -> None:
        self._stores = stores

    def collect(self) -> Iterator[Metric]:
        for name, text, read in (
            ("hsmocsp_store_write_errors", "Failed attempts to write signed responses to the"
             " store (disk full, read-only, locked; Redis down or refusing)",
             lambda s: s.write_errors),
            ("hsmocsp_store_dropped_rows", "Signed responses dropped from a full write queue"
             " while the store could not write", lambda s: s.dropped),
            ("hsmocsp_store_read_errors", "Reads from the shared store that failed (down,"
             " too slow), answered without it", lambda s: getattr(s, "fetch_errors", 0)),
        ):  # fmt: skip
            family = CounterMetricFamily(name, text, labels=["store"])
            for kind, store in self._stores.items():
                family.add_metric([kind], float(read(store)))
            yield family


def _build_info() -> dict[str, str]:
    import twisted
    from hsmocsp import __version__

    return {
        "version": __version__,
        "twisted": twisted.__version__,
        "python": platform.python_version(),
    }


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


def _lifecycle_gauges(registry: CollectorRegistry, handles: Sequence[Handle]) -> Gauge:
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
    return state


def _cert_expiry(h: Handle) -> float:
    return h.cert_not_after


def _crl_next_update(h: Handle) -> float:
    value = h.crl_next_update()
    return float("nan") if value is None else value


def _in_state(h: Handle, state: object) -> float:
    return 1.0 if h.health().state is state else 0.0
