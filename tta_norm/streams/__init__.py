"""Deterministic test streams (settings x orders x batch size) and an overlapped batch iterator."""

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
