"""``tta-norm attack``: a grid of malicious-sample attacks (presets x methods x objective x budget x fraction x
batch size x mode x seed), resumable JSON-lines/CSV results, a Markdown report and plots.

Every cell adapts a fresh copy of the source model on each corruption and attacks ``n_batches`` batches of it
(:func:`tta_norm.attacks.attack_batch`).  Batches are fixed by ``data_seed``: a seeded permutation of each
domain (the same images for every cell with the same batch size), the last ``m`` samples of a batch being the
attacker's.  The config format follows :mod:`tta_norm.bench.config` (method entries ``"medbn+tent"``, YAML
overrides ``key=value``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta_norm.attacks.malicious import ATTACK_PROTOCOLS, INITS, MODES, OBJECTIVES
from tta_norm.bench.config import ConfigError, MethodEntry, parse_method, read_config_data, reject_unknown_keys
from tta_norm.bench.store import ResultStore, atomic_write


def parse_number(value: Any, name: str) -> float:
    """A float from YAML: a number or a fraction string such as ``"8/255"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        num, sep, den = value.partition("/")
        try:
            return float(num) / float(den) if sep else float(num)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{name}: expected a number or a fraction like '8/255', got {value!r}")


@dataclass
class AttackConfig:
    """All settings of one attack grid (see the shipped ``attack_*.yaml`` configs)."""

    name: str = "attack"
    dataset: str = "cifar10"
    model: str = "resnet20"
    checkpoint: str | None = None
    data_dir: str | None = None
    source: str = "auto"
    corruptions: list[str] = field(default_factory=lambda: ["gaussian_noise"])
    severities: list[int] = field(default_factory=lambda: [5])
    n_batches: int = 2
    methods: list[Any] = field(default_factory=lambda: ["source", "tbn", "medbn", "tbn+tent", "medbn+tent"])
    objectives: list[str] = field(default_factory=lambda: ["targeted", "indiscriminate"])
    budgets: list[Any] = field(default_factory=lambda: [1.0])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    batch_sizes: list[int] = field(default_factory=lambda: [200])
    modes: list[str] = field(default_factory=lambda: ["instant"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 100
    step_size: Any = "1/255"
    init: str = "grey"
    stealth_weight: float = 1.0
    protocol: str = "dia"
    data_seed: int = 0
    device: str = "auto"
    output: str = "runs/attack"
    plots: bool = True

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> AttackConfig:
        reject_unknown_keys(cls, data, source)
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_entries(self) -> list[MethodEntry]:
        return [parse_method(m) for m in self.methods]

    def validate(self) -> None:
        from tta_norm.data.benchmark import CORRUPTIONS, EXTRA_CORRUPTIONS

        for name in ("corruptions", "severities", "methods", "objectives", "budgets", "fractions", "batch_sizes",
                     "modes", "seeds"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                setattr(self, name, [value])
            if not getattr(self, name):
                raise ConfigError(f"{name} must not be empty")
        known = set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
        bad = [c for c in self.corruptions if c not in known]
        if bad:
            raise ConfigError(f"unknown corruption(s) {bad}; known: {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
        for s in self.severities:
            if not isinstance(s, int) or not 1 <= s <= 5:
                raise ConfigError(f"severities must be integers in 1..5, got {s!r}")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise ConfigError(f"unknown objective {o!r}; choose from {OBJECTIVES}")
        for m in self.modes:
            if m not in MODES:
                raise ConfigError(f"unknown mode {m!r}; choose from {MODES}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose from {INITS}")
        if self.protocol not in ATTACK_PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; choose from {sorted(ATTACK_PROTOCOLS)}")
        self.budgets = [parse_number(b, "budgets") for b in self.budgets]
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets are Linf radii in (0, 1] on the [0, 1] pixel scale, got {self.budgets}")
        self.fractions = [parse_number(f, "fractions") for f in self.fractions]
        if any(not 0 <= f < 1 for f in self.fractions):
            raise ConfigError(f"fractions must be in [0, 1), got {self.fractions}")
        self.step_size = parse_number(self.step_size, "step_size")
        for b in self.batch_sizes:
            if not isinstance(b, int) or b < 2:
                raise ConfigError(f"batch_sizes must be integers >= 2, got {b!r}")
        for key in ("n_batches", "steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (1 if key == "n_batches" else 0):
                raise ConfigError(f"{key} must be a {'positive' if key == 'n_batches' else 'non-negative'} integer")
        if self.source not in ("auto", "release", "regenerate"):
            raise ConfigError(f"source must be auto, release or regenerate, got {self.source!r}")
        labels = [e.label for e in self.method_entries()]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"duplicate method rows {dup}; give them distinct 'name's")
        for bs, frac in itertools.product(self.batch_sizes, self.fractions):
            if round(frac * bs) >= bs:
                raise ConfigError(f"fraction {frac} of batch {bs} leaves no benign sample")

    def cells(self) -> list[AttackCell]:
        return [
            AttackCell(entry, obj, eps, frac, bs, mode, seed)
            for entry, obj, eps, frac, bs, mode, seed in itertools.product(
                self.method_entries(), self.objectives, self.budgets, self.fractions, self.batch_sizes, self.modes,
                self.seeds,
            )
        ]  # fmt: skip


@dataclass(frozen=True)
class AttackCell:
    """One point of the attack grid."""

    entry: MethodEntry
    objective: str
    eps: float
    fraction: float
    batch_size: int
    mode: str
    seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.entry.as_dict(),
            "objective": self.objective,
            "eps": self.eps,
            "fraction": self.fraction,
            "batch_size": self.batch_size,
            "mode": self.mode,
            "seed": self.seed,
        }

    def key(self, cfg: AttackConfig) -> str:
        extra = {k: getattr(cfg, k) for k in ("steps", "step_size", "init", "stealth_weight", "protocol",
                                               "n_batches", "data_seed", "corruptions", "severities", "model",
                                               "checkpoint")}  # fmt: skip
        payload = json.dumps({**self.describe(), **extra}, sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def shipped_attack_configs() -> dict[str, Path]:
    """The ``attack_*.yaml`` configs shipped in ``tta_norm/configs``, by name."""
    from importlib import resources

    root = resources.files("tta_norm") / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.startswith("attack_")
            and p.name.endswith((".yaml", ".yml"))}  # fmt: skip


def load_attack_config(path_or_name: str | None, overrides: Sequence[str] = ()) -> AttackConfig:
    """A config from a YAML file or a shipped ``attack_*`` config name (with or without the prefix)."""
    data, source = read_config_data(
        path_or_name, overrides, shipped_attack_configs(), kind="attack config", names=[f"attack_{path_or_name}"]
    )
    return AttackConfig.from_mapping(data, source)


# ---------------------------------------------------------------------------------------------------- store
CSV_HEAD = ["key", "status", "method", "preset", "gradient_method", "objective", "eps", "fraction", "batch_size",
            "mode", "seed", "num_malicious", "batches", "attack_success", "target_clean_hit", "benign_error_clean",
            "benign_error_attacked", "no_attack_error", "changed", "seconds"]  # fmt: skip


def attack_records_to_csv(records: list[dict[str, Any]]) -> str:
    """Flat rows: the cell's axes and its means over batches (rates and errors in %)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEAD)
    for r in records:
        c, m = r["cell"], r.get("metrics") or {}

        def pct(key: str, m: dict[str, Any] = m) -> Any:
            v = m.get(key)
            return "" if v is None else round(100 * float(v), 3)

        writer.writerow(
            [r["key"], r["status"], c["method"]["name"], c["method"]["preset"], c["method"]["method"] or "",
             c["objective"], c["eps"], c["fraction"], c["batch_size"], c["mode"], c["seed"],
             m.get("num_malicious", ""), m.get("batches", ""), pct("attack_success"), pct("target_clean_hit"),
             pct("benign_error_clean"), pct("benign_error_attacked"), pct("no_attack_error"), pct("changed"),
             round(r.get("seconds", 0.0), 2)]
        )  # fmt: skip
    return buf.getvalue()


class AttackStore(ResultStore):
    """The bench harness's atomic ``results.jsonl`` store, with the attack grid's CSV view."""

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records.values()))
        atomic_write(self.directory / "results.csv", attack_records_to_csv(list(self.records.values())))


# --------------------------------------------------------------------------------------------------- runner
def batch_indices(n_images: int, batch_size: int, n_batches: int, seed: int) -> list[Any]:
    """``n_batches`` disjoint index batches from a seeded permutation of ``range(n_images)``."""
    import numpy as np

    if n_batches * batch_size > n_images:
        raise ValueError(f"{n_batches} batches of {batch_size} need {n_batches * batch_size} images, have {n_images}")
    perm = np.random.default_rng(seed).permutation(n_images)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def run_attack_cell(cell: AttackCell, model: Any, bench: Any, cfg: AttackConfig, device: Any, bar: Any = None):
    """Attack ``n_batches`` batches of every domain with a fresh adapted copy of ``model`` per domain."""
    import copy

    import torch

    import tta_norm
    from tta_norm.attacks.malicious import MaliciousAttack, attack_batch
    from tta_norm.data.tensors import to_float_nchw

    attack = MaliciousAttack.from_protocol(
        cfg.protocol, objective=cell.objective, fraction=cell.fraction, eps=cell.eps, step_size=cfg.step_size,
        steps=cfg.steps, init=cfg.init, stealth_weight=cfg.stealth_weight,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(cell.seed)
    per_batch: list[dict[str, Any]] = []
    for (corruption, severity), data in bench.domains.items():
        torch.manual_seed(cell.seed)
        entry = cell.entry
        tta = tta_norm.adapt(model, entry.preset, entry.method, device=device, **dict(entry.kwargs))
        baseline = copy.deepcopy(tta) if cell.mode == "cumulative" else None
        for i, idx in enumerate(batch_indices(len(data), cell.batch_size, cfg.n_batches, cfg.data_seed)):
            x = to_float_nchw(torch.from_numpy(data.images[idx]).to(device))
            y = torch.from_numpy(data.labels[idx]).to(device)
            out = attack_batch(tta, x, y, attack, mode=cell.mode, generator=generator)
            row = {"domain": f"{corruption}@{severity}", "batch": i, **out.metrics()}
            nb = x.shape[0] - out.num_malicious
            if baseline is not None:  # the no-attack stream: the same model adapting on clean batches only
                with torch.enable_grad() if baseline.method is not None else torch.no_grad():
                    pred = baseline(x).argmax(1)
                row["no_attack_error"] = float((pred[:nb] != y[:nb]).float().mean())
            else:
                row["no_attack_error"] = out.benign_error_clean
            per_batch.append(row)
            if bar is not None:
                bar.update(1)
    keys = ("target_success", "target_clean_hit", "benign_error_clean", "benign_error_attacked", "no_attack_error",
            "changed", "linf")  # fmt: skip
    summary: dict[str, Any] = {k if k != "target_success" else "attack_success": _mean([r[k] for r in per_batch])
                               for k in keys}  # fmt: skip
    summary["num_malicious"] = per_batch[0]["num_malicious"] if per_batch else None
    summary["batches"] = len(per_batch)
    summary["per_batch"] = per_batch
    summary["attack"] = attack.as_dict()
    return summary


def run_attack_grid(cfg: AttackConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run every cell of ``cfg`` (skipping stored ones with ``resume``), then write the report."""
    import torch
    from tqdm.auto import tqdm

    from tta_norm.bench.runner import cell_record, load_source_model, resolve_device
    from tta_norm.data.benchmark import load_corruption_benchmark

    out = Path(cfg.output)
    cells = cfg.cells()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    store = AttackStore(out, resume)
    todo = [c for c in cells if not store.done(c.key(cfg))]
    if progress:
        print(f"[tta-norm attack] {len(cells)} cells, {len(cells) - len(todo)} already done; results in {out}")
    if todo:
        device = resolve_device(cfg.device)
        model = load_source_model(cfg, device)  # type: ignore[arg-type]  # uses model/checkpoint/data_dir
        bench = load_corruption_benchmark(
            cfg.dataset, cfg.corruptions, cfg.severities, data_dir=cfg.data_dir, source=cfg.source,
            n_examples=None, progress=progress,
        )  # fmt: skip
        if progress:
            print(f"[tta-norm attack] data: {bench.describe()}")
        total = len(todo) * len(bench.domains) * cfg.n_batches
        with tqdm(total=total, unit="batch", desc="attack", disable=not progress) as bar:
            for cell in todo:
                bar.set_postfix_str(f"{cell.entry.label} {cell.objective} eps={cell.eps:.3g} f={cell.fraction} "
                                    f"b{cell.batch_size} {cell.mode}")  # fmt: skip
                with torch.no_grad():
                    record = cell_record(
                        cell.key(cfg), cell.describe(), bench.describe(),
                        lambda: run_attack_cell(cell, model, bench, cfg, device, bar),  # noqa: B023
                    )  # fmt: skip
                if progress and record["status"] == "failed":
                    tqdm.write(f"[tta-norm attack] cell {cell.entry.label} failed: {record['error']}")
                store.add(record)
    write_attack_report(out, list(store.records.values()), cfg, plots=cfg.plots)
    return out


# --------------------------------------------------------------------------------------------------- report
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _groups(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            c = r["cell"]
            groups[(c["objective"], c["eps"], c["batch_size"], c["mode"])].append(r)
    return groups


def _main_metric(objective: str) -> tuple[str, str]:
    if objective == "indiscriminate":
        return "benign_error_attacked", "benign error under attack (%)"
    return "attack_success", "targeted attack success rate (%)"


def _seed_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    return _mean([r["metrics"].get(key) for r in rows])


def attack_tables(records: list[dict[str, Any]], cfg: AttackConfig | None = None) -> str:
    """One table per (objective, budget, batch size, mode): rows = method, columns = malicious fraction."""
    methods = [e.label for e in cfg.method_entries()] if cfg else list(
        dict.fromkeys(r["cell"]["method"]["name"] for r in records))  # fmt: skip
    parts = []
    for (objective, eps, bs, mode), rows in sorted(_groups(records).items(), key=lambda kv: str(kv[0])):
        key, label = _main_metric(objective)
        fracs = sorted({r["cell"]["fraction"] for r in rows})
        eps_txt = "unbounded (eps = 1)" if eps >= 1 else f"Linf eps = {eps * 255:.3g}/255"
        head = ["method", "no-attack benign error"] + [f"{f:.0%} (m={round(f * bs)})" for f in fracs]
        lines = [f"### {objective}, {eps_txt}, batch {bs}, {mode}: {label}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for m in methods:
            mine = [r for r in rows if r["cell"]["method"]["name"] == m]
            if not mine:
                continue
            vals = []
            for f in fracs:
                rf = [r for r in mine if r["cell"]["fraction"] == f]
                v = _pct(_seed_mean(rf, key))
                if objective != "indiscriminate" and rf:
                    v += f" (clean hit {_pct(_seed_mean(rf, 'target_clean_hit'))})"
                vals.append(v)
            lines.append(f"| {m} | {_pct(_seed_mean(mine, 'no_attack_error'))} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def batch_size_tables(records: list[dict[str, Any]], cfg: AttackConfig | None = None) -> str:
    """The main metric vs batch size (rows = method), one table per (objective, budget, mode, fraction)."""
    ok = [r for r in records if r["status"] == "ok"]
    if len({r["cell"]["batch_size"] for r in ok}) < 2:
        return ""
    methods = [e.label for e in cfg.method_entries()] if cfg else list(
        dict.fromkeys(r["cell"]["method"]["name"] for r in ok))  # fmt: skip
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        c = r["cell"]
        groups[(c["objective"], c["eps"], c["mode"], c["fraction"])].append(r)
    parts = []
    for (objective, eps, mode, frac), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        sizes = sorted({r["cell"]["batch_size"] for r in rows})
        if len(sizes) < 2:
            continue
        key, label = _main_metric(objective)
        lines = [
            f"### {label} vs batch size: {objective}, eps {eps:.4g}, {mode}, {frac:.0%} malicious",
            "",
            "| method | " + " | ".join(f"b{b}" for b in sizes) + " |",
            "|" + "---|" * (len(sizes) + 1),
        ]
        for m in methods:
            vals = [
                _pct(
                    _seed_mean(
                        [r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["batch_size"] == b], key
                    )
                )
                for b in sizes
            ]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def make_attack_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """PNG: the main metric vs malicious fraction, one line per method, one plot per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    written = []
    for i, ((objective, eps, bs, mode), rows) in enumerate(sorted(_groups(records).items(), key=lambda kv: str(kv[0]))):
        key, label = _main_metric(objective)
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r["cell"]["method"]["name"] for r in rows):
            fracs = sorted({r["cell"]["fraction"] for r in rows if r["cell"]["method"]["name"] == m})
            ys = [_seed_mean([r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["fraction"] == f], key)
                  for f in fracs]  # fmt: skip
            ax.plot([100 * f for f in fracs], [100 * (v or 0.0) for v in ys], marker="o", label=m)
        ax.set_xlabel("malicious fraction of the batch (%)")
        ax.set_ylabel(label)
        eps_txt = "eps=1" if eps >= 1 else f"eps={eps * 255:.3g}/255"
        ax.set_title(f"{objective}, {eps_txt}, batch {bs}, {mode}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"{objective}_{i}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_attack_report(
    out: Path, records: list[dict[str, Any]], cfg: AttackConfig | None = None, *, plots: bool = True
) -> Path:
    """``report.md`` (threat model, tables, failed cells, plots) in ``out``."""
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    lines = [f"# tta-norm attack: {cfg.name if cfg else out.name}", ""]
    if cfg is not None:
        lines += [
            "Threat model (DIA, Wu et al. ICML 2023; MedBN, Park et al. CVPR 2024): white box (model, method and "
            "its current state, benign samples and labels known); the attacker controls the last m samples of "
            f"each test batch and runs {cfg.steps} signed-gradient PGD steps of {cfg.step_size * 255:.3g}/255 from "
            f"a {cfg.init} start through the adapted forward of the whole batch (protocol {cfg.protocol}: "
            f"{ATTACK_PROTOCOLS[cfg.protocol]}). Targeted: benign sample 0 to label (y+1) mod C; success = the victim "
            "predicts it ('clean hit' = the no-attack model already did). Indiscriminate: maximise the clamped "
            "(<= 5) CE of all benign samples; error over the B - m benign samples. Instant: the deployed model "
            "adapts on the clean batch; cumulative: the poisoned state carries over (no-attack error then from a "
            "separate clean stream).",
            "",
            f"Model {cfg.model}" + (f" ({cfg.checkpoint})" if cfg.checkpoint else "") + f"; domains "
            f"{', '.join(cfg.corruptions)} at severity {cfg.severities}; {cfg.n_batches} batches per domain "
            f"(seeded permutation, data_seed {cfg.data_seed}).",
            "",
        ]  # fmt: skip
    if ok:
        lines += [f"Data: {ok[0]['data']}", ""]
    lines.append(attack_tables(records, cfg))
    sweep = batch_size_tables(records, cfg)
    if sweep:
        lines += ["", sweep]
    if failed:
        lines += ["", "### failed cells", ""]
        lines += [f"- {r['cell']['method']['name']} {r['cell']['objective']} f={r['cell']['fraction']}: "
                  f"{r.get('error')}" for r in failed]  # fmt: skip
    if plots and ok:
        written = make_attack_plots(out, records)
        lines += ["", "### plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
