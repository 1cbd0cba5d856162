"""The server's Prometheus metrics (``GET /metrics``, the text exposition format).

Each server has its own registry (``prometheus_client.CollectorRegistry``), so several apps in one
process (tests) do not share counters. The engine's load is read when scraped: requests waiting for
a group of slots and groups busy, per beam width (``Engine.occupancy``).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters of one server: HTTP requests by route and status code, decoded requests and
    tokens, latency, time to the first streamed text; the engine's queue and slots when scraped."""

    def __init__(self, engine=None):
        disable_created_metrics()  # no ``_created`` series beside each counter
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter(
            "jaxformer_http_requests", "HTTP requests answered, by route and status code",
            ["route", "code"], registry=r,
        )  # fmt: skip
        self.decoded = Counter(
            "jaxformer_decode_requests", "requests submitted to the engine (one per text, prompt "
            "or choice), by beam width", ["width"], registry=r,
        )  # fmt: skip
        self.input_tokens = Counter(
            "jaxformer_input_tokens", "source and prompt tokens submitted", registry=r
        )
        self.output_tokens = Counter(
            "jaxformer_output_tokens", "tokens generated (every hypothesis returned)", registry=r
        )
        self.latency = Histogram(
            "jaxformer_request_seconds", "time from a request's arrival to its last byte, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "jaxformer_time_to_first_token_seconds", "streams: time to the first text sent",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            "jaxformer_client_disconnects", "requests whose client left before the end (their "
            "engine requests cancelled)", registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "jaxformer_http_requests_in_flight", "HTTP requests being answered", registry=r
        )
        self.ready = Gauge("jaxformer_ready", "1 once compiled and admitting", registry=r)
        if engine is not None:
            r.register(_EngineLoad(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineLoad:
    """The engine's queue and slots, read at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        waiting, busy = self.engine.occupancy()
        queue = GaugeMetricFamily(
            "jaxformer_queue_length", "engine requests waiting for a free group of slots"
        )
        queue.add_metric([], waiting)
        yield queue
        used = GaugeMetricFamily(
            "jaxformer_slots_busy",
            "slots (rows) decoding a request, by beam width",
            labels=["width"],
        )
        total = GaugeMetricFamily(
            "jaxformer_slots", "slots (rows) of the engine, by beam width", labels=["width"]
        )
        layout = self.engine.layout
        for width, groups in zip(layout.widths, layout.groups, strict=True):
            used.add_metric([str(width)], busy[width] * width)
            total.add_metric([str(width)], groups * width)
        yield used
        yield total


__all__ = ["Metrics"]
