"""``tta-norm attack``: a grid of malicious-sample attacks (presets x methods x objective x budget x fraction x
batch size x mode x seed) as a job of the grid engine (:mod:`tta_norm.bench.engine`: keyed append-only store,
resume, shards, executors), with a CSV, a Markdown report and plots derived from the stored records.

Every cell adapts a fresh copy of the source model on each corruption (``corruptions: all`` = the 15
standard ones) and attacks ``n_batches`` batches of it (:func:`tta_norm.attacks.attack_batch`); ``n_batches``
may differ per objective (``{targeted: 2, indiscriminate: 1}``: 30 targeted attacks and 15 indiscriminate
batches per cell over the 15 corruptions).
Every success rate and benign error in the report carries its denominator (attacks, benign samples) and a
95 % Wilson interval; targeted attacks also report their mean steps to success.

Batches are fixed by ``data_seed``: a seeded permutation of each domain (the same images for every cell with
the same batch size), the last ``m`` samples of a batch being the attacker's.
The config format follows :mod:`tta_norm.bench.config` (method entries ``"medbn+tent"``, YAML
overrides ``key=value``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta_norm.attacks.malicious import ATTACK_PROTOCOLS, INITS, MODES, OBJECTIVES, MaliciousAttack, malicious_count
from tta_norm.bench.config import GridConfig, MethodEntry, read_config_data, validate_common
from tta_norm.bench.grid import GridCell, ModelDataJob
from tta_norm.bench.report import group_ok_records, method_order, pyplot, save_figure, write_markdown_report
from tta_norm.bench.store import PLOTS_DIR, atomic_write
from tta_norm.bench.validate import (
    ConfigError,
    check_int,
    check_int_list,
    check_model_outputs,
    check_number,
    check_str,
    user_error,
)


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
class AttackConfig(GridConfig):
    """All settings of one attack grid (see the shipped ``attack_*.yaml`` configs)."""

    name: str = "attack"
    dataset: str = "cifar10"
    model: str = "resnet20"
    checkpoint: str | None = None
    data_dir: str | None = None
    source: str = "auto"
    corruptions: list[str] = field(default_factory=lambda: ["gaussian_noise"])
    severities: list[int] = field(default_factory=lambda: [5])
    n_batches: int | dict[str, int] = 2
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
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    trackers: list[str] = field(default_factory=list)

    LIST_KEYS = ("objectives", "budgets", "fractions", "modes")  # list keys besides the ones every grid has

    def validate(self) -> None:
        """Check types and ranges of every key (one-line :class:`ConfigError` naming the key path)."""
        validate_common(self)
        for i, o in enumerate(self.objectives):
            check_str(f"objectives[{i}]", o, OBJECTIVES)
        for i, m in enumerate(self.modes):
            check_str(f"modes[{i}]", m, MODES)
        check_str("init", self.init, INITS)
        check_str("protocol", self.protocol, sorted(ATTACK_PROTOCOLS))
        self.budgets = [parse_number(b, f"budgets[{i}]") for i, b in enumerate(self.budgets)]
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets: Linf radii in (0, 1] on the [0, 1] pixel scale, got {self.budgets}")
        self.fractions = [parse_number(f, f"fractions[{i}]") for i, f in enumerate(self.fractions)]
        if any(not 0 <= f < 1 for f in self.fractions):
            raise ConfigError(f"fractions: must be in [0, 1), got {self.fractions}")
        self.step_size = parse_number(self.step_size, "step_size")
        if not self.step_size > 0:
            raise ConfigError(f"step_size: must be > 0, got {self.step_size}")
        check_number("stealth_weight", self.stealth_weight)
        self.batch_sizes = check_int_list("batch_sizes", self.batch_sizes, minimum=2)
        if isinstance(self.n_batches, dict):
            missing = sorted(set(self.objectives) - set(self.n_batches))
            if missing:
                raise ConfigError(f"n_batches: no count for objective(s) {missing}; give an integer per objective")
            for key, value in self.n_batches.items():
                check_str("n_batches", key, OBJECTIVES)
                check_int(f"n_batches.{key}", value, minimum=1)
        else:
            check_int("n_batches", self.n_batches, minimum=1)
        check_int("steps", self.steps, minimum=0)
        if len(set(self.seeds)) > 1 and self.init != "random":
            raise ConfigError(
                f"seeds: {self.seeds} with init {self.init!r} repeat the same attacks (the batches are fixed by "
                "data_seed and the attack draws nothing at random), and their counts would be pooled as separate "
                "attacks; give one seed, or init: random"
            )
        for bs, frac in itertools.product(self.batch_sizes, self.fractions):
            if malicious_count(frac, bs) >= bs:
                raise ConfigError(f"fraction {frac} of batch {bs} leaves no benign sample")
            if frac > 0 and malicious_count(frac, bs) == 0:
                raise ConfigError(f"fractions: {frac} of batch {bs} rounds to no malicious sample (the cell would be "
                                  "a no-attack cell under an attack's name); use 0 for the no-attack reference")
        for objective, eps in itertools.product(self.objectives, self.budgets):
            try:  # every setting as the attack itself checks it (finite numbers, ranges)
                MaliciousAttack.from_protocol(self.protocol, objective=objective, num_malicious=1, eps=eps,
                                              step_size=self.step_size, steps=self.steps, init=self.init,
                                              stealth_weight=self.stealth_weight)  # fmt: skip
            except ValueError as err:
                raise ConfigError(f"attack settings: {err}") from None
        for entry in self.method_entries():
            if dict(entry.kwargs).get("window") is not None:
                raise ConfigError(f"methods: {entry.label} sets window; the malicious-sample attack normalises each "
                                  "batch on its own (window=W mixes in earlier samples): leave window out")  # fmt: skip

    def batches_for(self, objective: str) -> int:
        """Attacked batches per domain for ``objective`` (``n_batches``, an int or a per-objective mapping)."""
        return self.n_batches[objective] if isinstance(self.n_batches, dict) else self.n_batches

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

    @property
    def label(self) -> str:
        eps = "eps=1" if self.eps >= 1 else f"eps={self.eps * 255:.3g}/255"
        return (f"{self.entry.label} {self.objective} {eps} f={self.fraction} b{self.batch_size} {self.mode} "
                f"s{self.seed}")  # fmt: skip


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


# ------------------------------------------------------------------------------------------------ counts
def attack_counts(record: dict[str, Any]) -> dict[str, Any]:
    """Denominators of one record, from its per-batch rows: targeted ``attacks`` (batches with a target) and
    ``successes`` (and ``clean_hits``, ``success_steps``: the PGD steps of each success); benign ``samples``
    (B - m per batch) with their ``errors_attacked``."""
    rows = (record.get("metrics") or {}).get("per_batch") or []
    bs = record["cell"]["batch_size"]
    out: dict[str, Any] = {"attacks": 0, "successes": 0, "clean_hits": 0, "success_steps": [], "samples": 0,
                           "errors_attacked": 0, "batches": len(rows)}  # fmt: skip
    for r in rows:
        nb = bs - int(r["num_malicious"])
        out["samples"] += nb
        out["errors_attacked"] += round(float(r["benign_error_attacked"]) * nb)
        if r.get("target_success") is not None:
            out["attacks"] += 1
            out["successes"] += int(bool(r["target_success"]))
            out["clean_hits"] += int(bool(r.get("target_clean_hit")))
            if r["target_success"] and r.get("steps") is not None:
                out["success_steps"].append(int(r["steps"]))
    return out


def pooled_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`attack_counts` summed over records: the seeds of a random start are separate attacks on the same
    batches; without one (``init`` grey or clean) the seeds repeat the same attacks, and one seed counts."""
    total: dict[str, Any] = {"attacks": 0, "successes": 0, "clean_hits": 0, "success_steps": [], "samples": 0,
                             "errors_attacked": 0, "batches": 0}  # fmt: skip
    for r in _distinct_attacks(records):
        for k, v in attack_counts(r).items():
            total[k] = total[k] + v
    return total


