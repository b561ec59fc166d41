"""Markdown report and PNG plots from stored benchmark records only (rows = method, columns = corruption,
errors in %).  Rows follow the grid order of the records (their ``index``).

The attack grid's report (:mod:`tta_norm.attacks.bench`) is written with the same pieces: :func:`method_order`,
:func:`group_ok_records`, :func:`pyplot` / :func:`save_figure` and :func:`write_markdown_report`."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tta_norm._files import write_atomically
from tta_norm.bench.grid import code_revisions
from tta_norm.bench.store import PLOTS_DIR, atomic_write

GroupKey = tuple[str, str, Any, int, Any]  # setting, order, delta, batch size, severity
GROUP_AXES = ("setting", "order", "delta", "batch_size", "severity")
SWEEP_AXES = ("setting", "order", "delta", "severity")  # a batch-size sweep: everything but the batch size


def group_ok_records(records: list[dict[str, Any]], axes: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    """The ``ok`` records grouped by the values of their cells' ``axes`` (groups in order of first appearance)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            groups[tuple(r["cell"][a] for a in axes)].append(r)
    return groups


def _group_title(key: GroupKey) -> str:
    setting, order, delta, bs, sev = key
    order_txt = order if delta is None else f"{order}(delta={delta})"
    return f"{setting}, {order_txt}, batch {bs}, severity {sev}"


def _sweep_title(key: tuple) -> str:
    setting, order, delta, sev = key
    return f"{setting}, {order if delta is None else f'{order}(delta={delta})'}, severity {sev}"


def domain_errors(metrics: dict[str, Any], setting: str) -> dict[str, float]:
    """Per-corruption error (fraction).  For ``gradual`` the severity-5 visits ("mean error at 5")."""
    out = {}
    for name, error in metrics.get("per_domain", {}).items():
        if name == "clean":
            continue
        corruption, _, sev = name.partition("@")
        if setting == "gradual" and sev != "5":
            continue
        out[corruption] = error
    return out


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.1f}±{100 * statistics.stdev(values):.1f}"
    return f"{mean:.1f}"


