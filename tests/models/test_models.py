from __future__ import annotations

import numpy as np
import pytest
import torch

from tta_norm.models import cifar_resnet, load_model, read_checkpoint
from tta_norm.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.usefixtures("_isolated_cache")  # tests here write to the cache


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)])
def test_cifar_resnet_sizes(depth, params):
    # parameter counts of He et al. 2016, table 6 (0.27M, 0.46M, 0.66M, 0.85M)
    model = cifar_resnet(depth)
    assert abs(_n_params(model) - params) / params < 0.02
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert cifar_resnet(depth, num_classes=100)(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_cifar_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(21)


def test_state_dict_names_match_release_layout():
    keys = set(cifar_resnet(20).state_dict())
    assert "conv1.weight" in keys and "linear.weight" in keys and "layer3.2.bn2.running_var" in keys
    assert not any("normalize" in k or "shortcut" in k for k in keys)  # no extra persistent state


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = cifar_resnet(20).layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_normalization_inside_model():
    model = cifar_resnet(20).eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    manual = torch.nn.functional.conv2d((x - mean) / std, model.conv1.weight, padding=1)
    assert torch.allclose(model.conv1(model.normalize(x)), manual, atol=1e-6)


def test_checkpoint_formats(tmp_path):
    ref = cifar_resnet(20)
    state = ref.state_dict()
    # raw state dict, akamaster format with DataParallel prefix, our training format
    torch.save(state, tmp_path / "raw.pt")
    torch.save(
        {"best_prec1": 90.0, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.th"
    )
    torch.save({"state_dict": state, "meta": {"acc": 0.9}}, tmp_path / "ours.pt")
    x = torch.rand(2, 3, 32, 32)
    expected = ref.eval()(x)
    for name in ("raw.pt", "a.th", "ours.pt"):
        model = load_model("resnet20", tmp_path / name)
        assert not model.training
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_checkpoint_missing_num_batches_tracked_is_fine(tmp_path):
    state = {k: v for k, v in cifar_resnet(20).state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.th")
    load_model("resnet20", tmp_path / "old.th")


def test_checkpoint_mismatch_is_clear(tmp_path):
    torch.save(cifar_resnet(32).state_dict(), tmp_path / "r32.pt")
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_model("resnet20", tmp_path / "r32.pt")
    with pytest.raises(FileNotFoundError):
        load_model("resnet20", tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


def test_a_bad_checkpoint_is_a_user_error_of_one_line_and_never_runs_code(tmp_path):
    import os
    import pickle

    from tests.bench.tinybench import bench_config
    from tta_norm.bench.runner import BenchJob
    from tta_norm.bench.validate import ConfigError
    from tta_norm.models import CheckpointError

    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(type("Payload", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})(), f)
    torch.save(cifar_resnet(32).state_dict(), tmp_path / "r32.pt")
    for name in ("evil.pkl", "r32.pt"):
        with pytest.raises(CheckpointError) as err:  # a ValueError: the commands report it as a config error
            load_model("resnet20", tmp_path / name)
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
        assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
        job = BenchJob(bench_config(str(tmp_path / "out"), model="resnet20", checkpoint=str(tmp_path / name)))
        with pytest.raises(ConfigError, match="^model: "):
            job.prepare("cpu")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_num_classes_from_checkpoint(tmp_path):
    torch.save(cifar_resnet(20, num_classes=100).state_dict(), tmp_path / "c100.pt")
    assert load_model("resnet20", tmp_path / "c100.pt").linear.out_features == 100


def test_resnet56_without_checkpoint_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_NORM_CHECKPOINTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet56"):
        load_model("resnet56")


def test_release_checkpoint_accuracy_on_mirror(resnet20_checkpoint, mirror_test_small):
    model = load_model("resnet20")  # found through the search list
    ds = mirror_test_small
    x = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2).contiguous().float() / 255
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == ds.labels).mean()
    # ~81 % on the full mirror test split (shared/data/README.md); 300 images -> wide margin
    assert 0.70 < acc < 0.92


def test_torchvision_model_by_name():
    model = load_model("tv:resnet18", num_classes=10, random_init=True)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert not model.training
    with pytest.raises(ValueError, match="unknown model"):
        load_model("definitely_not_a_model")


def test_torchvision_pretrained_offline_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="torch hub cache"):
        load_model("resnet18", pretrained=True)


def test_torchvision_checkpoint_roundtrip(tmp_path):
    model = load_model("tv:resnet18", num_classes=7, random_init=True)
    torch.save(
        model.state_dict(), tmp_path / "tv.pt"
    )  # saved with the normalization wrapper ("model." prefix)
    again = load_model("tv:resnet18", tmp_path / "tv.pt", num_classes=7)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), again(x))


def test_robustbench_missing_is_clear(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "robustbench", None)  # simulate "not installed"
    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="robustbench checkpoint"):
        load_model("rb:Standard")


def test_random_init_models_are_the_same_in_every_build_and_leave_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("resnet20", random_init=True)
    assert torch.equal(torch.rand(3), expected)  # the build drew from its own generator
    torch.manual_seed(7)
    b = load_model("resnet20", random_init=True)
    c = load_model("resnet20", random_init=True, init_seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


def test_a_checkpoint_of_another_head_size_is_a_one_line_checkpoint_error() -> None:
    from tta_norm.models.loading import CheckpointError, load_state

    state = cifar_resnet(20, num_classes=100).state_dict()
    model = cifar_resnet(20, num_classes=10)
    with pytest.raises(CheckpointError, match=r"another shape, e.g. linear.weight \(100, 64\) \(model \(10, 64\)\)"):
        load_state(model, state)


def test_a_damaged_safetensors_file_is_a_checkpoint_error(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from tta_norm.models.loading import CheckpointError

    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="could not read safetensors checkpoint"):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_a_bench_resolves_an_rb_model_to_its_datasets_checkpoint(tmp_path) -> None:
    from tta_norm.bench.runner import robustbench_classes
    from tta_norm.models import resolve_model_source

    for dataset in ("cifar10", "cifar100"):
        (tmp_path / dataset / "corruptions").mkdir(parents=True)
        (tmp_path / dataset / "corruptions" / "Net.pt").write_bytes(b"")
    for dataset in ("cifar10", "cifar100"):
        n = robustbench_classes("rb:Net", dataset)
        assert resolve_model_source("rb:Net", tmp_path, num_classes=n).options["dataset"] == dataset
    assert robustbench_classes("rb:cifar10/Net", "cifar100") is None  # the name says its dataset
    assert robustbench_classes("resnet20", "cifar100") is None