def _distinct_attacks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` without the replicates of a deterministic attack: per cell, the lowest seed of those whose
    start is not random."""
    kept: dict[str, tuple[int, dict[str, Any]]] = {}
    out = []
    for r in records:
        init = ((r.get("identity") or {}).get("params") or {}).get("init")
        if init == "random" or "seed" not in r["cell"]:
            out.append(r)
            continue
        cell = json.dumps({k: v for k, v in r["cell"].items() if k != "seed"}, sort_keys=True)
        if cell not in kept or r["cell"]["seed"] < kept[cell][0]:
            kept[cell] = (r["cell"]["seed"], r)
    return out + [r for _, r in kept.values()]


def no_attack_counts(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(errors, samples) of the no-attack benign error of one method's records, each image counted once.

    The cells of a method predict the same clean batches without attack whatever their malicious fraction (and,
    for a deterministic method, seed), and the benign samples of a smaller fraction contain those of a larger
    one; so each ``(domain, batch)`` counts once, on its largest benign set.  Summing the cells instead would
    count an image once per fraction and seed, with an interval too narrow by the square root of that factor.
    """
    best: dict[tuple[Any, Any], tuple[int, int]] = {}
    for record in records:
        bs = record["cell"]["batch_size"]
        for r in (record.get("metrics") or {}).get("per_batch") or []:
            nb = bs - int(r["num_malicious"])
            key = (bs, r["domain"], r["batch"])
            if key not in best or nb > best[key][1]:
                best[key] = (round(float(r["no_attack_error"]) * nb), nb)
    return sum(e for e, _ in best.values()), sum(n for _, n in best.values())


def rate_text(successes: int, trials: int, unit: str = "n") -> str:
    """``"40.0 [25.1-56.8] n=30"``: a rate in %, its 95 % Wilson interval and its denominator."""
    from tta_norm.metrics.functional import wilson_interval

    if trials == 0:
        return "-"
    lo, hi = wilson_interval(successes, trials)
    return f"{100 * successes / trials:.1f} [{100 * lo:.1f}-{100 * hi:.1f}] {unit}={trials}"


# ------------------------------------------------------------------------------------------------- store
CSV_HEAD = ["key", "status", "method", "preset", "gradient_method", "objective", "eps", "fraction", "batch_size",
            "mode", "seed", "num_malicious", "batches", "attacks", "attack_success", "attack_success_lo",
            "attack_success_hi", "mean_steps_to_success", "target_clean_hit", "benign_samples",
            "benign_error_clean", "benign_error_attacked", "benign_error_attacked_lo", "benign_error_attacked_hi",
            "no_attack_error", "changed", "seconds"]  # fmt: skip


def attack_records_to_csv(records: list[dict[str, Any]]) -> str:
    """Flat rows: the cell's axes, its means over batches and the denominators with 95 % Wilson intervals
    (rates and errors in %)."""
    from tta_norm.metrics.functional import wilson_interval

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEAD)
    for r in records:
        c, m = r["cell"], r.get("metrics") or {}

        def pct(v: Any) -> Any:
            return "" if v is None else round(100 * float(v), 3)

        n = attack_counts(r) if r["status"] == "ok" else None
        asr_ci = wilson_interval(n["successes"], n["attacks"]) if n and n["attacks"] else (None, None)
        err_ci = wilson_interval(n["errors_attacked"], n["samples"]) if n and n["samples"] else (None, None)
        steps = statistics.fmean(n["success_steps"]) if n and n["success_steps"] else None
        writer.writerow(
            [r["key"], r["status"], c["method"]["name"], c["method"]["preset"], c["method"]["method"] or "",
             c["objective"], c["eps"], c["fraction"], c["batch_size"], c["mode"], c["seed"],
             m.get("num_malicious", ""), m.get("batches", ""), n["attacks"] if n else "", pct(m.get("attack_success")),
             pct(asr_ci[0]), pct(asr_ci[1]), "" if steps is None else round(steps, 2), pct(m.get("target_clean_hit")),
             n["samples"] if n else "", pct(m.get("benign_error_clean")), pct(m.get("benign_error_attacked")),
             pct(err_ci[0]), pct(err_ci[1]), pct(m.get("no_attack_error")), pct(m.get("changed")),
             round(r.get("seconds", 0.0), 2)]
        )  # fmt: skip
    return buf.getvalue()


def _batch_counts(n_batches: int | dict[str, int]) -> str:
    if isinstance(n_batches, dict):
        return " / ".join(f"{n} ({objective})" for objective, n in n_batches.items())
    return str(n_batches)


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


def run_attack_cell(
    cell: AttackCell,
    model: Any,
    bench: Any,
    cfg: AttackConfig,
    device: Any,
    progress: Callable[[int], None] | None,
    init_states: dict[str, tuple[str, Any]] | None = None,
    expected_inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Attack ``n_batches`` (for the cell's objective) batches of every domain with a fresh adapted copy of
    ``model`` per domain; the entry's ``fisher_samples`` / ``ttn_fit`` are resolved once per cell
    (:func:`tta_norm.methods.entries.resolve_entry_kwargs`, cached per model)."""
    import copy

    import torch

    import tta_norm
    from tta_norm.attacks.malicious import MaliciousAttack, attack_batch, victim_predict
    from tta_norm.data.tensors import to_float_nchw
    from tta_norm.methods.entries import resolve_entry_kwargs

    attack = MaliciousAttack.from_protocol(
        cfg.protocol, objective=cell.objective, fraction=cell.fraction, eps=cell.eps, step_size=cfg.step_size,
        steps=cfg.steps, init=cfg.init, stealth_weight=cfg.stealth_weight,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(cell.seed)
    per_batch: list[dict[str, Any]] = []
    entry = cell.entry
    kwargs = resolve_entry_kwargs(entry.preset, entry.method, dict(entry.kwargs), model, dataset=cfg.dataset,
                                  data_dir=cfg.data_dir, device=device, batch_size=cell.batch_size,
                                  init_states=init_states, expected_inputs=expected_inputs)  # fmt: skip
    for (corruption, severity), data in bench.domains.items():
        torch.manual_seed(cell.seed)
        tta = tta_norm.adapt(model, entry.preset, entry.method, device=device, **kwargs)
        baseline = copy.deepcopy(tta) if cell.mode == "cumulative" else None
        batches = batch_indices(len(data), cell.batch_size, cfg.batches_for(cell.objective), cfg.data_seed)
        for i, idx in enumerate(batches):
            x = to_float_nchw(torch.from_numpy(data.images[idx]).to(device))
            y = torch.from_numpy(data.labels[idx]).to(device)
            out = attack_batch(tta, x, y, attack, mode=cell.mode, generator=generator)
            row = {"domain": f"{corruption}@{severity}", "batch": i, **out.metrics()}
            nb = x.shape[0] - out.num_malicious
            if baseline is not None:  # the no-attack stream: the same model adapting on clean batches only
                pred = victim_predict(baseline, x, attack).argmax(1)  # exactly as the attacked prediction
                row["no_attack_error"] = float((pred[:nb] != y[:nb]).float().mean())
            else:
                row["no_attack_error"] = out.benign_error_clean
            per_batch.append(row)
            if progress is not None:
                progress(1)
    keys = ("target_success", "target_clean_hit", "benign_error_clean", "benign_error_attacked", "no_attack_error",
            "changed", "linf")  # fmt: skip
    summary: dict[str, Any] = {k if k != "target_success" else "attack_success": _mean([r[k] for r in per_batch])
                               for k in keys}  # fmt: skip
    summary["num_malicious"] = per_batch[0]["num_malicious"] if per_batch else None
    summary["batches"] = len(per_batch)
    targeted = [r for r in per_batch if r["target_success"] is not None]
    summary["attacks"] = len(targeted)
    summary["successes"] = sum(bool(r["target_success"]) for r in targeted)
    summary["mean_steps_to_success"] = _mean([r["steps"] for r in targeted if r["target_success"]])
    summary["mean_steps"] = _mean([r["steps"] for r in per_batch])
    summary["per_batch"] = per_batch
    summary["attack"] = attack.as_dict()
    return summary


#: config keys (besides the cell's axes) that change an attack cell's result
ATTACK_PARAMS = ("dataset", "source", "corruptions", "severities", "n_batches", "steps", "step_size", "init",
                 "stealth_weight", "protocol", "data_seed")  # fmt: skip


class AttackJob(ModelDataJob):
    """The cells of an :class:`AttackConfig` for the grid engine."""

    kind = "attack"
    PARAMS = ATTACK_PARAMS

    def __init__(self, cfg: AttackConfig) -> None:
        self.config = cfg

    def cells(self) -> list[GridCell]:
        return [GridCell(i, c.describe(), c.label, c) for i, c in enumerate(self.config.cells())]

    def validate(self) -> None:
        from tta_norm.bench.runner import robustbench_classes
        from tta_norm.bench.validate import check_data_available, check_model

        check_model(self.config.model, self.config.checkpoint,
                    num_classes=robustbench_classes(self.config.model, self.config.dataset))  # fmt: skip
        check_data_available(self.config.dataset, self.config.data_dir, self.config.source, self.config.corruptions,
                             self.config.severities)  # fmt: skip
        self.locate_entry_inputs()

    def prepare(self, device: Any) -> dict[str, Any]:
        from tta_norm.bench import runner
        from tta_norm.data import benchmark

        cfg = self.config
        try:
            model = runner.load_source_model(cfg, device)  # type: ignore[arg-type]  # model/checkpoint/data_dir
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise user_error("model", err) from None
        try:
            bench = benchmark.load_corruption_benchmark(
                cfg.dataset, cfg.corruptions, cfg.severities, data_dir=cfg.data_dir, source=cfg.source,
                n_examples=None, progress=False,
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as err:
            raise user_error("data", err) from None
        most = max(cfg.batches_for(o) for o in cfg.objectives)
        for key, data in bench.domains.items():
            need = most * max(cfg.batch_sizes)
            if need > len(data):
                raise ConfigError(f"n_batches: {most} batches of {max(cfg.batch_sizes)} need {need} "
                                  f"images, domain {key} has {len(data)}")  # fmt: skip
        model = model.to(device)
        check_model_outputs(model, bench, cfg.dataset, device)
        return {"model": model, "bench": bench, **self.prepare_entries()}

    def work(self, cell: GridCell, state: dict[str, Any]) -> int:
        return len(state["bench"].domains) * self.config.batches_for(cell.payload.objective)

    def run_cell(self, cell: GridCell, state: dict[str, Any], device: Any, progress: Callable[[int], None] | None):
        import torch

        with torch.no_grad():
            return run_attack_cell(cell.payload, state["model"], state["bench"], self.config, device, progress,
                                   init_states=state.get("init_states"),
                                   expected_inputs=self.entry_fingerprints(cell, state))  # fmt: skip

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        m = record.get("metrics") or {}
        keys = ("attack_success", "benign_error_attacked", "no_attack_error", "changed")
        return {k: 100 * float(m[k]) for k in keys if m.get(k) is not None}

    def write_outputs(self, out: Path, records: list[dict[str, Any]], missing: int = 0) -> Path:
        return write_attack_outputs(out, records, plots=self.config.plots, missing=missing)


def write_attack_outputs(out: Path, records: list[dict[str, Any]], *, plots: bool = True, missing: int = 0) -> Path:
    """``results.csv`` and ``report.md`` (and plots) from stored attack records."""
    atomic_write(out / "results.csv", attack_records_to_csv(records))
    return write_attack_report(out, records, plots=plots, missing=missing)


def run_attack_grid(cfg: AttackConfig, options: Any = None, **kwargs: Any):
    """Run every cell of ``cfg`` with the grid engine (``options`` a :class:`~tta_norm.bench.engine.RunOptions`
    or its fields as keyword arguments); returns the :class:`~tta_norm.bench.engine.GridOutcome`."""
    from tta_norm.bench.engine import RunOptions, run_grid

    return run_grid(AttackJob(cfg), options or RunOptions(**kwargs))


# --------------------------------------------------------------------------------------------------- report
def _groups(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    return group_ok_records(records, ("objective", "eps", "batch_size", "mode"))


def _main_metric(objective: str) -> str:
    if objective == "indiscriminate":
        return "benign error under attack (%)"
    return "targeted attack success rate (%)"


def main_rate(objective: str, counts: dict[str, Any]) -> tuple[int, int]:
    """(successes, trials) of the figure a table shows: attack successes over targeted attacks, or benign
    errors under attack over benign samples."""
    if objective == "indiscriminate":
        return counts["errors_attacked"], counts["samples"]
    return counts["successes"], counts["attacks"]


def cell_text(objective: str, counts: dict[str, Any]) -> str:
    """A table entry: the rate with its Wilson interval and denominator, plus the targeted extras."""
    if objective == "indiscriminate":
        return rate_text(counts["errors_attacked"], counts["samples"], "n") + f" ({counts['batches']} attacks)"
    text = rate_text(counts["successes"], counts["attacks"], "n")
    if counts["attacks"]:
        steps = counts["success_steps"]
        text += f", steps {statistics.fmean(steps):.1f}" if steps else ", steps -"
        text += f", clean hit {100 * counts['clean_hits'] / counts['attacks']:.1f}"
    return text


def attack_tables(records: list[dict[str, Any]]) -> str:
    """One table per (objective, budget, batch size, mode): rows = method, columns = malicious fraction; every
    figure with its 95 % Wilson interval and denominator (attacks or benign samples), pooled as
    :func:`pooled_counts` says."""
    methods = method_order(records)
    parts = []
    for (objective, eps, bs, mode), rows in sorted(_groups(records).items(), key=lambda kv: str(kv[0])):
        fracs = sorted({r["cell"]["fraction"] for r in rows})
        eps_txt = "unbounded (eps = 1)" if eps >= 1 else f"Linf eps = {eps * 255:.3g}/255"
        head = ["method", "no-attack benign error"] + [f"{f:.0%} (m={malicious_count(f, bs)})" for f in fracs]
        lines = [f"### {objective}, {eps_txt}, batch {bs}, {mode}: {_main_metric(objective)}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
        for m in methods:
            mine = [r for r in rows if r["cell"]["method"]["name"] == m]
            if not mine:
                continue
            vals = [cell_text(objective, pooled_counts([r for r in mine if r["cell"]["fraction"] == f]))
                    for f in fracs]  # fmt: skip
            lines.append(f"| {m} | {rate_text(*no_attack_counts(mine))} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def batch_size_tables(records: list[dict[str, Any]]) -> str:
    """The main figure vs batch size (rows = method), one table per (objective, budget, mode, fraction)."""
    ok = [r for r in records if r["status"] == "ok"]
    if len({r["cell"]["batch_size"] for r in ok}) < 2:
        return ""
    methods = method_order(ok)
    groups = group_ok_records(ok, ("objective", "eps", "mode", "fraction"))
    parts = []
    for (objective, eps, mode, frac), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        sizes = sorted({r["cell"]["batch_size"] for r in rows})
        if len(sizes) < 2:
            continue
        lines = [
            f"### {_main_metric(objective)} vs batch size: {objective}, eps {eps:.4g}, {mode}, {frac:.0%} malicious",
            "",
            "| method | " + " | ".join(f"b{b}" for b in sizes) + " |",
            "|" + "---|" * (len(sizes) + 1),
        ]
        for m in methods:
            vals = []
            for b in sizes:
                mine = [r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["batch_size"] == b]
                vals.append(rate_text(*main_rate(objective, pooled_counts(mine))) if mine else "-")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def make_attack_plots(out: Path, records: list[dict[str, Any]]) -> list[Path]:
    """PNG: the main figure vs malicious fraction with 95 % Wilson intervals as error bars, one line per
    method, one plot per table; the legend gives the number of attacks per point."""
    from tta_norm.metrics.functional import wilson_interval

    plt = pyplot()

    plot_dir = out / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)
    written = []
    for i, ((objective, eps, bs, mode), rows) in enumerate(sorted(_groups(records).items(), key=lambda kv: str(kv[0]))):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in method_order(rows):
            fracs = sorted({r["cell"]["fraction"] for r in rows if r["cell"]["method"]["name"] == m})
            xs, ys, lo, hi, ns = [], [], [], [], []
            for f in fracs:
                mine = [r for r in rows if r["cell"]["method"]["name"] == m and r["cell"]["fraction"] == f]
                counts = pooled_counts(mine)
                k, n = main_rate(objective, counts)
                if n == 0:
                    continue
                a, b = wilson_interval(k, n)
                xs.append(100 * f)
                ys.append(100 * k / n)
                lo.append(max(0.0, 100 * (k / n - a)))  # rounding can put a bound a hair past k / n
                hi.append(max(0.0, 100 * (b - k / n)))
                ns.append(counts["attacks"] if objective != "indiscriminate" else counts["batches"])
            if xs:
                n_txt = f"{min(ns)}" if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{m} ({n_txt} attacks/point)")
        ax.set_xlabel("malicious fraction of the batch (%)")
        ax.set_ylabel(_main_metric(objective) + ", 95 % Wilson CI")
        eps_txt = "eps=1" if eps >= 1 else f"eps={eps * 255:.3g}/255"
        ax.set_title(f"{objective}, {eps_txt}, batch {bs}, {mode}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, plot_dir / f"{objective}_{i}.png"))
    return written


def threat_model(records: list[dict[str, Any]]) -> list[str]:
    """The report's description of the attack, from the parameters stored in the records."""
    rec = next((r for r in records if r.get("identity")), None)
    if rec is None:
        return []
    p, model = rec["identity"]["params"], rec["identity"]["model"]
    protocol = p.get("protocol", "dia")
    return [
        "Threat model (DIA, Wu et al. ICML 2023; MedBN, Park et al. CVPR 2024): white box (model, method and "
        "its current state, benign samples and labels known); the attacker controls the last m samples of "
        f"each test batch and runs {p['steps']} signed-gradient PGD steps of {float(p['step_size']) * 255:.3g}/255 "
        f"from a {p['init']} start through the adapted forward of the whole batch (protocol {protocol}: "
        f"{ATTACK_PROTOCOLS.get(protocol, '?')}). Targeted: benign sample 0 to label (y+1) mod C; success = the "
        "victim predicts it (stops at the first successful step; 'steps' = mean PGD steps of the successes, "
        "'clean hit' = the no-attack model already did). Indiscriminate: maximise the clamped (<= 5) CE of all "
        "benign samples; error over the B - m benign samples. Instant: the deployed model adapts on the clean "
        "batch; cumulative: the poisoned state carries over (no-attack error then from a separate clean stream).",
        "",
        "Every figure: value in %, [95 % Wilson interval], n = its denominator (targeted: attacks, one per "
        "batch; errors: benign samples, which share batches, so the interval is optimistic), pooled over the seeds "
        "of a random start (each a separate attack on the same batches; other starts count one seed); "
        "the no-attack error counts each benign image once (the cells of a row predict the same clean batches).",
        "",
        f"Model {model['name']}" + (f" ({model['checkpoint']})" if model.get("checkpoint") else "")
        + f", weights sha256 {model['weights_sha256']}; domains {', '.join(p['corruptions'])} at severity "
        f"{p['severities']}; {_batch_counts(p['n_batches'])} batches per domain (seeded permutation, "
        f"data_seed {p['data_seed']}).",
        "",
    ]  # fmt: skip


def write_attack_report(out: Path, records: list[dict[str, Any]], *, plots: bool = True, missing: int = 0) -> Path:
    """``report.md`` (threat model, tables, failed cells, plots) in ``out``, from the records only."""
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    name = next((r["grid"] for r in records if r.get("grid")), out.name)
    lines = [f"# tta-norm attack: {name}", ""] + threat_model(records)
    if ok:
        lines += [f"Data: {ok[0]['data']}", ""]
    lines.append(attack_tables(records))
    sweep = batch_size_tables(records)
    if sweep:
        lines += ["", sweep]
    failed_cells = [f"- {r['cell']['method']['name']} {r['cell']['objective']} f={r['cell']['fraction']}: "
                    f"{r.get('error')}" for r in failed]  # fmt: skip
    plot_files = make_attack_plots(out, records) if plots and ok else []
    return write_markdown_report(out, lines, failed_cells, plot_files, records, missing=missing)
