"""The stages' Prometheus metrics: names, buckets, bounded labels, and what a batch exports.

Triton's own metrics count requests and time each model, but cannot say why a request
was refused, by whom, or how long decryption, decoding and the audit write took. The
stage adapters export that through the Python backend's custom metrics
(``pb_utils.MetricFamily``, served on Triton's metrics port); this module decides what is
measured and keeps every label bounded, and takes the metric factory as an argument so
``rtinfer`` stays importable without Triton.

Labels are bounded: ``reason`` is one of ``REASONS`` (else ``other``), ``client`` one of
the clients listed in the stage parameter ``metrics_clients`` or, up to
``metrics_max_clients``, the first client ids seen on an accepted request whose key binds
them (``rtinfer.keyring``: ``clients``); every other id is ``other`` (and an empty one
``none``). A refused request is counted under the client id it *claims* (unauthenticated),
but only a listed or already-admitted id: forged envelopes with random ids cannot grow the
series, and cannot take a slot; nor can one key holder by claiming many ids its key does
not bind (an unbound key's ids are all ``other``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rtinfer.errors import Refusal
from rtinfer.keyring import Keyring, valid_client_id

PREFIX = "rtinfer_"

# Every refusal reason the stages give (rtinfer.errors.Refusal / Unavailable, guard).
REASONS = frozenset({
    "too_large", "batched_request", "truncated", "bad_format", "not_a_request", "wrong_pipeline",
    "unknown_key", "retired_key", "auth_failed", "client_mismatch", "client_not_allowed", "expired", "from_future",
    "replayed",
    "bad_image", "too_many_pixels", "bad_input", "internal_error", "audit_unavailable",
    "replay_store_unavailable", "bad_context", "context_forged", "context_request_id", "context_expired",
    "context_from_future", "context_replayed", "context_refused", "bad_logits",
})
OTHER, NONE = "other", "none"

# Seconds. Step latencies are sub-millisecond to tens of ms; the request histogram has a
# bucket at each latency SLO threshold (loadtest/slo.toml: p50 150, p95 300, p99 400 ms).
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    help: str
    buckets: tuple = ()


SPECS = {
    "requests_total": Spec("counter", "Requests a stage finished, by client and outcome (accepted, refused)"),
    "refusals_total": Spec("counter", "Refused requests by stage, reason and (claimed) client"),
    "decrypt_seconds": Spec("histogram", "Envelope header parse, key lookup and AES-GCM open", STEP_BUCKETS),
    "decode_seconds": Spec("histogram", "Image decode, EXIF, RGB, resize and crop", STEP_BUCKETS),
    "replay_check_seconds": Spec("histogram", "Freshness + nonce (or context) store transaction per batch",
                                 STEP_BUCKETS),
    "audit_write_seconds": Spec("histogram", "One audit append (group commit of a batch's records)", STEP_BUCKETS),
    "request_duration_seconds": Spec("histogram", "Served requests: preprocess start to the served record "
                                     "written (classifier and queues included)", REQUEST_BUCKETS),
    "batch_requests": Spec("histogram", "Requests per execute() call", BATCH_BUCKETS),
    "audit_records_total": Spec("counter", "Audit records written (checkpoints included)"),
    "audit_write_errors_total": Spec("counter", "Audit writes that failed (nothing answered unaudited)"),
    "audit_checkpoints_total": Spec("counter", "Signed audit checkpoints written"),
    "audit_checkpoint_lag_records": Spec("gauge", "Records after the chain's last signed checkpoint "
                                         "(read at a write, at most once a second)"),
    "audit_checkpoint_age_seconds": Spec("gauge", "Seconds since the last signed checkpoint while records are "
                                         "unsigned, at the last write (0: all signed)"),
    "keyring_reloads_total": Spec("counter", "Keyring file reloads by result (ok, error: previous keys kept)"),
    "keyring_keys": Spec("gauge", "Keys in the keyring by state (active, retired = in grace, expired)"),
    "replay_store_entries": Spec("gauge", "Entries in a replay store (nonces, contexts) within its window"),
    "model_info": Spec("gauge", "The classifier files this replica serves (1), by model, file and the sha256 of "
                       "the file read at load: replicas that differ are mid-rollout or wrong"),
    "cascade_routes_total": Spec("counter", "Cascade answers by route: edge (confident), cloud (escalated and "
                                 "answered by the big model), edge_fallback (escalated, the cloud could not answer)"),
}
ROUTES = ("edge", "cloud", "edge_fallback")  # rtinfer.routing's routes: every series exists from the start


def name(short: str) -> str:
    return PREFIX + short


def reason_label(reason: str) -> str:
    return reason if reason in REASONS else OTHER


class ClientLabels:
    """Client id -> a label from a bounded set (see the module docstring)."""

    def __init__(self, listed=(), max_dynamic: int = 0):
        self.listed = {c for c in listed if c}
        self.max_dynamic = max_dynamic
        self.admitted: set[str] = set()

    @classmethod
    def from_params(cls, listed: str, max_dynamic: str) -> "ClientLabels":
        return cls([c.strip() for c in listed.split(",")], int(max_dynamic or 0))

    def label(self, client_id, *, authenticated: bool) -> str:
        """``authenticated``: the id may take a free slot (an accepted request whose key binds it)."""
        if not client_id:
            return NONE
        client_id = str(client_id)
        if client_id in self.listed or client_id in self.admitted:
            return client_id
        if authenticated and len(self.admitted) < self.max_dynamic and valid_client_id(client_id):
            self.admitted.add(client_id)
            return client_id
        return OTHER


@dataclass
class Outcome:
    client_id: str
    authenticated: bool  # the client id comes from an authenticated envelope (or MAC'd context)
    reason: str | None = None  # None: accepted / served
    bound: bool = False  # the key that sealed it binds the client id: only then may it take a label slot


def bound(ring, key_id, client_id) -> bool:
    """Whether ``ring`` binds ``client_id`` to ``key_id`` (False when the stage has no keyring or could not read it)."""
    return isinstance(ring, Keyring) and isinstance(key_id, str) and ring.binds(key_id, client_id)


@dataclass
class Report:
    """What one ``run()`` of a stage observed, for the adapter to export."""
    outcomes: list[Outcome] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, seconds: float) -> None:
        self.timings.setdefault(step, []).append(seconds)

    @contextmanager
    def timed(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(step, time.perf_counter() - t0)


class Exporter:
    """Creates metric families through ``factory`` (``pb_utils.MetricFamily``) and keeps one metric per
    label set. Counters of components that count for themselves (audit writer, keyring) are exported
    by their increase since the last call. Nothing here may fail a request: callers go through
    ``rtinfer.guard.attempt``."""

    def __init__(self, factory, stage: str, clients: ClientLabels):
        self.factory, self.stage, self.clients = factory, stage, clients
        self.families: dict[str, object] = {}
        self.metrics: dict[tuple, object] = {}
        self.seen: dict[tuple, float] = {}
        self._throttle: dict[str, float] = {}

    def _metric(self, short: str, labels: dict):
        key = (short, tuple(sorted(labels.items())))
        metric = self.metrics.get(key)
        if metric is None:
            spec = SPECS[short]
            family = self.families.get(short)
            if family is None:
                family = self.families[short] = self.factory(
                    name=name(short), description=spec.help, kind=getattr(self.factory, spec.kind.upper()))
            extra = {"buckets": list(spec.buckets)} if spec.kind == "histogram" else {}
            metric = self.metrics[key] = family.Metric(labels=labels, **extra)
        return metric

    def inc(self, short: str, value: float = 1.0, **labels) -> None:
        metric = self._metric(short, {"stage": self.stage, **labels})  # 0 creates the series
        if value > 0:
            metric.increment(value)

    def set(self, short: str, value: float, **labels) -> None:
        key = ("set", short, tuple(sorted(labels.items())))
        if self.seen.get(key) != float(value):  # each update is a message to the server: skip unchanged ones
            self._metric(short, {"stage": self.stage, **labels}).set(float(value))
            self.seen[key] = float(value)

    def observe(self, short: str, value: float, **labels) -> None:
        self._metric(short, {"stage": self.stage, **labels}).observe(float(value))

    def total(self, short: str, total: float, **labels) -> None:
        """Export a component's running total as a counter (by its increase)."""
        key = (short, tuple(sorted(labels.items())))
        last = self.seen.get(key, 0.0)
        self.seen[key] = total
        self.inc(short, total - last if total >= last else total, **labels)

    def due(self, what: str, every_s: float) -> bool:
        """True at most once per ``every_s`` for ``what`` (for gauges that cost a query)."""
        now = time.monotonic()
        if now - self._throttle.get(what, -1e9) < every_s:
            return False
        self._throttle[what] = now
        return True

    def report(self, report: Report, batch: int) -> None:
        self.observe("batch_requests", batch)
        for o in report.outcomes:
            client = self.clients.label(o.client_id, authenticated=o.authenticated and o.bound and o.reason is None)
            self.inc("requests_total", client=client, outcome="accepted" if o.reason is None else "refused")
            if o.reason is not None:
                self.inc("refusals_total", client=client, reason=reason_label(o.reason))
        for step, values in report.timings.items():
            for v in values:
                self.observe(step, v)

    def audit(self, writer) -> None:
        """The writer's counters; its checkpoint lag at most once a second (a gauge, read when it is scraped)."""
        chain = writer.chain
        self.total("audit_records_total", writer.records_written, chain=chain)
        self.total("audit_write_errors_total", writer.write_errors, chain=chain)
        if writer.signer is not None and self.due(f"audit-{chain}", 1.0):
            self.total("audit_checkpoints_total", writer.checkpoints, chain=chain)
            records, age = writer.checkpoint_lag()
            self.set("audit_checkpoint_lag_records", records, chain=chain)
            self.set("audit_checkpoint_age_seconds", age, chain=chain)

    def keyring(self, source, every_s: float = 5.0) -> None:
        self.total("keyring_reloads_total", source.reloads, result="ok")
        self.total("keyring_reloads_total", source.reload_errors, result="error")
        if self.due("keyring", every_s):
            for state, n in source.current().state_counts().items():
                self.set("keyring_keys", n, state=state)

    def routes(self, routes: list[str]) -> None:
        """The cascade's answers of one batch, by route (series created at zero: rate() sees the first fallback)."""
        for route in ROUTES:
            self.inc("cascade_routes_total", routes.count(route), route=route)

    def store(self, store, which: str, every_s: float = 5.0) -> None:
        """Entries of a store that counts them (SQLite; the Redis store does not: rtinfer.replay_redis)."""
        if store is not None and self.due(which, every_s):
            size = store.size()
            if size is not None:
                self.set("replay_store_entries", size, store=which)

    def models(self, installed: list[tuple[str, str, str]]) -> None:
        """``rtinfer_model_info{model, file, sha256} 1`` per classifier file (stage_config.installed_classifiers)."""
        for model, file, sha256 in installed:
            self.set("model_info", 1, model=model, file=file, sha256=sha256)


