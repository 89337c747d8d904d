"""``GET /metrics``: the server's Prometheus metrics, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Queue depth, running jobs, images, request latency, batch sizes, rejections -- fed by the job queue's
    events (``on_event``) and by the routes."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("diffspeed_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running = Gauge("diffspeed_running_jobs", "Jobs in the running batch", registry=r)
        self.images = Counter("diffspeed_images", "Images returned", registry=r)
        self.jobs = Counter("diffspeed_jobs", "Finished jobs by outcome", ["outcome"], registry=r)
        self.latency = Histogram("diffspeed_request_latency_seconds", "Time from arrival to response of a "
                                 "generation request", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("diffspeed_batch_size", "Requests per pipeline call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("diffspeed_batch_seconds", "Seconds per pipeline call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("diffspeed_rejected", "Requests refused with 429 (queue full)", registry=r)

    def on_event(self, name: str, data: dict) -> None:
        """The job queue's event callback (called from its threads; prometheus_client is thread-safe)."""
        if name == "batch":
            self.batch_size.observe(data.get("size", 0))
            self.batch_seconds.observe(data.get("seconds", 0.0))
        elif name == "done":
            self.jobs.labels("done").inc()
        elif name == "failed":
            self.jobs.labels(str(data.get("error", "error"))).inc()
        elif name == "rejected":
            self.rejected.inc()

    def update(self, stats: dict) -> None:
        self.queue_depth.set(stats.get("depth", 0))
        self.running.set(stats.get("running", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
