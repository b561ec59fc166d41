"""``load_model``: CIFAR ResNets, torchvision models and (optionally) the robustbench zoo, all taking [0, 1]
inputs.

Name conventions:

- ``resnet20`` / ``resnet32`` / ``resnet44`` / ``resnet56`` (also ``resnet110``,
  ``cifar_resnet<depth>``): the CIFAR ResNets of :mod:`tta_norm.models.cifar_resnet`. With
  ``checkpoint=None`` the released ``resnet<depth>-<hash>.th`` is looked up in
  :func:`tta_norm.data.paths.model_search_dirs` (e.g. ``../shared/models`` beside a checkout);
  ResNet-56/110 have no shared checkpoint and need an explicit path.
- ``tv:<name>`` or a plain torchvision model name (``resnet50``, ``wide_resnet50_2``, ...): torchvision
  builder, wrapped so that it normalizes [0, 1] inputs with the ImageNet mean/std. Pretrained weights
  only when asked for (``pretrained=True``) and present in the torch hub cache (these machines are
  offline); otherwise random initialization with a warning.
- ``rb:<name>``, ``rb:<dataset>/<name>`` or ``rb:<dataset>/<threat_model>/<name>``: a robustbench zoo
  model (default dataset from ``num_classes`` -- 10 -> cifar10, 100 -> cifar100, 1000 -> imagenet -- and
  threat model ``corruptions``). robustbench is optional and imported only here.

Checkpoint files may be a raw state dict, or a dict with ``state_dict`` / ``model`` (the akamaster format
is ``{'best_prec1', 'state_dict'}``); ``module.`` prefixes (``nn.DataParallel``) are stripped. Loading is
strict except that missing ``num_batches_tracked`` buffers (absent in old checkpoints) are allowed.

Returned models are in ``eval()`` mode and on ``device`` (unchanged if ``None``)."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tta_norm.data.paths import model_search_dirs
from tta_norm.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD, InputNormalization, cifar_resnet

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
_CIFAR_RE = re.compile(r"^(?:cifar_?)?resnet(\d+)$")


class NormalizedModel(nn.Module):
    """Wraps a model that expects normalized inputs so that it takes [0, 1] images."""

    def __init__(self, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (see the module docstring), with ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"could not read checkpoint {path} with torch.load(weights_only=True): {err}. "
            "Only tensor state dicts (optionally inside a dict with plain metadata) are accepted."
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"checkpoint {path} does not contain a state dict of tensors")
    return _strip_prefix(dict(obj), "module.")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict ``load_state_dict`` that tolerates missing ``num_batches_tracked`` buffers only."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{source} does not match the model: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
        )


def find_release_checkpoint(depth: int) -> Path | None:
    """The released ``resnet<depth>-*.th`` in the model search list, if any."""
    for d in model_search_dirs():
        if d.is_dir():
            hits = sorted(d.glob(f"resnet{depth}-*.th"))
            if hits:
                return hits[0]
    return None


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build model ``name`` (see the module docstring), load ``checkpoint`` if given, return it in eval mode.

    ``pretrained`` only affects torchvision models. For CIFAR ResNets ``num_classes`` defaults to the
    checkpoint's head size (10 without a checkpoint)."""
    key = name.strip()
    if key.startswith("rb:"):
        model = _load_robustbench(key[3:], checkpoint, num_classes)
    else:
        m = _CIFAR_RE.match(key.lower())
        if m and int(m.group(1)) in CIFAR_DEPTHS and not key.startswith("tv:"):
            model = _load_cifar(int(m.group(1)), checkpoint, num_classes)
        else:
            model = _load_torchvision(
                key[3:] if key.startswith("tv:") else key, checkpoint, num_classes, pretrained
            )
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _load_cifar(depth: int, checkpoint, num_classes: int | None) -> nn.Module:
    if checkpoint is None:
        checkpoint = find_release_checkpoint(depth)
        if checkpoint is None:
            where = ", ".join(str(d) for d in model_search_dirs())
            raise FileNotFoundError(
                f"no checkpoint for resnet{depth}: pass a path (checkpoint=...), or put "
                f"resnet{depth}-<hash>.th in one of: {where} (set TTA_NORM_MODELS to add a directory). "
                "The shared release has ResNet-20/32/44 only."
            )
    state = read_checkpoint(checkpoint)
    head = state.get("linear.weight")
    ckpt_classes = int(head.shape[0]) if head is not None else None
    if num_classes is None:
        num_classes = ckpt_classes or 10
    model = cifar_resnet(depth, num_classes=num_classes)
    load_state(model, state, f"checkpoint {checkpoint}")
    return model


