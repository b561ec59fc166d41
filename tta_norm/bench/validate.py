"""Checks of grid configs before any work: types, ranges, method keyword arguments, device, model and data.

Every check raises :class:`ConfigError` with a one-line message that starts with the key path of the bad
value (``seeds[1]: expected an integer, got 1.5``) and, where it helps, says how to fix it.  ``bool`` is
never accepted where an integer or a number is expected (YAML reads ``true`` as a bool, and Python would
take it as 1).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: keyword arguments of :func:`tta_norm.adapt` itself that a method entry may set
ADAPT_KWARGS = ("episodic", "reset_every", "window", "init_state")


class ConfigError(ValueError):
    """A grid config that cannot run: unknown key, bad value, unknown preset/method, missing model or data."""


def user_error(what: str, err: Exception) -> ConfigError:
    """``err`` (a loader's or builder's error about the user's files or values) as a one-line config error
    about ``what``: its first line, or its type when it has no message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{what}: {text}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(path: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (not a ``bool``) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}: must be <= {maximum}, got {value}")
    return value


def check_number(path: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a ``float`` (an int or float, not a ``bool``); ``positive`` requires ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r} ({_type_name(value)})")
    if positive and not value > 0:
        raise ConfigError(f"{path}: must be > 0, got {value}")
    return float(value)


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r} ({_type_name(value)})")
    return value


