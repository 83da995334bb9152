"""The server's Prometheus metrics (prometheus_client), in a registry of their own so each app counts only itself."""

from __future__ import annotations

import prometheus_client as prom

# Seconds: from a fraction of a millisecond (a tiny model's call) to seconds (a large model on a CPU).
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Requests, errors by kind, images, batch sizes, and the time spent decoding, queueing and in the model."""

    def __init__(self, batch_sizes: tuple[int, ...]):
        self.registry = prom.CollectorRegistry()
        kw = {"registry": self.registry, "namespace": "jaxclf"}
        self.requests = prom.Counter("requests", "HTTP requests answered, by route and status", ["route", "status"], **kw)
        self.errors = prom.Counter("errors", "requests answered with an error, by kind", ["kind"], **kw)
        self.images = prom.Counter("images", "images classified", **kw)
        self.request_seconds = prom.Histogram("request_seconds", "time to answer a request, by route", ["route"],
                                              buckets=_TIME_BUCKETS, **kw)
        self.decode_seconds = prom.Histogram("decode_seconds", "decoding and preprocessing one image",
                                             buckets=_TIME_BUCKETS, **kw)
        self.queue_seconds = prom.Histogram("queue_seconds", "an image's wait from its arrival in the queue to its model call",
                                            buckets=_TIME_BUCKETS, **kw)
        self.model_seconds = prom.Histogram("model_seconds", "one model call on a padded batch",
                                            buckets=_TIME_BUCKETS, **kw)
        self.batch_images = prom.Histogram("batch_images", "images in one model call (before padding)",
                                           buckets=batch_sizes, **kw)
        self.padded_rows = prom.Counter("padded_rows", "rows of padding added to fill the compiled batch shapes", **kw)
        self.queue_depth = prom.Gauge("queue_depth", "images waiting for a model call", **kw)
        self.ready = prom.Gauge("ready", "1 once every batch shape is compiled", **kw)

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition, its content type)."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
