"""Prometheus metrics. Each app gets its own registry, so several apps (tests, benches) can
live in one process without clashing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from docent.engine.base import ReplicaState

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "docent_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "docent_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY,
            registry=r,
        )
        self.retrieval = Histogram(
            "docent_retrieval_seconds",
            "Retrieval time per question",
            buckets=LATENCY,
            registry=r,
        )
        self.generation = Histogram(
            "docent_generation_seconds",
            "Generation time per answer",
            buckets=LATENCY,
            registry=r,
        )
        self.first_token = Histogram(
            "docent_time_to_first_token_seconds",
            "Time to the first streamed token",
            buckets=LATENCY,
            registry=r,
        )
        self.tokens = Counter("docent_tokens", "Tokens", ["kind"], registry=r)
        self.answers = Counter("docent_answers", "Answers given", ["outcome"], registry=r)
        self.in_flight = Gauge("docent_requests_in_flight", "Requests being served", registry=r)
        self.engine_queue = Gauge(
            "docent_engine_queue",
            "Generation requests waiting or running in the engine",
            registry=r,
        )
        self.shed = Counter(
            "docent_shed", "Answer requests turned away (429/503)", ["reason"], registry=r
        )
        self.jobs = Counter(
            "docent_jobs", "Background jobs finished", ["kind", "state"], registry=r
        )

    def watch_engine(self, depth: Callable[[], int]) -> None:
        self.engine_queue.set_function(lambda: float(depth()))

    def watch_replicas(self, states: Callable[[], Sequence[ReplicaState]]) -> None:
        """Per remote LLM server (``engine.replicas``): up or down, requests outstanding."""
        self.registry.register(_ReplicaCollector(states))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    """Reads the replicas at scrape time: their number and URLs are the engine's business."""

    def __init__(self, states: Callable[[], Sequence[ReplicaState]]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "docent_llm_replica_up",
            "Whether a remote LLM server passes its health checks (1) or is down (0)",
            labels=["replica"],
        )
        outstanding = GaugeMetricFamily(
            "docent_llm_replica_outstanding",
            "Requests sent to a remote LLM server and not finished",
            labels=["replica"],
        )
        for state in self.states():
            up.add_metric([state.url], 1.0 if state.up else 0.0)
            outstanding.add_metric([state.url], float(state.outstanding))
        yield up
        yield outstanding
