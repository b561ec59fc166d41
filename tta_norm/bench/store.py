"""Result storage of the bench harness: atomic JSON-lines records and their flat CSV view."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultStore:
    """``results.jsonl`` (one record per cell) and its flat ``results.csv`` view, in ``directory``."""

    def __init__(self, directory: Path, resume: bool) -> None:
        self.directory = directory
        self.jsonl = directory / "results.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        if resume and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec

    def done(self, key: str) -> bool:
        return self.records.get(key, {}).get("status") == "ok"

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records.values()))
        atomic_write(self.directory / "results.csv", records_to_csv(list(self.records.values())))


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """Flat rows: the cell's axes, overall/mean errors (%), latency, and one column per domain (%)."""
    domains: list[str] = []
    for r in records:
        for d in (r.get("metrics") or {}).get("per_domain", {}):
            if d not in domains:
                domains.append(d)
    head = ["key", "status", "method", "preset", "gradient_method", "setting", "order", "delta", "batch_size",
            "severity", "seed", "error", "mean_domain_error", "ece", "latency_median_ms", "latency_p95_ms",
            "steps_skipped", "seconds"]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head + [f"err:{d}" for d in domains])
    for r in records:
        c, m = r["cell"], r.get("metrics") or {}
        lat = m.get("latency") or {}
        per = m.get("per_domain", {})

        def pct(v: Any) -> Any:
            return "" if v is None else round(100 * float(v), 3)

        writer.writerow(
            [r["key"], r["status"], c["method"]["name"], c["method"]["preset"], c["method"]["method"] or "",
             c["setting"], c["order"], "" if c["delta"] is None else c["delta"], c["batch_size"], c["severity"],
             c["seed"], pct(m.get("error")), pct(m.get("mean_domain_error")), pct(m.get("ece")),
             "" if lat.get("median_ms") is None else round(lat["median_ms"], 3),
             "" if lat.get("p95_ms") is None else round(lat["p95_ms"], 3),
             m.get("steps_skipped", ""), round(r.get("seconds", 0.0), 2)]
            + [pct(per[d]) if d in per else "" for d in domains]
        )  # fmt: skip
    return buf.getvalue()
