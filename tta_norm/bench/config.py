"""Benchmark configuration: a YAML file plus command-line overrides, validated before any long work starts.

A config describes a grid: ``methods`` x ``settings`` x ``orders`` (x ``deltas`` for the Dirichlet order) x
``batch_sizes`` x ``severities`` x ``seeds``.  Each point of the grid is a :class:`Cell`, run and stored
independently (so a grid can be resumed cell by cell).

A method entry is a string ``"<preset>"`` or ``"<preset>+<method>"`` (``"tbn+tent"``), or a mapping
``{preset: ..., method: ..., name: ..., kwargs: {...}}`` whose ``kwargs`` go to :func:`tta_norm.adapt`
(spec overrides such as ``alpha`` or method hyper-parameters such as ``lr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tta_norm.api import check_ambiguous_kwargs
from tta_norm.bench.validate import (
    ConfigError,
    as_list,
    check_bool,
    check_device,
    check_entry_types,
    check_int,
    check_int_list,
    check_method_kwargs,
    check_number,
    check_resources,
    check_str,
    check_trackers,
    user_error,
)
from tta_norm.data.benchmark import CORRUPTIONS, DATASETS, EXTRA_CORRUPTIONS
from tta_norm.data.natural import natural_shift
from tta_norm.methods import methods as method_names
from tta_norm.methods.entries import check_paper_lr, method_label
from tta_norm.norm.spec import spec_fields
from tta_norm.presets import get_preset
from tta_norm.presets import presets as preset_names
from tta_norm.streams.plan import ORDERS, StreamSpec


@dataclass(frozen=True)
class MethodEntry:
    """One row of the results tables: a preset, an optional gradient method and keyword arguments."""

    preset: str
    method: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = method_label(self.preset, self.method, dict(self.kwargs))
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{base}({extra})" if extra else base

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "method": self.method, "kwargs": dict(self.kwargs), "name": self.label}


class GridConfig:
    """What every grid config dataclass shares: construction from a mapping (unknown keys refused, then
    validated), its dict form and its method entries."""

    methods: list[Any]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> Any:
        reject_unknown_keys(cls, data, source)
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def method_entries(self) -> list[MethodEntry]:
        return [parse_method(m, f"methods[{i}]") for i, m in enumerate(self.methods)]

    def validate(self) -> None:
        raise NotImplementedError


@dataclass
class BenchConfig(GridConfig):
    """All settings of one benchmark run (see the shipped configs in ``tta_norm/configs``)."""

    LIST_KEYS = ("settings", "orders", "deltas")  # list keys besides the ones every grid config has

    name: str = "bench"
    dataset: str = "cifar10"
    model: str = "resnet20"
    checkpoint: str | None = None
    weights: str | None = None
    random_init: bool = False
    data_dir: str | None = None
    source: str = "auto"
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: [5])
    n_examples: int | None = None
    imagenet_ids: str | None = None
    methods: list[Any] = field(default_factory=lambda: ["source", "tbn", "tbn+tent"])
    settings: list[str] = field(default_factory=lambda: ["reset_each_shift"])
    orders: list[str] = field(default_factory=lambda: ["iid"])
    deltas: list[float] = field(default_factory=lambda: [0.1])
    batch_sizes: list[int] = field(default_factory=lambda: [200])
    seeds: list[int] = field(default_factory=lambda: [0])
    clean_interleaved: bool = False
    data_seed: int = 0
    device: str = "auto"
    output: str = "runs/bench"
    plots: bool = True
    on_bad_batch: str = "skip"
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    trackers: list[str] = field(default_factory=list)

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and ranges of every key (one-line :class:`ConfigError` naming the key path)."""
        validate_common(self)
        for i, s in enumerate(self.settings):
            check_str(f"settings[{i}]", s)
            try:
                StreamSpec(setting=s)
            except ValueError as err:
                raise ConfigError(f"settings[{i}]: {err}") from None
        for i, o in enumerate(self.orders):
            check_str(f"orders[{i}]", o)
            try:
                known = StreamSpec(order=o).order in ORDERS
            except ValueError as err:
                raise ConfigError(f"orders[{i}]: {err}") from None
            if not known:
                raise ConfigError(f"orders[{i}]: unknown order {o!r}")
        self.deltas = [check_number(f"deltas[{i}]", d, positive=True) for i, d in enumerate(self.deltas)]
        self.batch_sizes = check_int_list("batch_sizes", self.batch_sizes, minimum=1)
        if self.n_examples is not None:
            check_int("n_examples", self.n_examples, minimum=1)
        check_bool("clean_interleaved", self.clean_interleaved)
        check_str("on_bad_batch", self.on_bad_batch, ("raise", "skip"))
        check_bool("random_init", self.random_init)
        for key in ("weights", "imagenet_ids"):
            if getattr(self, key) is not None:
                check_str(key, getattr(self, key))
        if self.imagenet_ids is not None and self.dataset != "imagenet":
            raise ConfigError(f"imagenet_ids: selects ImageNet-C images; dataset is {self.dataset!r}")

    # ---- the grid --------------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        out = []
        for entry, setting, order, bs, sev, seed in itertools.product(
            self.method_entries(), self.settings, self.orders, self.batch_sizes, self.severities, self.seeds
        ):
            setting = StreamSpec(setting=setting).setting
            order = StreamSpec(order=order).order
            deltas = self.deltas if order == "dirichlet" else [None]
            for delta in deltas:
                out.append(Cell(entry, setting, order, delta, bs, sev, seed))
        # gradual visits severities 1..5..1 itself: keep one severity per gradual cell
        seen, unique = set(), []
        for c in out:
            entry = json.dumps(dataclasses.asdict(c.entry), sort_keys=True, default=str)  # kwargs may hold dicts
            key = c.key() if c.setting != "gradual" else (entry, c.order, c.delta, c.batch_size, c.seed)
            if key not in seen:
                seen.add(key)
                unique.append(c)
        return unique


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    entry: MethodEntry
    setting: str
    order: str
    delta: float | None
    batch_size: int
    severity: int
    seed: int

    def key(self) -> str:
        payload = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The cell's name in logs and dry runs, distinct for distinct cells of a grid: entry, setting, severity,
        order (with its delta), batch size and seed."""
        order = f"{self.order}(delta={self.delta})" if self.delta is not None else self.order
        severity = "" if self.setting == "gradual" else f" sev{self.severity}"
        return f"{self.entry.label} {self.setting}{severity} {order} b{self.batch_size} s{self.seed}"

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.entry.as_dict(),
            "setting": self.setting,
            "order": self.order,
            "delta": self.delta,
            "batch_size": self.batch_size,
            "severity": self.severity if self.setting != "gradual" else "1-5-1",
            "seed": self.seed,
        }


def validate_common(cfg: Any) -> None:
    """The checks every grid config (bench, attack) shares: lists, names, model, data keys, device, seeds,
    method entries, resources and trackers.  Normalises scalars to lists and ``corruptions: all``."""
    for name in ("corruptions", "severities", "methods", "batch_sizes", "seeds", *getattr(cfg, "LIST_KEYS", ())):
        if hasattr(cfg, name):
            setattr(cfg, name, as_list(name, getattr(cfg, name)))
    check_str("name", cfg.name)
    check_str("dataset", cfg.dataset)
    if natural_shift(cfg.dataset) is None:
        check_str("dataset", cfg.dataset, DATASETS)
    check_str("model", cfg.model)
    if cfg.checkpoint is not None:
        check_str("checkpoint", cfg.checkpoint)
    if cfg.data_dir is not None:
        check_str("data_dir", cfg.data_dir)
    check_str("source", cfg.source, ("auto", "release", "regenerate"))
    check_str("output", cfg.output)
    check_bool("plots", cfg.plots)
    check_device("device", cfg.device)
    check_int("data_seed", cfg.data_seed, minimum=0)
    if cfg.corruptions in (["all"], ["standard"]):
        cfg.corruptions = list(CORRUPTIONS)
    known = set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)
    shift = natural_shift(cfg.dataset)
    if shift is not None:  # a natural-shift set (ImageNet-R/A/Sketch) is one domain named after it
        cfg.dataset = shift.name
        if cfg.corruptions == list(CORRUPTIONS):
            cfg.corruptions = [shift.name]
        if cfg.corruptions != [shift.name]:
            raise ConfigError(f"corruptions: dataset {shift.name} is one domain: corruptions must be [{shift.name}]")
        known = {shift.name}
    for i, c in enumerate(cfg.corruptions):
        if c not in known:
            close = difflib.get_close_matches(str(c), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known_txt = ", ".join(CORRUPTIONS + EXTRA_CORRUPTIONS)
            raise ConfigError(f"corruptions[{i}]: unknown corruption {c!r}{hint}; known: all, {known_txt}")
    if len(set(cfg.corruptions)) != len(cfg.corruptions):
        twice = sorted({c for c in cfg.corruptions if cfg.corruptions.count(c) > 1})
        raise ConfigError(f"corruptions: listed twice: {twice}")
    cfg.severities = check_int_list("severities", cfg.severities, minimum=1, maximum=5)
    cfg.seeds = check_int_list("seeds", cfg.seeds, minimum=0)
    cfg.resources = check_resources("resources", cfg.resources)
    cfg.trackers = check_trackers("trackers", cfg.trackers)
    entries = [parse_method(m, f"methods[{i}]") for i, m in enumerate(cfg.methods)]
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"methods: duplicate rows {dup}; give them distinct 'name's")


def parse_method(item: Any, path: str = "methods") -> MethodEntry:
    """A method entry from its config form (see the module docstring), validated; errors name ``path``."""
    if isinstance(item, str):
        preset, _, method = item.partition("+")
        entry = MethodEntry(preset.strip(), method.strip() or None)
    elif isinstance(item, Mapping):
        unknown = set(item) - {"preset", "method", "kwargs", "name"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; valid: preset, method, kwargs, name")
        if "preset" not in item:
            raise ConfigError(f"{path}: a method entry needs a 'preset'")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{path}.kwargs: must be a mapping, got {kwargs!r}")
        check_str(f"{path}.preset", item["preset"])
        if item.get("method") is not None:
            check_str(f"{path}.method", item["method"])
        check_str(f"{path}.name", item.get("name", ""))
        entry = MethodEntry(item["preset"], item.get("method"), tuple(sorted(kwargs.items())), item.get("name", ""))
    else:
        raise ConfigError(f"{path}: a method entry is a string or a mapping, got {item!r}")
    if entry.preset not in preset_names():
        close = difflib.get_close_matches(entry.preset, preset_names(), n=1)
        raise ConfigError(
            f"{path}: unknown preset {entry.preset!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; presets: {', '.join(preset_names())}"
        )
    if entry.method is not None and entry.method not in method_names():
        close = difflib.get_close_matches(entry.method, method_names(), n=1)
        raise ConfigError(f"{path}: unknown method {entry.method!r}" + (f" (did you mean {close[0]!r}?)" if close
                          else "") + f"; methods: {', '.join(method_names())}")  # fmt: skip
    check_method_kwargs(path, entry.label, entry.method, [k for k, _ in entry.kwargs])
    keys = {k for k, _ in entry.kwargs}
    if keys & {"fisher_samples", "fisher_seed"} and entry.method != "eata":
        raise ConfigError(f"{path}.kwargs ({entry.label}): fisher_samples/fisher_seed are EATA settings")
    if "ttn_fit" in keys and (entry.preset != "ttn" or "init_state" in keys):
        raise ConfigError(f"{path}.kwargs.ttn_fit ({entry.label}): fits the 'ttn' preset, without init_state")
    values = dict(entry.kwargs)
    try:
        check_paper_lr(values)
    except ValueError as err:
        raise ConfigError(f"{path}.kwargs.lr ({entry.label}): {err}") from None
    data_keys = {"fishers", "fisher_images", "fisher_data", "ttn_fit", "fisher_samples", "fisher_seed"}
    typed = {k: v for k, v in values.items() if k not in data_keys and not (k == "lr" and isinstance(v, str))}
    check_entry_types(path, entry.label, entry.method, typed)
    if "ttn_fit" in values:
        check_ttn_fit(f"{path}.kwargs.ttn_fit ({entry.label})", values["ttn_fit"])
    if "fisher_samples" in values and values["fisher_samples"] is not True:
        check_int(f"{path}.kwargs.fisher_samples", values["fisher_samples"], minimum=1)
    if "fisher_seed" in values:
        check_int(f"{path}.kwargs.fisher_seed", values["fisher_seed"], minimum=0)
    try:
        check_ambiguous_kwargs(entry.method, keys)
    except TypeError as err:
        raise ConfigError(f"{path}.kwargs ({entry.label}): {err}") from None
    spec_kwargs = {k: v for k, v in entry.kwargs if k in spec_fields()}
    try:
        get_preset(entry.preset).spec.replace(**spec_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path} ({entry.label}): {err}") from None
    check_entry_builds(path, entry)
    return entry


def check_ttn_fit(path: str, fit: Any) -> None:
    """``ttn_fit``: a mapping of ``n_images``, ``seed``, ``source`` and :class:`~tta_norm.fitting.ttn.TTNConfig`
    fields, each of its type, whose values the config and the fit accept (:class:`TTNConfig`'s own checks)."""
    import typing

    from tta_norm.bench.validate import _fits, _hint_text
    from tta_norm.fitting.ttn import TTNConfig
    from tta_norm.methods.entries import _ttn_source_settings

    if fit is None:
        return
    if not isinstance(fit, Mapping):
        raise ConfigError(f"{path}: must be a mapping of fit settings, got {fit!r}")
    hints = {**typing.get_type_hints(TTNConfig), "n_images": int, "seed": int, "source": str}
    for key, value in fit.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), sorted(hints), n=1)
            raise ConfigError(f"{path}: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; settings: {', '.join(sorted(hints))}")  # fmt: skip
        if not _fits(value, hints[key]):
            raise ConfigError(f"{path}.{key}: expected {_hint_text(hints[key])}, got {value!r}")
    fields = {f.name for f in dataclasses.fields(TTNConfig)}
    try:
        TTNConfig(**{k: v for k, v in fit.items() if k in fields}).check_images(_ttn_source_settings(fit)[0])
    except ValueError as err:
        raise user_error(path, err) from None