def _load_torchvision(name: str, checkpoint, num_classes: int | None, pretrained: bool) -> nn.Module:
    import torchvision

    available = set(torchvision.models.list_models())
    if name not in available:
        raise ValueError(
            f"unknown model {name!r}: not a CIFAR ResNet ({', '.join(f'resnet{d}' for d in CIFAR_DEPTHS)}), "
            "not a torchvision model (see torchvision.models.list_models()), "
            "and not a robustbench model (prefix 'rb:')"
        )
    weights = None
    if pretrained and checkpoint is None:
        weights = _offline_torchvision_weights(name)
        if weights is not None and num_classes is not None and num_classes != len(weights.meta["categories"]):
            raise ValueError(
                f"pretrained {name} has {len(weights.meta['categories'])} classes, num_classes={num_classes}"
            )
    kwargs = {} if num_classes is None or weights is not None else {"num_classes": num_classes}
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    if checkpoint is not None:
        state = _strip_prefix(read_checkpoint(checkpoint), "model.")
        load_state(model, state, f"checkpoint {checkpoint}")
    return NormalizedModel(model)


def _offline_torchvision_weights(name: str):
    """The default weights enum of ``name`` if its file is already in the torch hub cache, else ``None``."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # model without published weights
        warnings.warn(
            f"torchvision has no pretrained weights for {name}; using random initialization", stacklevel=3
        )
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        warnings.warn(
            f"pretrained weights for {name} are not in the torch hub cache ({cached}) and will not be "
            "downloaded here: using RANDOM initialization. Download them once with torchvision on a machine "
            "with internet access (or copy the file there) to use them.",
            stacklevel=3,
        )
        return None
    return weights


def _alias_pyautoattack() -> None:
    """robustbench imports ``autoattack``; PyPI only ships ``pyautoattack`` (REFERENCE part 3, section 6)."""
    try:
        import autoattack  # noqa: F401

        return
    except ImportError:
        pass
    try:
        import pyautoattack
    except ImportError:
        return
    sys.modules.setdefault("autoattack", pyautoattack)
    state = getattr(pyautoattack, "state", None)
    if state is not None:
        sys.modules.setdefault("autoattack.state", state)


def _load_robustbench(spec: str, checkpoint, num_classes: int | None) -> nn.Module:
    parts = spec.split("/")
    default_ds = {100: "cifar100", 1000: "imagenet"}.get(num_classes or 10, "cifar10")
    if len(parts) == 1:
        dataset, threat, model_name = default_ds, "corruptions", parts[0]
    elif len(parts) == 2:
        dataset, threat, model_name = parts[0], "corruptions", parts[1]
    elif len(parts) == 3:
        dataset, threat, model_name = parts
    else:
        raise ValueError(f"robustbench model spec must be rb:[dataset/][threat_model/]name, got rb:{spec}")
    _alias_pyautoattack()
    try:
        from robustbench.utils import load_model as rb_load_model
    except ImportError as err:
        raise ImportError(
            f"robustbench model rb:{spec} requested but robustbench cannot be imported ({err}). Install "
            "the optional extra (pip install 'tta-norm[robustbench]'); note that robustbench 1.1.x from PyPI "
            "needs the GitHub 'autoattack' package or 'pyautoattack' (aliased automatically)."
        ) from err
    from tta_norm.data.paths import cache_root

    model_dir = Path(checkpoint) if checkpoint is not None else cache_root() / "robustbench"
    try:
        model = rb_load_model(
            model_name=model_name, dataset=dataset, threat_model=threat, model_dir=str(model_dir)
        )
    except Exception as err:
        raise RuntimeError(
            f"robustbench could not load {model_name} ({dataset}, {threat}) from {model_dir}: {err}. "
            "Offline machines need the checkpoint already in that directory "
            f"({model_dir}/{dataset}/{threat}/{model_name}.pt)."
        ) from err
    return model
