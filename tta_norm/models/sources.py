"""Where a model and its weights come from, resolved without building the model.

:func:`resolve_model_source` turns a model name plus the ``checkpoint`` / ``weights`` / ``random_init``
options into a :class:`ModelSource`: the kind of model, the builder name, and the exact file its weights are
read from.  It reads no weights and builds no network, so a benchmark can check its whole config before any
work starts; every user mistake is one line (``ValueError``, ``FileNotFoundError`` or ``ImportError``).
:func:`tta_norm.models.load_model` builds exactly what it resolves.

Kinds of model names:

- ``resnet20`` / ``resnet32`` / ``resnet44`` / ``resnet56`` / ``resnet110`` (also ``cifar_resnet<depth>``):
  CIFAR ResNets; weights from ``checkpoint`` (or ``weights: <file>``), else the released
  ``resnet<depth>-<hash>.th`` in :func:`tta_norm.data.paths.model_search_dirs`.
- ``timm:<name>`` (``<name>`` may carry a pretrained tag, ``timm:resnet50.a1_in1k``): a timm model whose
  pretrained weights (``weights`` unset or ``DEFAULT``) are read from the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), or for weights published as a
  URL only, from the torch hub cache.
  Nothing is ever downloaded.  ``weights: <file>`` loads a local file instead.  The model's
  ``pretrained_cfg`` mean/std becomes the input normalisation.
- ``tv:<name>`` or a plain torchvision name (``resnet50``): ``weights`` is a torchvision weights name
  (``DEFAULT``, ``IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V2``) whose file must be in the torch hub
  cache (``<torch hub dir>/checkpoints``), or a file path; ``checkpoint`` is a file path too.
- ``rb:<name>``, ``rb:<dataset>/<name>``, ``rb:<dataset>/<threat_model>/<name>``: a robustbench zoo model
  (dataset default from ``num_classes``: 10 -> cifar10, 100 -> cifar100, 1000 -> imagenet; threat model
  default ``corruptions``).  Its checkpoint must already be in robustbench's cache layout
  ``<model_dir>/<dataset>/<threat_model>/<name>.pt``; ``model_dir`` is ``checkpoint`` if given, else
  ``<cache>/robustbench`` and robustbench's own default ``./models``.  Building the network needs the
  optional robustbench package (imported only then).

A model without weights refuses to load unless ``random_init=True``: no kind falls back to random weights.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tta_norm.data.paths import cache_root, model_search_dirs
from tta_norm.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
_CIFAR_RE = re.compile(r"^(?:cifar_?)?resnet(\d+)$")
RB_DATASETS = ("cifar10", "cifar100", "imagenet")
RB_THREAT_MODELS = ("corruptions", "corruptions_3d", "Linf", "L2")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``kind`` (``cifar``, ``torchvision``, ``timm`` or ``robustbench``), the builder
    ``name``, the weights that will be loaded (``weights``: a label such as ``"IMAGENET1K_V1"`` or a file;
    ``None`` means random initialisation, only with ``random_init``), the ``file`` they are read from, the
    input normalisation (``mean``/``std``; ``None`` when the model normalises itself) and kind-specific
    ``options`` (torchvision weights enum name, robustbench dataset and threat model, timm input size)."""

    kind: str
    name: str
    weights: str | None
    file: Path | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs and ``--dry-run``: kind, name and where the weights come from."""
        what = "random init" if self.weights is None else self.weights
        where = f" ({self.file})" if self.file is not None and str(self.file) != self.weights else ""
        return f"{self.kind} {self.name}: {what}{where}"


def resolve_model_source(
    name: str,
    checkpoint: PathLike | None = None,
    *,
    weights: str | PathLike | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
) -> ModelSource:
    """The :class:`ModelSource` of model ``name`` (see the module docstring), checked without building it.

    ``checkpoint`` and ``weights`` are alternatives (give one); ``random_init=True`` allows a model with
    neither.  Raises a one-line ``ValueError`` (bad name or option), ``FileNotFoundError`` (weights not on
    this machine) or ``ImportError`` (optional package missing)."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"model name must be a non-empty string, got {name!r}")
    if not isinstance(random_init, bool):
        raise TypeError(f"random_init must be true or false, got {random_init!r}")
    if checkpoint is not None and weights is not None:
        raise ValueError(f"model {name}: give either checkpoint or weights, not both")
    if random_init and (checkpoint is not None or weights is not None):
        raise ValueError(f"model {name}: random_init=True contradicts the given checkpoint/weights")
    key = name.strip()
    m = _CIFAR_RE.match(key.lower())
    depth = int(m.group(1)) if m and int(m.group(1)) in CIFAR_DEPTHS and not key.startswith("tv:") else None
    if weights == "DEFAULT" and (key.startswith("timm:") or depth is not None):
        weights = None  # timm's default pretrained tag / the released CIFAR checkpoint: what no weights means
    if key.startswith("rb:"):
        if weights is not None:
            raise ValueError(f"model {key}: robustbench models take no weights; checkpoint is the model_dir")
        return _resolve_robustbench(key[3:], checkpoint, num_classes)
    if key.startswith("timm:"):
        return _resolve_timm(key[5:], weights if weights is not None else checkpoint, random_init, num_classes)
    if depth is not None:
        return _resolve_cifar(depth, weights if weights is not None else checkpoint, random_init,
                              num_classes)  # fmt: skip
    return _resolve_torchvision(key[3:] if key.startswith("tv:") else key, checkpoint, weights, random_init,
                                num_classes)  # fmt: skip


