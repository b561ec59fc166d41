"""``tta-norm bench merge DIR... -o OUT``: combine the stores of several runs (shards, machines) into one.

Records are matched by their full key (model, data, parameters, version and coordinates).  Two ``ok``
records with the same key must agree on every result (timings, memory and machine facts excepted); a
disagreement is reported as a conflict and the first directory's record is kept.  An ``ok`` record wins over
a failed one.  The merged directory gets the records appended to its store, then its CSV and report are
derived from all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tta_norm.bench.store import DERIVED_DIR, TIMING_METRICS, ResultStore, comparable  # noqa: F401 (re-exported)

log = logging.getLogger("tta_norm.bench")

def merge_records(stores: list[dict[str, dict[str, Any]]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """One record per key from several stores (in order); and the keys whose ``ok`` records disagree."""
    merged: dict[str, dict[str, Any]] = {}
    conflicts: list[str] = []
    for records in stores:
        for key, rec in records.items():
            old = merged.get(key)
            if old is None or (old.get("status") != "ok" and rec.get("status") == "ok"):
                merged[key] = rec
            elif old.get("status") == "ok" and rec.get("status") == "ok" and comparable(old) != comparable(rec):
                conflicts.append(key)
    return merged, conflicts


#: where the derived outputs of each grid kind are written from records
OUTPUT_WRITERS = {
    "bench": ("tta_norm.bench.runner", "write_bench_outputs"),
    "attack": ("tta_norm.attacks.bench", "write_attack_outputs"),
}


def distinct_row_names(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` where one row name covers different method entries (runs merged from configs that gave two
    entries the same ``name``) renamed ``name (label #digest)`` in copies, so that a report never averages
    different methods into one row; a warning names them."""
    import copy
    from collections import defaultdict

    from tta_norm.bench.grid import digest
    from tta_norm.methods.entries import method_label

    def entry(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in (r.get("cell") or {}).get("method", {}).items() if k != "name"}

    entries: dict[str, set[str]] = defaultdict(set)
    for r in records:
        entries[r["cell"]["method"]["name"]].add(digest(entry(r), 6))
    shared = {name for name, found in entries.items() if len(found) > 1}
    if not shared:
        return records
    log.warning(f"row name(s) {sorted(shared)} cover different method entries in the merged runs; their rows "
                "are split and named after each entry")  # fmt: skip
    out = []
    for r in records:
        if r["cell"]["method"]["name"] in shared:
            r = copy.deepcopy(r)
            e = entry(r)
            label = method_label(e.get("preset", "?"), e.get("method"), e.get("kwargs"))
            r["cell"]["method"]["name"] = f"{r['cell']['method']['name']} ({label} #{digest(e, 6)})"
        out.append(r)
    return out


