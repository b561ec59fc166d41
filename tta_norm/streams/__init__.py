"""Deterministic test streams (settings x orders x batch size) and an overlapped batch iterator.

The bench loop is meant to be this thin::

    bench = load_corruption_benchmark("cifar10", CORRUPTIONS, severities, include_clean=clean_interleaved)
    schedule = domain_schedule(CORRUPTIONS, severities, spec.setting, clean_interleaved=spec.clean_interleaved)
    plan = build_stream(bench.labels(), schedule, spec, seed)        # same for every method given the seed
    acc, timer = MetricsAccumulator.from_plan(plan), BatchTimer(device)
    with PeakMemory(device) as mem:
        for batch in StreamLoader(plan, bench.domains, device=device):
            if batch.reset:
                method.reset()
            with timer:
                logits = method(batch.x)
            acc.update(logits, batch.y, batch.domain, latency=timer.last, segment=batch.segment)
    acc.memory = mem.result
    report = acc.summary() | {"stream": plan.fingerprint(), "data": bench.describe()}
"""

from tta_norm.streams.loader import Batch, StreamLoader
from tta_norm.streams.orders import class_runs, dirichlet_order, iid_order, label_sorted_order
from tta_norm.streams.plan import (
    CLEAN,
    GRADUAL_SEVERITIES,
    ORDERS,
    SETTINGS,
    DomainKey,
    Segment,
    StreamPlan,
    StreamSpec,
    build_stream,
    domain_name,
    domain_schedule,
)

__all__ = [
    "CLEAN",
    "GRADUAL_SEVERITIES",
    "ORDERS",
    "SETTINGS",
    "Batch",
    "DomainKey",
    "Segment",
    "StreamLoader",
    "StreamPlan",
    "StreamSpec",
    "build_stream",
    "class_runs",
    "dirichlet_order",
    "domain_name",
    "domain_schedule",
    "iid_order",
    "label_sorted_order",
]