def check_entry_builds(path: str, entry: MethodEntry) -> None:
    """The entry's method and wrapper settings are accepted: they are built on a tiny LayerNorm network (learning
    rate, optimiser, steps, reset and window settings... checked by the code that uses them), so
    a bad value is a config error and not a failure of every cell.  Preset fields are checked by the preset's
    spec; data-dependent keys (``init_state``, Fisher sources, :data:`ENTRY_KEYS`) are checked with the real
    model.  Nothing is compiled and no warning is hidden."""
    import torch
    from torch import nn

    import tta_norm
    from tta_norm.methods.base import paper_sgd_lr
    from tta_norm.methods.entries import ENTRY_KEYS

    data = {"init_state", "fishers", "fisher_images", "fisher_data", *ENTRY_KEYS}  # checked with the real model
    kwargs = {k: v for k, v in entry.kwargs if k not in data and k not in spec_fields()}
    if isinstance(kwargs.get("lr"), str):  # lr: paper, resolved per cell
        kwargs["lr"] = paper_sgd_lr(1)
    if not kwargs:
        return
    rng = torch.random.get_rng_state()
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3))  # no BatchNorm: no kernel to load
    torch.random.set_rng_state(rng)  # building the probe leaves the caller's random stream alone
    try:
        tta_norm.adapt(net, "source", entry.method, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise user_error(f"{path}.kwargs ({entry.label})", err) from None


def shipped_configs() -> dict[str, Path]:
    """The bench configs shipped in ``tta_norm/configs`` by name (``attack_*`` files belong to ``tta-norm attack``)."""
    root = resources.files("tta_norm") / "configs"
    return {
        Path(p.name).stem: Path(str(p))
        for p in root.iterdir()
        if p.name.endswith((".yaml", ".yml")) and not p.name.startswith("attack")
    }


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``batch_sizes=[1,16]``, ``n_examples=null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, _, value = text.partition("=")
    try:
        return key.strip(), safe_load_unique(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: not a YAML value ({yaml_problem(err)})") from None


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, seen_nodes: set[int]) -> None:
    """Refuse a mapping of the composed (not yet constructed) document that gives one key twice; merge keys
    (``<<: *base``) may override on purpose, and an aliased node is checked once."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[Any] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node)
                if key in keys:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} is given twice", key_node.start_mark
                    )
                keys.add(key)
            _check_unique_keys(loader, value_node, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(loader, item, seen_nodes)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing a key given twice in one mapping (YAML keeps the last one)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError, path: str | None = None) -> str:
    """``file:line:column: problem`` of a YAML parse error (1-based line and column)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    if path is None:
        return f"column {mark.column + 1}: {problem}" if mark is not None else problem
    return f"{path}:{where}: {problem}" if where else f"{path}: {problem}"


def reject_unknown_keys(cls: type, data: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``data`` that is not a field of the dataclass ``cls``,
    with the closest valid key as a hint."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(sorted(known))}")


def read_config_data(
    path_or_name: str | None,
    overrides: Sequence[str],
    shipped: Mapping[str, Path],
    *,
    kind: str = "config",
    names: Sequence[str] = (),
) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML file or shipped config (also tried under the alternative ``names``) with
    ``key=value`` overrides applied, and a label of where it came from."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path_or_name:
        path = Path(path_or_name)
        if not path.exists():
            for name in (path_or_name, *names):
                if name in shipped:
                    path = shipped[name]
                    break
        if not path.exists():
            raise ConfigError(
                f"config {path_or_name!r} is neither a file nor a shipped {kind} ({', '.join(sorted(shipped))})"
            )
        try:
            loaded = safe_load_unique(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(yaml_problem(err, str(path))) from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: a config must be a YAML mapping")
        data.update(loaded)
        source = str(path)
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
    return data, source


def load_config(path_or_name: str | None, overrides: Sequence[str] = ()) -> BenchConfig:
    """A config from a YAML file path or a shipped config name, with ``key=value`` overrides applied."""
    data, source = read_config_data(path_or_name, overrides, shipped_configs())
    return BenchConfig.from_mapping(data, source)
