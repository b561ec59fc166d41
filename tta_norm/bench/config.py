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

from tta_norm.data.benchmark import CORRUPTIONS, EXTRA_CORRUPTIONS
from tta_norm.data.natural import natural_shift
from tta_norm.methods import methods as method_names
from tta_norm.methods.entries import method_label
from tta_norm.norm.spec import spec_fields
from tta_norm.presets import get_preset
from tta_norm.presets import presets as preset_names
from tta_norm.streams.plan import ORDERS, StreamSpec


class ConfigError(ValueError):
    """A benchmark config that cannot run: unknown key, bad value, unknown preset/method."""


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


@dataclass
class BenchConfig:
    """All settings of one benchmark run (see the shipped configs in ``tta_norm/configs``)."""

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

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> BenchConfig:
        reject_unknown_keys(cls, data, source)
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation ------------------------------------------------------------------------------------
    def method_entries(self) -> list[MethodEntry]:
        return [parse_method(m) for m in self.methods]

    def validate(self) -> None:
        def listish(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                setattr(self, name, [value])
            if not getattr(self, name):
                raise ConfigError(f"{name} must not be empty")

        for name in ("corruptions", "severities", "methods", "settings", "orders", "deltas", "batch_sizes", "seeds"):
            listish(name)
        if self.corruptions in (["all"], ["standard"]):
            self.corruptions = list(CORRUPTIONS)
        shift = natural_shift(self.dataset)
        if shift is not None:  # a natural-shift set is a single domain named after it
            self.dataset = shift.name
            if self.corruptions == list(CORRUPTIONS):
                self.corruptions = [shift.name]
            if self.corruptions != [shift.name]:
                raise ConfigError(f"dataset {shift.name} is one domain: corruptions must be [{shift.name}]")
        known = set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS) | ({shift.name} if shift is not None else set())
        bad = [c for c in self.corruptions if c not in known]
        if bad:
            raise ConfigError(f"unknown corruption(s) {bad}; known: {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
        for s in self.severities:
            if not isinstance(s, int) or not 1 <= s <= 5:
                raise ConfigError(f"severities must be integers in 1..5, got {s!r}")
        for b in self.batch_sizes:
            if not isinstance(b, int) or b < 1:
                raise ConfigError(f"batch_sizes must be positive integers, got {b!r}")
        for s in self.settings:
            StreamSpec(setting=s)  # raises with the valid names
        for o in self.orders:
            if StreamSpec(order=o).order not in ORDERS:
                raise ConfigError(f"unknown order {o!r}")
        if self.n_examples is not None and (not isinstance(self.n_examples, int) or self.n_examples < 1):
            raise ConfigError(f"n_examples must be a positive integer or null, got {self.n_examples!r}")
        if self.source not in ("auto", "release", "regenerate"):
            raise ConfigError(f"source must be auto, release or regenerate, got {self.source!r}")
        if not isinstance(self.random_init, bool):
            raise ConfigError(f"random_init must be true or false, got {self.random_init!r}")
        for key in ("weights", "imagenet_ids"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string or null, got {getattr(self, key)!r}")
        if self.imagenet_ids is not None and self.dataset != "imagenet":
            raise ConfigError(f"imagenet_ids selects ImageNet-C images; dataset is {self.dataset!r}")
        if self.on_bad_batch not in ("raise", "skip"):
            raise ConfigError(f"on_bad_batch must be raise or skip, got {self.on_bad_batch!r}")
        entries = self.method_entries()
        labels = [e.label for e in entries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"duplicate method rows {dup}; give them distinct 'name's")

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
            key = c.key() if c.setting != "gradual" else (c.entry, c.order, c.delta, c.batch_size, c.seed)
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


def parse_method(item: Any) -> MethodEntry:
    """A method entry from its config form (see the module docstring), validated."""
    if isinstance(item, str):
        preset, _, method = item.partition("+")
        entry = MethodEntry(preset.strip(), method.strip() or None)
    elif isinstance(item, Mapping):
        unknown = set(item) - {"preset", "method", "kwargs", "name"}
        if unknown:
            raise ConfigError(f"method entry {dict(item)}: unknown key(s) {sorted(unknown)}")
        if "preset" not in item:
            raise ConfigError(f"method entry {dict(item)} needs a 'preset'")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"method entry {dict(item)}: kwargs must be a mapping")
        entry = MethodEntry(item["preset"], item.get("method"), tuple(sorted(kwargs.items())), item.get("name", ""))
    else:
        raise ConfigError(f"a method entry is a string or a mapping, got {item!r}")
    if entry.preset not in preset_names():
        close = difflib.get_close_matches(entry.preset, preset_names(), n=1)
        raise ConfigError(
            f"unknown preset {entry.preset!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; presets: {', '.join(preset_names())}"
        )
    if entry.method is not None and entry.method not in method_names():
        raise ConfigError(f"unknown method {entry.method!r}; methods: {', '.join(method_names())}")
    extra = [k for k, _ in entry.kwargs if k not in spec_fields() and k not in ("init_state", "ttn_fit")]
    if extra and entry.method is None:
        raise ConfigError(f"method entry {entry.label}: {extra} are not preset fields and no method is given")
    spec_kwargs = {k: v for k, v in entry.kwargs if k in spec_fields()}
    try:
        get_preset(entry.preset).spec.replace(**spec_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method entry {entry.label}: {err}") from err
    return entry


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
    return key.strip(), yaml.safe_load(value)


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
        loaded = yaml.safe_load(path.read_text()) or {}
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