def _existing_file(path: PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


# ------------------------------------------------------------------------------------------------ CIFAR ResNets


def find_release_checkpoint(depth: int) -> Path | None:
    """The released ``resnet<depth>-*.th`` in the model search list, if any."""
    for d in model_search_dirs():
        if d.is_dir():
            hits = sorted(d.glob(f"resnet{depth}-*.th"))
            if hits:
                return hits[0]
    return None


def _resolve_cifar(depth: int, file: PathLike | None, random_init: bool, num_classes: int | None) -> ModelSource:
    name = f"resnet{depth}"
    if random_init:
        return ModelSource("cifar", name, None, None, num_classes=num_classes)
    if file is None:
        found = find_release_checkpoint(depth)
        if found is None:
            where = ", ".join(str(d) for d in model_search_dirs())
            raise FileNotFoundError(
                f"no checkpoint for {name}: pass a path (checkpoint=...), or put {name}-<hash>.th in one of: "
                f"{where} (set TTA_NORM_MODELS to add a directory); random_init=True runs it untrained"
            )
        file = found
    path = _existing_file(file, f"checkpoint for {name}")
    return ModelSource("cifar", name, str(path), path, num_classes=num_classes)


# ------------------------------------------------------------------------------------------------- torchvision


def torch_hub_checkpoint_dir() -> Path:
    """``<torch hub dir>/checkpoints``: where torchvision (and timm for URL weights) cache downloads."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _resolve_torchvision(
    name: str, checkpoint: PathLike | None, weights: str | PathLike | None, random_init: bool,
    num_classes: int | None,
) -> ModelSource:  # fmt: skip
    import torchvision

    if name not in set(torchvision.models.list_models()):
        raise ValueError(
            f"unknown model {name!r}: not a CIFAR ResNet ({', '.join(f'resnet{d}' for d in CIFAR_DEPTHS)}), "
            "not a torchvision model (torchvision.models.list_models()), not timm:<name> and not rb:<name>"
        )
    if random_init:
        return ModelSource("torchvision", name, None, None, IMAGENET_MEAN, IMAGENET_STD, num_classes)
    if checkpoint is None and weights is None:
        raise ValueError(
            f"torchvision model {name} has no weights: set weights (DEFAULT, IMAGENET1K_V1, ... or a file) "
            "or checkpoint, or random_init=True to run it with random weights"
        )
    if checkpoint is not None or _looks_like_path(weights):
        path = _existing_file(checkpoint if checkpoint is not None else weights, f"weights file for {name}")
        return ModelSource("torchvision", name, str(path), path, IMAGENET_MEAN, IMAGENET_STD, num_classes)
    enum = _torchvision_weights_enum(name, str(weights))
    categories = len(enum.meta.get("categories") or ())
    if num_classes is not None and categories and num_classes != categories:
        raise ValueError(
            f"torchvision weights {enum} have {categories} classes but num_classes={num_classes}; "
            "fine-tuned heads load from a file (checkpoint or weights: <file>)"
        )
    cached = torch_hub_checkpoint_dir() / os.path.basename(enum.url)
    if not cached.is_file():
        raise FileNotFoundError(
            f"torchvision weights {enum} are not in the torch hub cache ({cached}) and are never downloaded "
            "here: copy the file there, or pass weights: <file>"
        )
    mean, std = _torchvision_mean_std(enum)
    label = f"{type(enum).__name__}.{enum.name}"
    return ModelSource("torchvision", name, label, cached, mean, std, categories or num_classes,
                       {"weights_enum": label})  # fmt: skip


def _looks_like_path(value: object) -> bool:
    if isinstance(value, os.PathLike):
        return True
    text = str(value)
    return "/" in text or os.sep in text or text.endswith((".pt", ".pth", ".th", ".bin", ".tar", ".safetensors"))


def _torchvision_weights_enum(name: str, text: str):
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        msg = f"torchvision publishes no weights for {name}: pass weights: <file> or random_init=True"
        raise ValueError(msg) from None
    member = text.split(".", 1)[1] if "." in text else text
    if "." in text and text.split(".", 1)[0] != enum_cls.__name__:
        raise ValueError(f"weights {text!r} are not for {name} (its weights enum is {enum_cls.__name__})")
    try:
        return enum_cls[member]
    except KeyError:
        names = ", ".join(["DEFAULT", *enum_cls.__members__])
        raise ValueError(f"unknown weights {text!r} for {name}; choose from {names} or give a file") from None


def _torchvision_mean_std(enum) -> tuple[tuple[float, ...], tuple[float, ...]]:
    transforms = enum.transforms
    keywords = getattr(transforms, "keywords", {}) or {}  # functools.partial(ImageClassification, ...)
    mean = tuple(keywords.get("mean", IMAGENET_MEAN))
    std = tuple(keywords.get("std", IMAGENET_STD))
    return mean, std


# ------------------------------------------------------------------------------------------------------- timm


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time: ``$HF_HUB_CACHE``, else
    ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_hf_cached_file(repo_id: str, filenames: tuple[str, ...] = HF_WEIGHT_FILES) -> Path | None:
    """The first of ``filenames`` of model repo ``repo_id`` (``org/name``, optionally ``@revision``) in the
    local Hugging Face cache (``models--<org>--<name>/snapshots/<revision>/<file>``, the revision read from
    ``refs/<ref>`` when it is a branch name; without a ``refs/main``, e.g. a copied snapshot folder, the most
    recent snapshot holding the file).  Never touches the network."""
    repo, _, revision = repo_id.partition("@")
    base = hf_hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = base / "refs" / (revision or "main")
    if ref.is_file():
        snapshots = [base / "snapshots" / ref.read_text().strip()]
    elif revision:
        snapshots = [base / "snapshots" / revision]
    else:
        found = [d for d in (base / "snapshots").glob("*") if d.is_dir()] if (base / "snapshots").is_dir() else []
        snapshots = sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)
    for fname in filenames:
        for snap in snapshots:
            if (snap / fname).is_file():
                return snap / fname
    return None


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm models need the optional timm package: pip install 'tta-norm[timm]' ({err})") from err
    return timm


def _resolve_timm(
    name: str, file: PathLike | None, random_init: bool, num_classes: int | None
) -> ModelSource:
    timm = _import_timm()
    if not name or not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # unknown pretrained tag
        raise ValueError(f"timm model {name!r}: {err}") from None
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    mean = tuple(cfg_dict.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg_dict.get("std") or IMAGENET_STD)
    options = {"input_size": tuple(cfg_dict.get("input_size") or ()), "pretrained_tag": cfg_dict.get("tag")}
    if random_init:
        return ModelSource("timm", name, None, None, mean, std, num_classes, options)
    if file is not None:
        path = _existing_file(file, f"weights file for timm:{name}")
        return ModelSource("timm", name, str(path), path, mean, std, num_classes, options)
    if cfg is None or not (cfg_dict.get("hf_hub_id") or cfg_dict.get("url")):
        raise ValueError(f"timm model {name} has no pretrained weights: pass weights: <file> or random_init=True")
    head = cfg_dict.get("num_classes")
    if num_classes is not None and head and num_classes != head:
        raise ValueError(
            f"pretrained timm:{name} has {head} classes but num_classes={num_classes}; "
            "fine-tuned heads load from a file (weights: <file>)"
        )
    looked = []
    path = None
    hub_id = cfg_dict.get("hf_hub_id")
    if hub_id:
        wanted = (cfg_dict["hf_hub_filename"],) if cfg_dict.get("hf_hub_filename") else HF_WEIGHT_FILES
        path = find_hf_cached_file(hub_id, wanted)
        looked.append(f"{hf_hub_cache_dir()}/models--{hub_id.split('@')[0].replace('/', '--')}")
    if path is None and cfg_dict.get("url"):
        cand = torch_hub_checkpoint_dir() / os.path.basename(cfg_dict["url"].split("?")[0])
        path = cand if cand.is_file() else None
        looked.append(str(cand))
    if path is None:
        raise FileNotFoundError(
            f"pretrained weights of timm:{name} are not in the local cache (looked in {' and '.join(looked)}) "
            "and are never downloaded here: copy them there (HF_HUB_CACHE/HF_HOME move it) or pass weights: <file>"
        )
    label = f"{hub_id or cfg_dict.get('url')}"
    return ModelSource("timm", name, label, path, mean, std, head or num_classes, options)


# ------------------------------------------------------------------------------------------------- robustbench


def robustbench_model_dirs(model_dir: PathLike | None = None) -> list[Path]:
    """Directories searched for robustbench checkpoints: ``model_dir`` alone if given, else
    ``<cache>/robustbench`` and robustbench's default ``./models``."""
    if model_dir is not None:
        return [Path(model_dir).expanduser()]
    return [cache_root() / "robustbench", Path.cwd() / "models"]


def parse_robustbench_name(spec: str, num_classes: int | None = None) -> tuple[str, str, str]:
    """``(dataset, threat_model, name)`` of ``[dataset/][threat_model/]name`` (see the module docstring)."""
    parts = spec.split("/")
    default_ds = {100: "cifar100", 1000: "imagenet"}.get(num_classes or 10, "cifar10")
    if len(parts) == 1:
        dataset, threat, name = default_ds, "corruptions", parts[0]
    elif len(parts) == 2:
        dataset, threat, name = parts[0], "corruptions", parts[1]
    elif len(parts) == 3:
        dataset, threat, name = parts
    else:
        raise ValueError(f"robustbench model must be rb:[dataset/][threat_model/]name, got rb:{spec}")
    if not name:
        raise ValueError(f"robustbench model rb:{spec} has an empty name")
    if dataset not in RB_DATASETS:
        raise ValueError(f"robustbench dataset {dataset!r} in rb:{spec}; choose from {', '.join(RB_DATASETS)}")
    if threat not in RB_THREAT_MODELS:
        raise ValueError(f"robustbench threat model {threat!r} in rb:{spec}; choose from {', '.join(RB_THREAT_MODELS)}")
    return dataset, threat, name


def find_robustbench_checkpoint(
    dataset: str, threat_model: str, name: str, model_dir: PathLike | None = None
) -> tuple[Path | None, list[Path]]:
    """The first ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` that exists (robustbench's cache layout;
    its ``corruptions_3d`` models live under ``corruptions``) and the candidates looked at."""
    folder = threat_model.replace("_3d", "")
    candidates = [d / dataset / folder / f"{name}.pt" for d in robustbench_model_dirs(model_dir)]
    for cand in candidates:
        if cand.is_file():
            return cand, candidates
    return None, candidates


def _resolve_robustbench(spec: str, model_dir: PathLike | None, num_classes: int | None) -> ModelSource:
    dataset, threat, name = parse_robustbench_name(spec, num_classes)
    path, candidates = find_robustbench_checkpoint(dataset, threat, name, model_dir)
    if path is None:
        raise FileNotFoundError(
            f"robustbench checkpoint rb:{dataset}/{threat}/{name} not found (looked for "
            f"{', '.join(str(c) for c in candidates)}) and not downloaded here: copy {name}.pt there"
        )
    return ModelSource("robustbench", name, str(path), path, None, None, num_classes,
                       {"dataset": dataset, "threat_model": threat, "model_dir": str(path.parents[2])})  # fmt: skip


def robustbench_available() -> bool:
    """Whether the robustbench package is installed (found, not imported)."""
    return importlib.util.find_spec("robustbench") is not None
