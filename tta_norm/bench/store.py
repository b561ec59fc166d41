"""The result store of a grid run directory: append-only JSON lines under a file lock.

``results.jsonl`` gets one line per finished cell, appended under ``filelock`` and flushed and fsynced before
the next cell starts, so a crash loses at most the cell that was running, and two processes writing into the
same directory both keep all their cells.  A line that does not parse (a write cut off by a crash) is
reported and skipped, and that cell runs again (as does a line that parses but is not a well-formed record:
:func:`malformed`); an append first ends such a torn line so it cannot swallow
the new record.  The same key may appear more than once (a failed cell retried with ``--resume``, two
processes running the same cell): the last ``ok`` record wins, else the last failed one.  ``results.csv`` and
the report are derived from the records and can always be rebuilt.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from tta_norm._files import write_atomically

log = logging.getLogger("tta_norm.bench")

RESULTS = "results.jsonl"
DERIVED = ("results.csv", "report.md")
DERIVED_DIR = "grids"  # a merge's reports of each grid its records came from
PLOTS_DIR = "plots"  # the report's figures


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


@dataclass
class StoreContents:
    """What a store holds: the chosen record per key, and the line numbers (1-based) that did not parse."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)
    lines: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # why a parsed bad line is not a record
    conflicts: list[str] = field(default_factory=list)  # keys with ok records that differ (the last one is kept)

    def ordered(self) -> list[dict[str, Any]]:
        """Records in grid order (``index``), then key."""
        return sorted(self.records.values(), key=lambda r: (r.get("index", 0), r["key"]))


#: metrics that depend on the machine and its load, not on the computation
TIMING_METRICS = ("latency", "memory", "samples_per_second")


def comparable(record: dict[str, Any]) -> str:
    """The part of a record that must be identical for the same key (canonical JSON; NaN equals NaN)."""
    metrics = {k: v for k, v in (record.get("metrics") or {}).items() if k not in TIMING_METRICS}
    part = {k: record.get(k) for k in ("key", "kind", "cell", "identity", "status", "error")}
    return json.dumps({**part, "metrics": metrics}, sort_keys=True, default=str)


