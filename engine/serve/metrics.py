"""The server's Prometheus metrics (prometheus-client), in a registry of its own so that two apps
in one process (the tests) never share counters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("cvr_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("cvr_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("cvr_stage_seconds", "per-query time of each search stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("cvr_batch_queries", "queries per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue_depth = Gauge("cvr_queue_depth", "requests waiting for the model", registry=self.registry)
        self.rejected = Counter("cvr_rejected", "requests refused with 503 (queue full)", registry=self.registry)
        self.gallery_videos = Gauge("cvr_gallery_videos", "videos in the served gallery", registry=self.registry)

    def asgi_app(self):
        return make_asgi_app(registry=self.registry)
