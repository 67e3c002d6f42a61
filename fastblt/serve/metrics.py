"""The server's Prometheus metrics, in a registry of its own (one per app, so several apps in one
process, as in tests, never share counters).

Per request (recorded when it ends): requests by status and mode, bytes generated, time to first
byte, inter-byte latency (every gap between verified bytes), drafted and accepted bytes of the
speculative modes. Read from the batch engine at scrape time: queue depth, batch occupancy (rows
decoding now), and per step the backend calls and the rows they served (rows per call is how full
the batches are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fastblt.runtime.batch import BatchStats
from fastblt.runtime.generator import Generation

disable_created_metrics()  # the *_created series would double every counter's series for nothing here
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GAP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class EngineCollector(Collector):
    """What the batch engine holds and has done, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], BatchStats], max_batch: int, lanes: int = 1,
                 health: Callable[[], tuple[int, int]] | None = None):  # fmt: skip
        self.stats, self.max_batch, self.lanes = stats, max_batch, lanes
        self.health = health or (lambda: (lanes, 0))

    def collect(self) -> Iterator:
        s = self.stats()
        yield GaugeMetricFamily("fastblt_queue_depth", "Requests waiting for a batch row.", value=s.queued)
        yield GaugeMetricFamily("fastblt_batch_occupancy", "Sequences decoding in the batch now.", value=s.active)
        yield GaugeMetricFamily("fastblt_batch_rows", "Rows of the batch (max_batch).", value=self.max_batch)
        yield GaugeMetricFamily("fastblt_batch_lanes", "Batch loops the rows are split across.", value=self.lanes)
        alive, restarts = self.health()
        yield GaugeMetricFamily("fastblt_batch_lanes_alive", "Batch loops running now (a lane whose worker "
                                "process died is not, until its new one is up).", value=alive)  # fmt: skip
        yield CounterMetricFamily("fastblt_lane_restarts", "Worker processes started again after one died.",
                                  value=restarts)  # fmt: skip
        calls = CounterMetricFamily("fastblt_step_calls", "Backend calls per step graph.", labels=["step"])
        rows = CounterMetricFamily("fastblt_step_rows", "Sequences served by those calls, per step graph.",
                                   labels=["step"])  # fmt: skip
        for step in s.calls:
            calls.add_metric([step], s.calls[step])
            rows.add_metric([step], s.rows[step])
        yield calls
        yield rows


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], BatchStats] | None = None, max_batch: int = 0, lanes: int = 1,
                 health: Callable[[], tuple[int, int]] | None = None):  # fmt: skip
        """stats: reads the engine's counters now (an AsyncEngine's `stats`, summed over its lanes);
        health: its lanes running now, and worker processes started again so far."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fastblt_requests", "Completion requests by HTTP status and mode.",
                                ["status", "mode"], registry=r)  # fmt: skip
        self.bytes = Counter("fastblt_generated_bytes", "Bytes generated.", ["mode"], registry=r)
        self.ttfb = Histogram("fastblt_time_to_first_byte_seconds", "From arrival to the first verified byte.",
                              ["mode"], buckets=TTFB_BUCKETS, registry=r)  # fmt: skip
        self.gap = Histogram("fastblt_inter_byte_latency_seconds", "Between consecutive verified bytes.",
                             ["mode"], buckets=GAP_BUCKETS, registry=r)  # fmt: skip
        self.drafted = Counter("fastblt_drafted_bytes", "Draft bytes proposed (blt-s, blt-dv).", ["mode"], registry=r)
        self.accepted = Counter("fastblt_accepted_bytes", "Draft bytes accepted (blt-s, blt-dv).", ["mode"],
                                registry=r)  # fmt: skip
        if stats is not None:
            r.register(EngineCollector(stats, max_batch, lanes, health))

    def request(self, status: int, mode: str) -> None:
        self.requests.labels(str(status), mode).inc()

    def generation(self, g: Generation, arrived: float) -> None:
        """A finished request's bytes, latencies and acceptance (perf_counter times)."""
        s = g.stats
        mode = s.mode
        self.bytes.labels(mode).inc(s.generated)
        times = g.times
        if times:
            self.ttfb.labels(mode).observe(max(times[0] - arrived, 0.0))
            gaps = self.gap.labels(mode)
            for a, b in zip(times, times[1:], strict=False):
                gaps.observe(b - a)
        if s.drafted:
            self.drafted.labels(mode).inc(s.drafted)
            self.accepted.labels(mode).inc(s.accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