def choose(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The record to keep for one key: the last ``ok`` one, else the last one."""
    if old is not None and old.get("status") == "ok" and new.get("status") != "ok":
        return old
    return new


#: metrics of bench and attack records that are fractions: in [0, 1], or NaN (nothing to count)
FRACTIONS = ("error", "mean_domain_error", "ece", "attack_success", "target_clean_hit", "benign_error_clean",
             "benign_error_attacked", "no_attack_error", "changed")  # fmt: skip


#: the cell fields, and the metrics of an ``ok`` record, that the tables, CSVs and merges of each grid kind read
CELL_FIELDS = {"bench": ("method", "setting", "order", "batch_size", "severity", "seed"),
               "attack": ("method", "objective", "eps", "fraction", "batch_size", "mode", "seed")}  # fmt: skip
OK_METRICS = {"bench": ("error",), "attack": ("per_batch",)}


def malformed(rec: Any) -> str | None:
    """Why a parsed line is not a usable record (no string key, an unknown status, no kind, no cell or one
    without the fields its kind's tables read, an ``ok`` record without metrics or with a fraction that is not a
    number in [0, 1]), or ``None``."""
    if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
        return "no key"
    if rec.get("status") not in ("ok", "failed") or not isinstance(rec.get("cell"), dict):
        return "no status or cell"
    kind = rec.get("kind")
    if not isinstance(kind, str):  # (every grid writes its kind; the tables are chosen by it)
        return "no kind"
    missing = [k for k in CELL_FIELDS.get(kind, ()) if k not in rec["cell"]]
    if missing:
        return f"cell without {missing}"
    method = rec["cell"].get("method")
    if kind in CELL_FIELDS and not (isinstance(method, dict) and isinstance(method.get("name"), str)):
        return "cell.method without a name"
    if rec["status"] == "failed":
        return None
    metrics = rec.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("per_domain", {}), dict):
        return "no metrics"
    missing = [k for k in OK_METRICS.get(kind, ()) if k not in metrics]
    if missing:
        return f"metrics without {missing}"
    values = [(k, metrics[k]) for k in FRACTIONS if metrics.get(k) is not None]
    values += [(f"per_domain.{d}", v) for d, v in metrics.get("per_domain", {}).items()]
    for name, v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isnan(v) or 0 <= v <= 1):
            return f"metrics.{name} = {v!r} is not a fraction"
    return None


def parse_lines(text: str) -> StoreContents:
    out = StoreContents()
    for i, line in enumerate(text.splitlines(), start=1):
        out.lines = i
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            out.bad_lines.append(i)
            continue
        why = malformed(rec)
        if why is not None:
            out.bad_lines.append(i)
            out.reasons[i] = why
            continue
        old = out.records.get(rec["key"])
        if (old is not None and old.get("status") == rec["status"] == "ok" and rec["key"] not in out.conflicts
                and comparable(old) != comparable(rec)):  # fmt: skip
            out.conflicts.append(rec["key"])  # (two runs of one cell may repeat it, never with other numbers)
        out.records[rec["key"]] = choose(old, rec)
    return out


class ResultStore:
    """``results.jsonl`` in ``directory`` (created on the first append), guarded by ``.results.lock``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESULTS
        self.lock = FileLock(str(self.directory / ".results.lock"))

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def read(self) -> StoreContents:
        if not self.path.is_file():
            return StoreContents()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            text = self.path.read_text()
        contents = parse_lines(text)
        for i in contents.bad_lines:
            where = "the last line" if i == contents.lines else f"line {i}"
            why = f"is not a valid record ({contents.reasons[i]})" if i in contents.reasons else (
                "is torn or unreadable (an interrupted write)")  # fmt: skip
            log.warning(f"{self.path}: {where} {why}; skipped, its cell runs again")
        if contents.conflicts:
            log.warning(f"{self.path}: {len(contents.conflicts)} key(s) hold ok records with different results (e.g. "
                        f"{contents.conflicts[0]}); the last is used: rerun those cells with --overwrite to trust "
                        "them")  # fmt: skip
        return contents

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line; flushed and fsynced before returning."""
        line = json.dumps(record, default=str) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            with open(self.path, "ab") as f:
                if f.tell() > 0:
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write(b"\n")  # end a torn line so it cannot merge with this record
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())

    def replace(self, records: list[dict[str, Any]]) -> None:
        """Make ``records`` the whole store in one atomic rename (the old store stays intact until then), and
        remove the files derived from the old one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            atomic_write(self.path, "".join(json.dumps(r, default=str) + "\n" for r in records))
            self._remove_derived()

    def retain(self, keys: set[str]) -> None:
        """Keep only the records of ``keys`` (and remove the files derived from the store) in one atomic rename:
        a shard's ``--overwrite``, whose directory the grid's other shards may share."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            text = self.path.read_text() if self.path.is_file() else ""
            kept = []
            for line in text.splitlines():
                try:
                    key = json.loads(line).get("key")
                except (ValueError, AttributeError):
                    key = None
                if key in keys:
                    kept.append(line + "\n")
            atomic_write(self.path, "".join(kept))
            self._remove_derived(figures=False)  # (other shards may be drawing theirs now)

    def _remove_derived(self, *, figures: bool = True) -> None:
        """The files written from the records (CSV, report; with ``figures`` its figures and a merge's per-grid
        reports under ``grids/``)."""
        for name in DERIVED:
            (self.directory / name).unlink(missing_ok=True)
        for name in (DERIVED_DIR, PLOTS_DIR) if figures else ():
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def clear(self) -> None:
        """Remove the stored records and the files derived from them (``--overwrite``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            (self.directory / RESULTS).unlink(missing_ok=True)
            self._remove_derived()


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """Flat rows of bench records: the cell's axes, overall/mean errors (%), latency, one column per domain (%)."""
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
