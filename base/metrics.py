"""Prometheus metrics shared by every process (exposed on ``/metrics``)."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

INGEST_EVENTS = Counter("kvadrupel_ingest_events_total", "Events consumed by ingest", ["outcome"])
INGEST_BATCH = Histogram("kvadrupel_ingest_batch_size", "Events per ingest batch",
                         buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000))
SHARD_WRITE = Histogram(
    "kvadrupel_shard_write_seconds", "Time to write one shard's part of a batch", ["shard"]
)
EVAL_USERS = Counter("kvadrupel_evaluated_users_total", "Users evaluated", ["job"])
EVAL_CHANGES = Counter(
    "kvadrupel_rule_changes_total", "Rule state changes emitted", ["rule", "kind"]
)
EVAL_ERRORS = Counter("kvadrupel_rule_errors_total", "Rule errors and timeouts", ["rule"])
EVAL_MISMATCHES = Counter(
    "kvadrupel_eval_mismatches_total",
    "Answers a verifying pass found different from the stored state (incremental "
    "evaluation missed them; must stay 0)")
RULE_CPU = Counter("kvadrupel_rule_cpu_seconds_total",
                   "CPU time spent in each rule by the evaluator (sampled by the budget watchdog)",
                   ["rule"])
DELIVERIES = Counter("kvadrupel_deliveries_total", "Deliveries per channel and outcome",
                     ["channel", "outcome"])
HTTP_REQUESTS = Counter(
    "kvadrupel_http_requests_total", "API requests", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram("kvadrupel_http_request_seconds", "API request latency", ["route"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5))
# Set by the Kafka consumers from librdkafka's statistics (engine/buses/kafka.py), for
# the partitions the process holds: high watermark minus the group's committed offset.
CONSUMER_LAG = Gauge("kvadrupel_consumer_lag",
                     "Messages of a partition not yet committed by the consumer group (Kafka)",
                     ["group", "topic", "partition"])
# Rule code runs in disposable child processes (rules/isolation.py): every one that
# dies (a native crash, the memory or CPU limit, no answer in time) is counted.
SANDBOX_DEATHS = Counter("kvadrupel_sandbox_deaths_total",
                         "Rule sandbox child processes that died or were killed", ["reason"])
SANDBOX_CALLS = Counter("kvadrupel_sandbox_calls_total", "Requests served by rule sandbox "
                        "child processes", ["op"])


def metrics_payload() -> bytes:
    """Every metric of this process in the Prometheus text format; with
    ``PROMETHEUS_MULTIPROC_DIR`` set, those of every process writing there."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
