"""Prometheus metrics of one service (all the adapters it serves). Each service gets its own registry, so two services in one
process (tests, the benchmark) never clash on metric names."""

from __future__ import annotations

# Generation on a CPU takes tenths of seconds to tens of seconds; on a GPU, milliseconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("loraflow_serve_requests", "Completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.errors = Counter("loraflow_serve_request_errors", "Completion requests answered with 4xx/5xx, "
                              "by class", ["kind"], registry=self.registry)
        self.latency = Histogram("loraflow_serve_request_latency_seconds", "Completion latency (answered 2xx)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("loraflow_serve_generated_tokens", "Tokens generated", registry=self.registry)
        self.version = Gauge("loraflow_serve_adapter_info", "1 for the adapter version new requests go to, per "
                             "served ref (alias, or 'pinned')", ["name", "alias", "version"], registry=self.registry)
        self.queue = Gauge("loraflow_serve_queue_depth", "Sequences waiting to join the generation batch",
                           registry=self.registry)
        self.batch = Gauge("loraflow_serve_batch_size", "Sequences in the generation batch now", registry=self.registry)
        self.swaps = Counter("loraflow_serve_swaps", "Alias moves handled, by result (ok, canary_failed, "
                             "load_failed)", ["result"], registry=self.registry)
        self._served: set[tuple[str, str, str]] = set()

    def observe(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        if status >= 500:
            self.errors.labels(kind="5xx").inc()
        elif status >= 400:
            self.errors.labels(kind="4xx").inc()
        else:
            self.latency.observe(seconds)

    def serving(self, name: str, alias: str, version: str) -> None:
        # Only this ref's previous version leaves the gauge: the other served refs stay.
        for labels in list(self._served):
            if labels[:2] == (name, alias):
                self.version.remove(*labels)
                self._served.discard(labels)
        self._served.add((name, alias, version))
        self.version.labels(name=name, alias=alias, version=version).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
