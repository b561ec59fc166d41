"""``load_model``: build the model :func:`tta_norm.models.sources.resolve_model_source` resolves (CIFAR
ResNets, torchvision, timm and robustbench models, see there for the names), load its weights and return it
taking [0, 1] NCHW inputs, in ``eval()`` mode, on ``device`` (unchanged if ``None``).

Checkpoint files may be a raw state dict, or a dict with ``state_dict`` / ``model`` (the akamaster format
is ``{'best_prec1', 'state_dict'}``); ``module.`` prefixes (``nn.DataParallel``) are stripped. Loading is
strict except that missing ``num_batches_tracked`` buffers (absent in old checkpoints) are allowed."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tta_norm.models.cifar_resnet import cifar_resnet
from tta_norm.models.sources import (
    _CIFAR_RE,
    CIFAR_DEPTHS,
    ModelSource,
    find_release_checkpoint,
    resolve_model_source,
)
from tta_norm.models.wrappers import NormalizedModel

__all__ = [
    "CIFAR_DEPTHS",
    "_CIFAR_RE",
    "NormalizedModel",
    "build_model",
    "find_release_checkpoint",
    "load_model",
    "load_state",
    "read_checkpoint",
]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint file that cannot be read safely or does not fit the model (a user's file, not a bug: the
    commands report it as a one-line error)."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (see the module docstring), with ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_prefix(dict(load_file(str(path), device="cpu")), "module.")
        except Exception as err:  # noqa: BLE001 - safetensors' own error types vary with the damage
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"could not read safetensors checkpoint {path}: {first}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError):  # torch's message suggests weights_only=False: never
            first = "it holds Python objects other than tensors and plain containers (unpickling them could run code)"
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"could not read checkpoint {path} with torch.load(weights_only=True): {first}; "
            "only tensor state dicts, optionally inside a dict with plain metadata, are accepted"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not contain a state dict of tensors")
    return _strip_prefix(dict(obj), "module.")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict ``load_state_dict`` that tolerates missing ``num_batches_tracked`` buffers only; a missing,
    unexpected or differently shaped tensor is a :class:`CheckpointError` naming the first ones."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]  # fmt: skip
    if shapes:
        raise CheckpointError(
            f"{source} does not match the model: {len(shapes)} tensor(s) of another shape, e.g. {shapes[0]} (a model "
            "with another number of classes or another architecture?)"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the model: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
        )


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    pretrained: bool = False,
    init_seed: int = 0,
) -> nn.Module:
    """Build model ``name`` with its weights (see :mod:`tta_norm.models.sources`), in eval mode on ``device``.

    ``weights``: a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...) or a file; ``checkpoint``:
    a file (for ``rb:`` models the robustbench ``model_dir``).  A model without weights raises unless
    ``random_init=True``.  ``pretrained=True`` is short for ``weights="DEFAULT"`` (torchvision).  For CIFAR
    ResNets ``num_classes`` defaults to the checkpoint's head size (10 without a checkpoint).  The model is
    built with torch's random generator seeded by ``init_seed`` (the caller's generator is left alone), so a
    ``random_init`` model is the same in every process and run."""
    if pretrained and weights is None and checkpoint is None and not name.strip().startswith(("rb:", "timm:")):
        weights = "DEFAULT"
    source = resolve_model_source(name, checkpoint, weights=weights, random_init=random_init,
                                  num_classes=num_classes)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: models are built on the CPU
        torch.random.default_generator.manual_seed(init_seed)
        model = build_model(source)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def build_model(source: ModelSource) -> nn.Module:
    """The model of a resolved :class:`ModelSource`, weights loaded, taking [0, 1] inputs (train mode as
    built: :func:`load_model` switches to eval)."""
    builders = {"cifar": _build_cifar, "torchvision": _build_torchvision, "timm": _build_timm,
                "robustbench": _build_robustbench}  # fmt: skip
    return builders[source.kind](source)


def _build_cifar(source: ModelSource) -> nn.Module:
    depth = int(source.name[len("resnet") :])
    if source.file is None:
        return cifar_resnet(depth, num_classes=source.num_classes or 10)
    state = read_checkpoint(source.file)
    head = state.get("linear.weight")
    num_classes = source.num_classes or (int(head.shape[0]) if head is not None else 10)
    model = cifar_resnet(depth, num_classes=num_classes)
    load_state(model, state, f"checkpoint {source.file}")
    return model


def _build_torchvision(source: ModelSource) -> nn.Module:
    import torchvision

    enum_name = source.options.get("weights_enum")
    if enum_name is not None:
        enum = torchvision.models.get_weight(enum_name)
        # the file is in the torch hub cache (checked by resolve_model_source): torchvision reads it from there
        model = torchvision.models.get_model(source.name, weights=enum)
    else:
        kwargs = {} if source.num_classes is None else {"num_classes": source.num_classes}
        model = torchvision.models.get_model(source.name, weights=None, **kwargs)
        if source.file is not None:
            state = _strip_prefix(read_checkpoint(source.file), "model.")
            load_state(model, state, f"checkpoint {source.file}")
    return NormalizedModel(model, source.mean, source.std)


def _build_timm(source: ModelSource) -> nn.Module:
    import timm

    kwargs = {} if source.num_classes is None else {"num_classes": source.num_classes}
    if source.file is None:
        model = timm.create_model(source.name, pretrained=False, **kwargs)
    elif source.weights != str(source.file):
        # the cached pretrained file, loaded by timm itself (its filters adapt old checkpoints); no download
        model = timm.create_model(source.name, pretrained=True, pretrained_cfg_overlay={"file": str(source.file)},
                                  **kwargs)  # fmt: skip
    else:
        model = timm.create_model(source.name, pretrained=False, **kwargs)
        state = _strip_prefix(read_checkpoint(source.file), "model.")
        load_state(model, state, f"weights {source.file}")
    return NormalizedModel(model, source.mean, source.std)


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


def _import_robustbench_loader():
    _alias_pyautoattack()
    try:
        from robustbench.utils import load_model as rb_load_model
    except ImportError as err:
        hint = " (robustbench needs pkg_resources: setuptools<81)" if "pkg_resources" in str(err) else ""
        raise ImportError(
            f"robustbench models need the optional robustbench package: pip install 'tta-norm[robustbench]'"
            f"{hint}; import failed: {err}"
        ) from None
    return rb_load_model


def _build_robustbench(source: ModelSource) -> nn.Module:
    rb_load_model = _import_robustbench_loader()
    dataset, threat = source.options["dataset"], source.options["threat_model"]
    try:
        return rb_load_model(model_name=source.name, dataset=dataset, threat_model=threat,
                             model_dir=source.options["model_dir"])  # fmt: skip
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"robustbench could not load {source.name} ({dataset}, {threat}) from {source.file}: "
                           f"{first}") from None  # fmt: skip