def check_str(path: str, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r} ({_type_name(value)})")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def as_list(path: str, value: Any) -> list[Any]:
    """A scalar becomes a one-element list; an empty list is an error."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {value!r} ({_type_name(value)})")
    if not value:
        raise ConfigError(f"{path}: must not be empty")
    return list(value)


def check_int_list(path: str, values: Iterable[Any], *, minimum: int | None = None, maximum: int | None = None):
    return [check_int(f"{path}[{i}]", v, minimum=minimum, maximum=maximum) for i, v in enumerate(values)]


def check_resources(path: str, value: Any) -> dict[str, float]:
    """``{num_cpus: N, num_gpus: M}`` per cell (used by the Ray executor); defaults 1 CPU, 0 GPUs."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping like {{num_cpus: 1, num_gpus: 0}}, got {value!r}")
    unknown = sorted(set(value) - {"num_cpus", "num_gpus"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid: num_cpus, num_gpus")
    out = {"num_cpus": 1.0, "num_gpus": 0.0}
    for k, v in value.items():
        out[k] = check_number(f"{path}.{k}", v)
        if out[k] < 0:
            raise ConfigError(f"{path}.{k}: must be >= 0, got {v}")
    if out["num_cpus"] == 0 and out["num_gpus"] == 0:
        raise ConfigError(f"{path}: a cell needs num_cpus > 0 or num_gpus > 0")
    return out


TRACKERS = ("tensorboard",)


def check_trackers(path: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        value = [value]
    return [check_str(f"{path}[{i}]", v, TRACKERS) for i, v in enumerate(value)]


def check_device(path: str, name: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``...: parsed by torch and available on this machine."""
    import torch

    check_str(path, name)
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{path}: unknown device {name!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{path}: {name!r} requested but no CUDA device is available; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{path}: {name!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{path}: 'mps' requested but not available; use cpu or auto")
    elif device.type != "cpu":
        raise ConfigError(f"{path}: device type {device.type!r} is not supported; use auto, cpu or cuda")
    return name


def accepted_method_kwargs(method: str) -> tuple[set[str], bool]:
    """The keyword arguments the gradient method ``method`` accepts (following ``**kwargs`` to the base
    classes), and whether it takes arbitrary ones."""
    from tta_norm.methods import get_method_class

    names: set[str] = set()
    for cls in inspect.getmro(get_method_class(method)):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]  # self, model
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, False
    return names, True


def check_method_kwargs(path: str, label: str, method: str | None, kwargs: Iterable[str]) -> None:
    """Every keyword of a method entry is a preset (NormSpec) field, an ``adapt`` option or a parameter of the
    gradient method's constructor."""
    from tta_norm.methods.entries import ENTRY_KEYS
    from tta_norm.norm.spec import spec_fields

    rest = [k for k in kwargs if k not in spec_fields() and k not in ADAPT_KWARGS and k not in ENTRY_KEYS]
    if not rest:
        return
    if method is None:
        raise ConfigError(f"{path} ({label}): {rest} are not preset fields and no gradient method is given")
    accepted, open_ended = accepted_method_kwargs(method)
    if open_ended:
        return
    for k in rest:
        if k not in accepted:
            valid = sorted(accepted | set(ADAPT_KWARGS))
            close = difflib.get_close_matches(k, valid + list(spec_fields()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{path}.kwargs.{k} ({label}): not a parameter of method {method!r}{hint}; "
                f"method parameters: {', '.join(valid)}; or a preset field"
            )


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits the type annotation ``hint`` (bool is not a number; a list is a tuple)."""
    import os
    import types
    import typing
    from collections.abc import Mapping

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str or hint is os.PathLike:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation these checks do not model: the code that uses the value checks it


def _hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace("'>", "")


def entry_type_hints(method: str | None) -> dict[str, Any]:
    """The annotated type of every keyword a method entry may set: :class:`NormSpec` fields, ``adapt``'s own
    options and the gradient method's constructor parameters (first definition along its bases wins)."""
    import typing

    from tta_norm.api import adapt
    from tta_norm.norm.spec import NormSpec

    hints = dict(typing.get_type_hints(NormSpec))
    adapt_hints = typing.get_type_hints(adapt)
    hints.update({k: adapt_hints[k] for k in ADAPT_KWARGS})
    if method is not None:
        from tta_norm.methods import get_method_class

        for cls in reversed(inspect.getmro(get_method_class(method))):
            init = cls.__dict__.get("__init__")
            if init is not None and cls is not object:
                hints.update({k: v for k, v in typing.get_type_hints(init).items() if k not in ("model", "return")})
    return hints


def check_entry_types(path: str, label: str, method: str | None, kwargs: dict[str, Any]) -> None:
    """Every keyword of a method entry has its annotated type (``episodic: "false"`` is a string, not false;
    ``alpha: true`` is not a number)."""
    hints = entry_type_hints(method)
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise ConfigError(
                f"{path}.kwargs.{key} ({label}): expected {_hint_text(hint)}, got {value!r} ({_type_name(value)})"
            )


def check_model(
    name: Any, checkpoint: Any, *, weights: Any = None, random_init: Any = False, num_classes: int | None = None
) -> None:
    """The model and its weights resolve (:func:`tta_norm.models.resolve_model_source`: no download, ever) and
    the model builds on the CPU with them (which also checks that a checkpoint matches the architecture).
    ``checkpoint: finetuned`` weights are trained on first use: only the name is checked.  ``num_classes`` as
    for :func:`~tta_norm.models.load_model`."""
    from tta_norm.models import load_model, resolve_model_source

    check_str("model", name)
    check_bool("random_init", random_init)
    if weights is not None:
        check_str("weights", weights)
    if checkpoint is not None:
        check_str("checkpoint", checkpoint)
        is_dir_like = name.startswith("rb:")  # robustbench: checkpoint is the model directory
        if checkpoint != "finetuned" and not is_dir_like and not Path(checkpoint).is_file():
            raise ConfigError(f"checkpoint: no such file {checkpoint!r} (a path, null or 'finetuned')")
    finetuned = checkpoint == "finetuned"
    try:
        resolve_model_source(name, None if finetuned else checkpoint, weights=weights,
                             random_init=random_init or finetuned, num_classes=num_classes)  # fmt: skip
        if not finetuned:
            load_model(name, checkpoint, weights=weights, random_init=random_init, device="cpu",
                       num_classes=num_classes)  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as err:
        raise ConfigError(f"model: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def check_model_outputs(model: Any, bench: Any, dataset: str, device: Any) -> None:
    """``model`` gives one logit per class of ``dataset`` (:func:`~tta_norm.data.benchmark.dataset_classes`),
    checked with one eval-mode forward of a benchmark image before any cell runs, every module's mode restored.
    A model of another dataset (10 logits on CIFAR-100, 100 on CIFAR-10, 21k inside ImageNet-R's 200-class
    subset) is a config error here, not a grid of failed or silently mis-scored cells."""
    import torch

    from tta_norm.data.benchmark import dataset_classes
    from tta_norm.data.tensors import to_float_nchw
    from tta_norm.models.wrappers import LogitSubset

    data = next((d for d in bench.domains.values() if len(d)), None)
    if data is None:
        return
    x = to_float_nchw(torch.tensor(data.images[:1]).to(device))  # a copy: the images may be a read-only mmap
    inner = model.model if isinstance(model, LogitSubset) else model
    modes = [(m, m.training) for m in inner.modules()]
    try:
        inner.eval()
        with torch.no_grad():
            out = inner(x)
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model: gives {shape} for a batch of 1 image, expected (1, classes) logits")
    width, want = out.shape[1], 1000 if isinstance(model, LogitSubset) else dataset_classes(dataset)
    if width != want:
        raise ConfigError(f"model: gives {width} logits per image, dataset {dataset} needs {want} "
                          "(a model or checkpoint of another dataset?)")  # fmt: skip


def check_data_available(
    dataset: str,
    data_dir: str | None,
    source: str,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (5,),
    imagenet_ids: str | None = None,
) -> None:
    """The benchmark of ``dataset`` can be read (a release directory, a natural-shift folder, robustbench's
    ImageNet list) or regenerated (a clean test set and the generator), checked without reading any image
    (:func:`tta_norm.data.resolve_benchmark_source`)."""
    from tta_norm.data.benchmark import CORRUPTIONS, resolve_benchmark_source

    check_str("dataset", dataset)
    if data_dir is not None:
        check_str("data_dir", data_dir)
        if not Path(data_dir).is_dir():
            raise ConfigError(f"data_dir: no such directory {data_dir!r}")
    try:
        resolve_benchmark_source(dataset, list(corruptions or CORRUPTIONS), list(severities), data_dir=data_dir,
                                 source=source, imagenet_ids=imagenet_ids)  # fmt: skip
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise ConfigError(f"data: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