# Reasons whose series exist from the start (at zero), so rate() sees the first attack.
WATCHED = ("auth_failed", "unknown_key", "retired_key", "replayed", "expired", "client_mismatch", "client_not_allowed",
           "context_forged")


def for_stage_or_none(pb_utils, stage: str, cfg) -> Exporter | None:
    """``for_stage`` for the adapters: a server that cannot give custom metrics logs a warning and the
    stage serves without them (metrics never fail a model's load)."""
    from rtinfer import guard
    exporter = guard.attempt(for_stage, pb_utils, stage, cfg)
    if isinstance(exporter, Refusal):
        pb_utils.Logger.log_warn(f"{stage}: no stage metrics: {exporter.detail}")
        return None
    return exporter


def for_stage(pb_utils, stage: str, cfg) -> Exporter | None:
    """The stage's exporter (None when this Triton's Python backend has no custom metrics), with the
    series of the listed clients and ``other`` created at zero."""
    factory = getattr(pb_utils, "MetricFamily", None)
    if factory is None:
        return None
    clients = ClientLabels.from_params(cfg.param("metrics_clients"), cfg.param("metrics_max_clients", "20"))
    exporter = Exporter(factory, stage, clients)
    for client in sorted(clients.listed) + [OTHER]:
        for outcome in ("accepted", "refused"):
            exporter.inc("requests_total", 0, client=client, outcome=outcome)
        for reason in WATCHED:
            exporter.inc("refusals_total", 0, client=client, reason=reason)
    return exporter
