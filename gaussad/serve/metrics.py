"""Prometheus metrics of one service, in a registry of its own (never the process-wide default one, so
two apps in a process, as in the tests, count apart)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gaussad.serve.drift import DriftMonitor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # normalized: threshold at 0.5
DRIFT_GAUGES = {
    "images": "images in the drift window",
    "flagged_share": "share of the window's images flagged",
    "expected_flagged_share": "share of the held-out normal scores at or above the image threshold",
    "flagged_alert_level": "flagged share above which the line should look",
    "ks_statistic": "Kolmogorov-Smirnov statistic of the window's scores against the held-out normal ones",
    "ks_alert_level": "KS statistic above which the line should look (critical value at 0.1%)",
    "look": "1 when a drift signal is over its level",
}


class ServiceMetrics:
    """The service's instruments and their registry."""

    def __init__(
        self, monitors: Callable[[], Mapping[str, DriftMonitor]], waiting: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "gaussad_requests", "HTTP requests answered", ["route", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            "gaussad_request_seconds", "time to answer", ["route"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.in_service = Gauge(
            "gaussad_images_in_service", "images admitted and not answered", registry=registry
        )
        self.queue_time = Histogram(
            "gaussad_queue_seconds",
            "time from arrival in the batch queue to the forward pass",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "gaussad_batch_size",
            "images per forward pass",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.images = Counter("gaussad_images", "images decided", ["model"], registry=registry)
        self.flagged = Counter(
            "gaussad_images_flagged", "images decided anomalous", ["model"], registry=registry
        )
        self.scores = Histogram(
            "gaussad_normalized_score",
            "normalized scores (typical normal 0, threshold 0.5)",
            ["model"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "gaussad_rejected", "images refused, by reason", ["reason"], registry=registry
        )
        self.model_info = Gauge(
            "gaussad_model", "served model versions (1)", ["model", "sha256"], registry=registry
        )
        registry.register(_ScrapedCollector(monitors, waiting))

    def observe_batch(self, model: str, size: int, waits: list[float]) -> None:
        self.batch_size.labels(model).observe(size)
        for wait in waits:
            self.queue_time.labels(model).observe(wait)

    def observe_decision(self, model: str, normalized_score: float, flagged: bool) -> None:
        self.images.labels(model).inc()
        self.scores.labels(model).observe(normalized_score)
        if flagged:
            self.flagged.labels(model).inc()

    def serve_model(self, model: str, sha256: str, previous: str | None = None) -> None:
        """The gauge naming each served model's version, updated on a reload."""
        if previous is not None:
            self.model_info.remove(model, previous)
        self.model_info.labels(model, sha256).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapedCollector(Collector):
    """Gauges read when scraped, not on every image: the batch queues and drift."""

    def __init__(
        self, monitors: Callable[[], Mapping[str, DriftMonitor]], waiting: Callable[[], Mapping[str, int]]
    ) -> None:
        self._monitors = monitors
        self._waiting = waiting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queues = GaugeMetricFamily(
            "gaussad_batch_queue", "images waiting for a forward pass", labels=["model"]
        )
        for name, count in self._waiting().items():
            queues.add_metric([name], count)
        yield queues
        reports = {name: monitor.report().as_dict() for name, monitor in self._monitors().items()}
        for key, help_text in DRIFT_GAUGES.items():
            family = GaugeMetricFamily(f"gaussad_drift_{key}", help_text, labels=["model"])
            for name, report in reports.items():
                value = report[key]
                family.add_metric([name], float("nan") if value is None else float(value))
            yield family