def write_outputs(out: Path, records: list[dict[str, Any]], plots: bool = True, missing: int = 0) -> Path | None:
    """CSV and report of stored records, by their kind (bench or attack); ``None`` for another kind.

    Records of several grids (another model, data or parameters) never share a table: each grid gets its own
    CSV and report in ``grids/<identity hash>/`` and ``report.md`` lists them."""
    import importlib
    from collections import defaultdict

    from tta_norm.bench.grid import digest
    from tta_norm.bench.store import atomic_write

    kinds = {r.get("kind", "bench") for r in records}
    if not records:
        return None
    if len(kinds) > 1:
        raise ValueError(f"records of several grid kinds {sorted(kinds)} cannot share one report")
    kind = kinds.pop()
    if kind not in OUTPUT_WRITERS:
        log.info(f"no report for grid kind {kind!r}; the records are in {out / 'results.jsonl'}")
        return None
    module, name = OUTPUT_WRITERS[kind]
    writer = getattr(importlib.import_module(module), name)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:  # a grid's identity; an entry's own inputs (files it reads) do not split it ...
        grid = {k: v for k, v in (r.get("identity") or {}).items() if k != "inputs"}
        groups[digest(grid, 12)].append(r)
    for key in list(groups):  # ... unless one cell holds results of different inputs: never averaged together
        inputs_by_cell = defaultdict(set)
        for r in groups[key]:
            inputs_by_cell[r.get("axes_key")].add(digest((r.get("identity") or {}).get("inputs"), 12))
        if any(len(found) > 1 for found in inputs_by_cell.values()):
            for r in groups.pop(key):
                groups[digest(r.get("identity"), 12)].append(r)
    groups = {key: distinct_row_names(recs) for key, recs in groups.items()}
    if len(groups) == 1:
        return writer(out, next(iter(groups.values())), plots=plots, missing=missing)
    lines = [f"# tta-norm {kind}: merged", "", f"{len(records)} records of {len(groups)} grids that differ in "
             "model, data or parameters; each has its own CSV and report:", ""]  # fmt: skip
    if missing:
        lines[2:2] = [f"**Incomplete:** {missing} planned cells have no stored record (a shard not merged, or "
                      "cells not run yet).", ""]  # fmt: skip
    for key, recs in groups.items():
        sub = out / DERIVED_DIR / key
        sub.mkdir(parents=True, exist_ok=True)
        writer(sub, recs, plots=plots)
        ident = recs[0].get("identity") or {}
        model = ident.get("model") or {}
        params = json.dumps(ident.get("params"), default=str)
        inputs = f", entry inputs {json.dumps(ident['inputs'])}" if ident.get("inputs") else ""
        lines.append(f"- [{model.get('name', '?')}, {len(recs)} records](grids/{key}/report.md): weights sha256 "
                     f"{model.get('weights_sha256')}, parameters {params}{inputs}")  # fmt: skip
    (out / "results.csv").unlink(missing_ok=True)
    path = out / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def planned_grids(dirs: list[str | Path]) -> list[set[str]]:
    """The cell keys of the grid the latest run of each directory planned (its whole grid, every shard), from
    ``provenance.json``; equal grids once."""
    grids: dict[str, set[str]] = {}
    for d in dirs:
        try:
            runs = json.loads((Path(d) / "provenance.json").read_text()).get("runs", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        planned = [r["grid_keys"] for r in runs if isinstance(r, dict) and isinstance(r.get("grid_keys"), list)]
        if planned:
            keys = set(map(str, planned[-1]))
            grids[json.dumps(sorted(keys))] = keys
    return list(grids.values())


def _record_merge(out: Path, dirs: list[str | Path], grids: list[set[str]]) -> None:
    """A ``provenance.json`` entry for the merge, with the cell keys of every merged grid, so a later merge of
    ``out`` still knows which cells are missing."""
    import os
    import time

    from tta_norm.bench.engine import write_provenance

    write_provenance(out, {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "command": sys.argv, "kind": "merge",
        "merged": [str(d) for d in dirs], "status": "finished", "grid_keys": sorted(set().union(*grids)),
    })  # fmt: skip


def merge_dirs(dirs: list[str | Path], out: str | Path, *, overwrite: bool = False, resume: bool = False):
    """Merge the stores of ``dirs`` into ``out``; returns ``(merged record count, conflicting keys, report)``."""
    from tta_norm.bench.engine import check_output_dir
    from tta_norm.bench.validate import ConfigError

    out = check_output_dir(out)  # (an output that is a file, or under none that can be written: one line, first)
    sources = []
    inner_conflicts: list[str] = []
    for d in dirs:
        store = ResultStore(d)
        if not store.path.is_file() and not (Path(d) / "provenance.json").is_file():
            # (a run with no cells of its own, e.g. shard 5/5 of 4 cells, has provenance: an empty input)
            raise ConfigError(f"{d} has no {store.path.name} and no provenance.json: not a run directory")
        contents = store.read()
        sources.append(contents.records)
        inner_conflicts += contents.conflicts
    target = ResultStore(out)
    if target.exists() and not (overwrite or resume):
        raise ConfigError(f"output: {out} already holds results; pass --resume to add to them or --overwrite")
    existing = {} if overwrite else target.read().records
    merged, conflicts = merge_records([existing, *sources])
    conflicts = sorted(set(conflicts) | set(inner_conflicts))
    kinds = sorted({r.get("kind", "bench") for r in merged.values()})
    if len(kinds) > 1:  # refused before anything is cleared or written
        raise ConfigError(f"records of several grid kinds {kinds} cannot share one directory")
    if overwrite:  # one atomic replacement: an output that is also an input is never left half written
        target.replace(list(merged.values()))
    else:
        for key, rec in merged.items():
            if existing.get(key) is not rec:
                target.append(rec)
    records = target.read().ordered()
    stored = {r["key"] for r in records}
    same = {Path(d).resolve() for d in dirs}
    grids = planned_grids([*dirs, *([out] if resume and out.resolve() not in same else [])])
    missing = len(set().union(*grids) - stored)  # a cell two overlapping grids plan is missing once
    _record_merge(out, dirs, grids)
    if missing:
        log.warning(f"merge: {missing} cell(s) of the merged runs' grids have no record (a shard not merged, or "
                    "cells not run yet); the report says so")  # fmt: skip
    try:
        report = write_outputs(out, records, missing=missing)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return len(merged), conflicts, report


def merge_command(args: argparse.Namespace) -> int:
    from tta_norm.bench.validate import ConfigError
    from tta_norm.cli.grid import configure_logging

    configure_logging("warning" if args.quiet else args.log_level)
    if not args.dirs or not args.output:
        print("tta-norm bench merge: give the run directories and -o OUT (tta-norm bench merge A B -o C)",
              file=sys.stderr)  # fmt: skip
        return 2
    options = (("-s/--set", args.overrides), ("--data-dir", args.data_dir), ("--device", args.device),
               ("--shard", args.shard), ("--executor", args.executor != "local"), ("--ray-address", args.ray_address),
               ("--list-configs", args.list_configs), ("--dry-run", args.dry_run))  # fmt: skip
    ignored = [flag for flag, given in options if given]
    if ignored:  # (they were accepted and ignored: a --dry-run merge wrote its output)
        print(f"tta-norm bench merge: {', '.join(ignored)} do(es) not apply to merge (it combines stored records, "
              "runs nothing)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        n, conflicts, report = merge_dirs(args.dirs, args.output, overwrite=args.overwrite, resume=args.resume)
    except (ConfigError, OSError) as err:
        print(f"tta-norm bench merge: {err}", file=sys.stderr)
        return 2
    for key in conflicts:
        print(f"tta-norm bench merge: conflict: records with key {key} disagree; kept the first", file=sys.stderr)
    extra = (f"; report {report}" if report else "") + (f"; {len(conflicts)} conflicts" if conflicts else "")
    print(f"[tta-norm bench merge] {n} records from {len(args.dirs)} directories into {args.output}{extra}")
    return 1 if conflicts else 0