def method_order(records: list[dict[str, Any]]) -> list[str]:
    """The method names of ``records`` in grid order (by ``index``), each once."""
    ordered = sorted(records, key=lambda r: r.get("index", 0))
    return list(dict.fromkeys(r["cell"]["method"]["name"] for r in ordered))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (reports are written without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 120 dpi; atomically, its directory created if another run
    removed it meanwhile) and close it; returns ``path``."""
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        pyplot().close(fig)
    return path


def write_markdown_report(
    out: Path,
    lines: list[str],
    failed: list[str],
    plots: list[Path],
    records: Sequence[dict[str, Any]] = (),
    missing: int = 0,
) -> Path:
    """``out/report.md``: ``lines``, then a warning when ``missing`` cells of the grid have no stored record and
    one when ``records`` come from more than one code revision (:func:`~tta_norm.bench.grid.code_revisions`), a
    section listing the ``failed`` cells (one Markdown item each) and one linking the ``plots`` (files in
    ``out/plots``), each only when there is something to say; returns its path."""
    if missing:
        lines = [*lines, "", f"**Incomplete:** {missing} of the grid's {missing + len(records)} cells have no stored "
                 "result (other shards not merged yet, an interrupted run, or a concurrent `--overwrite`): rows "
                 "may be missing or averaged over fewer seeds; `--resume` runs them."]  # fmt: skip
    revisions = code_revisions(records)
    if len(revisions) > 1:
        lines = [*lines, "", f"**Mixed code:** these {len(records)} records come from {len(revisions)} code "
                 f"revisions ({', '.join(revisions)}), a run resumed across code changes; `--overwrite` reruns "
                 "every cell on one."]  # fmt: skip
    if failed:
        lines = [*lines, "", "### failed cells", "", *failed]
    if plots:
        lines = [*lines, "", "### plots", "", *(f"![{p.stem}](plots/{p.name})" for p in plots)]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def tables(records: list[dict[str, Any]]) -> str:
    """One Markdown table per (setting, order, batch size, severity) group, mean (± std over seeds); when rows
    rest on different numbers of seeds (an incomplete grid), each method name says its count."""
    methods = method_order(records)
    groups = group_ok_records(records, GROUP_AXES)
    parts = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        rows = groups[key]
        setting = key[0]
        columns = list(dict.fromkeys(c for r in rows for c in domain_errors(r["metrics"], setting)))
        header = "| method | " + " | ".join(columns) + " | mean | all samples | ECE |"
        lines = [f"### {_group_title(key)}", "", header, "|" + "---|" * (len(columns) + 4)]
        seeds = {m: len({r["cell"]["seed"] for r in rows if r["cell"]["method"]["name"] == m}) for m in methods}
        uneven = len({n for n in seeds.values() if n}) > 1  # rows averaged over different numbers of seeds
        for m in methods:
            mine = [r for r in rows if r["cell"]["method"]["name"] == m]
            if not mine:
                continue
            label = f"{m} ({seeds[m]} seed{'s' if seeds[m] > 1 else ''})" if uneven else m
            per = [domain_errors(r["metrics"], setting) for r in mine]
            cells = [_fmt([p[c] for p in per if c in p]) for c in columns]
            means = [statistics.fmean(p.values()) for p in per if p]
            overall = [r["metrics"]["error"] for r in mine]
            ece = [r["metrics"]["ece"] for r in mine]
            tail = f" | **{_fmt(means)}** | {_fmt(overall)} | {_fmt(ece)} |"
            lines.append(f"| {label} | " + " | ".join(cells) + tail)
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def batch_size_table(records: list[dict[str, Any]]) -> str:
    """Mean corruption error vs batch size, one table per (setting, order, severity); when cells rest on different
    numbers of seeds (an incomplete grid), each says its count."""
    ok = [r for r in records if r["status"] == "ok"]
    sizes = sorted({r["cell"]["batch_size"] for r in ok})
    if len(sizes) < 2:
        return ""
    methods = method_order(records)
    parts = []
    for key, rows in group_ok_records(records, SWEEP_AXES).items():
        header = "| method | " + " | ".join(f"b{b}" for b in sizes) + " |"
        lines = [f"### mean error vs batch size: {_sweep_title(key)}", "", header, "|" + "---|" * (len(sizes) + 1)]
        counts = {(r["cell"]["method"]["name"], r["cell"]["batch_size"]): 0 for r in rows}
        for r in rows:
            counts[(r["cell"]["method"]["name"], r["cell"]["batch_size"])] += 1
        uneven = len(set(counts.values())) > 1  # cells averaged over different numbers of seeds say their count
        for m in methods:
            vals = []
            for b in sizes:
                mine = [r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["batch_size"] == b]
                per = [domain_errors(r["metrics"], key[0]) for r in mine]
                text = _fmt([statistics.fmean(p.values()) for p in per if p])
                vals.append(f"{text} (n={len(mine)})" if uneven and mine else text)
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def make_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """PNG plots: error vs batch size per method, per-corruption bars, online error curves."""
    plt = pyplot()
    methods = method_order(records)
    written = []
    plot_dir = out / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)

    sweeps = {key: rows for key, rows in group_ok_records(records, SWEEP_AXES).items()
              if len({r["cell"]["batch_size"] for r in rows}) > 1}  # fmt: skip
    for i, (key, rows) in enumerate(sweeps.items()):  # one plot per (setting, order, delta, severity)
        sizes = sorted({r["cell"]["batch_size"] for r in rows})
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            xs, ys = [], []
            for b in sizes:
                per = [domain_errors(r["metrics"], key[0]) for r in rows
                       if r["cell"]["method"]["name"] == m and r["cell"]["batch_size"] == b]  # fmt: skip
                if any(per):
                    xs.append(b)
                    ys.append(100 * statistics.fmean(statistics.fmean(p.values()) for p in per if p))
            if xs:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test batch size")
        ax.set_ylabel("mean corruption error (%)")
        ax.set_title(_sweep_title(key), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = "error_vs_batch_size.png" if len(sweeps) == 1 else f"error_vs_batch_size_{i}.png"
        written.append(save_figure(fig, plot_dir / name))

    groups = group_ok_records(records, GROUP_AXES)
    for i, (key, rows) in enumerate(sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))):
        columns = list(dict.fromkeys(c for r in rows for c in domain_errors(r["metrics"], key[0])))
        present = [m for m in methods if any(r["cell"]["method"]["name"] == m for r in rows)]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(columns) + 2), 4))
        width = 0.8 / max(1, len(present))
        for j, m in enumerate(present):
            per = [domain_errors(r["metrics"], key[0]) for r in rows if r["cell"]["method"]["name"] == m]
            vals = [100 * statistics.fmean([p[c] for p in per if c in p] or [float("nan")]) for c in columns]
            ax.bar([k + j * width for k in range(len(columns))], vals, width, label=m)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(columns))])
        ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("error (%)")
        ax.set_title(_group_title(key), fontsize=8)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, plot_dir / f"per_corruption_{i}.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        # one stream for every curve: the lowest seed all methods ran; where they share none, each curve says
        # its own seed
        seeds = {m: {r["cell"]["seed"] for r in rows if r["cell"]["method"]["name"] == m} for m in present}
        shared = set.intersection(*seeds.values()) if seeds else set()
        for m in present:
            seed = min(shared) if shared else min(seeds[m])
            record = next(r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["seed"] == seed)
            curve = record["metrics"].get("online_error") or {}
            if curve.get("samples"):
                label = m if shared else f"{m} (seed {seed})"
                ax.plot(curve["samples"], [100 * e for e in curve["error"]], label=label)
        if not ax.get_lines():  # no record of this group kept an online curve
            pyplot().close(fig)
            continue
        ax.set_xlabel("samples seen")
        ax.set_ylabel("cumulative error (%)")
        ax.set_title(_group_title(key) + (f", seed {min(shared)}" if shared else ", seeds differ"), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, plot_dir / f"online_error_{i}.png"))
    return written


def _order_text(cell: dict[str, Any]) -> str:
    order = str(cell.get("order"))
    return f"{order}(delta={cell['delta']})" if cell.get("delta") is not None else order


def write_report(
    out: Path, records: list[dict[str, Any]], *, plots: bool = True, missing: int = 0
) -> Path:
    """Write ``report.md`` (and ``plots/*.png``) into ``out``; returns the report path."""
    failed = [r for r in records if r["status"] != "ok"]
    ok = [r for r in records if r["status"] == "ok"]
    name = next((r["grid"] for r in records if r.get("grid")), out.name)
    lines = [f"# tta-norm bench: {name}", ""]
    if ok:
        model = ok[0].get("identity", {}).get("model", {})
        lines += [f"Data: {ok[0]['data']}", "", f"Model: {model.get('name', '?')}"
                  + (f" (checkpoint {model['checkpoint']})" if model.get("checkpoint") else "")
                  + (f", weights sha256 {model['weights_sha256']}" if model.get("weights_sha256") else ""), "",
                  "Errors in %, mean ± std over seeds; 'mean' = mean over corruptions, 'all samples' = error over "
                  "the whole stream; ECE with 15 equal-width bins.", ""]  # fmt: skip
    lines.append(tables(records))
    sweep = batch_size_table(records)
    if sweep:
        lines += ["", sweep]
    lat = []
    for r in ok:
        latency = r["metrics"].get("latency") or {}
        if latency.get("median_ms") is not None:
            c, m = r["cell"], r["metrics"]
            lat.append(f"| {c['method']['name']} | {c['setting']} | {_order_text(c)} | {c.get('severity')} | "
                       f"{c['batch_size']} | {c.get('seed')} | {latency['median_ms']:.1f} | {latency['p95_ms']:.1f} | "
                       f"{m.get('samples_per_second', 0):.0f} | {m.get('steps_skipped', 0)} |")  # fmt: skip
    if lat:
        head = "| method | setting | order | severity | batch | seed | median ms | p95 ms | samples/s | skipped |"
        lines += ["", "### latency per batch", "", head, "|---" * 10 + "|"]
        lines += lat
    failed_cells = [f"- {r['cell']['method']['name']} {r['cell']['setting']} {_order_text(r['cell'])} severity "
                    f"{r['cell'].get('severity')} batch {r['cell']['batch_size']} seed {r['cell'].get('seed')}: "
                    f"{r.get('error')}" for r in failed]  # fmt: skip
    plot_files = make_plots(out, records) if plots and ok else []
    return write_markdown_report(out, lines, failed_cells, plot_files, records, missing=missing)
