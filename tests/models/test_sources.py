"""Model sources: timm weights from a fake local Hugging Face cache, torchvision weights from a fake torch hub
cache or a file, robustbench's cache layout; nothing is downloaded and nothing falls back to random weights."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tta_norm.models import LogitSubset, NormalizedModel, load_model, resolve_model_source

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Empty caches in tmp_path, and any download attempt fails the test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def no_download(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    import huggingface_hub
    import timm.models._hub as timm_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(timm_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _fake_hf_cache(root, repo_id: str, state: dict[str, torch.Tensor], filename="model.safetensors"):
    from safetensors.torch import save_file

    base = root / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(snap / filename))
    else:
        torch.save(state, snap / filename)
    return snap / filename


# ------------------------------------------------------------------------------------------------------- timm


def test_timm_weights_from_local_hf_cache_with_pretrained_cfg_normalisation(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False).eval()
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    path = _fake_hf_cache(tmp_path / "hf", cfg.hf_hub_id, ref.state_dict())
    source = resolve_model_source("timm:test_resnet")
    assert source.kind == "timm" and source.file == path and source.weights == cfg.hf_hub_id
    assert source.mean == tuple(cfg.mean) == (0.5, 0.5, 0.5)  # not ImageNet's: the model's own cfg
    model = load_model("timm:test_resnet")
    assert isinstance(model, NormalizedModel) and not model.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref((x - 0.5) / 0.5)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_timm_pytorch_bin_in_cache_is_found(tmp_path):
    ref = timm.create_model("test_resnet", pretrained=False).eval()
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    path = _fake_hf_cache(tmp_path / "hf", cfg.hf_hub_id, ref.state_dict(), "pytorch_model.bin")
    assert resolve_model_source("timm:test_resnet").file == path
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_model("timm:test_resnet")(x), ref((x - 0.5) / 0.5), atol=1e-5)


def test_timm_snapshot_without_refs_is_found(tmp_path):
    ref = timm.create_model("test_resnet", pretrained=False).eval()
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    path = _fake_hf_cache(tmp_path / "hf", cfg.hf_hub_id, ref.state_dict())
    (path.parents[2] / "refs" / "main").unlink()  # a copied snapshot folder without refs/
    assert resolve_model_source("timm:test_resnet").file == path


def test_timm_url_weights_from_torch_hub_cache(tmp_path):
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    assert cfg.url and cfg.hf_hub_id  # the HF cache is empty: the URL's torch hub file is the fallback
    ref = timm.create_model("resnet18", pretrained=False).eval()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    model = load_model("timm:resnet18.a1_in1k")
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - mean) / std), atol=1e-5)


def test_timm_missing_weights_is_one_line_error_never_random():
    with pytest.raises(FileNotFoundError) as err:
        load_model("timm:test_resnet")
    text = _one_line(err)
    assert "timm:test_resnet" in text and "never downloaded" in text and "models--timm--test_resnet" in text


def test_timm_weights_file_and_random_init(tmp_path):
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "ft.pt")
    model = load_model("timm:test_resnet", weights=tmp_path / "ft.pt", num_classes=7)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - 0.5) / 0.5), atol=1e-5)
    assert resolve_model_source("timm:test_resnet", random_init=True).weights is None
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model_source("timm:test_resnet", weights="DEFAULT")  # DEFAULT = the cached pretrained weights
    assert load_model("timm:test_resnet", random_init=True)(x).shape == (1, 1000)


def test_timm_bad_names_are_clear():
    with pytest.raises(ValueError, match="unknown timm model"):
        resolve_model_source("timm:not_a_model_xyz")
    with pytest.raises(ValueError, match="timm model 'test_resnet.nope'"):
        resolve_model_source("timm:test_resnet.nope")
    with pytest.raises(ValueError, match="1000 classes but num_classes=10"):
        resolve_model_source("timm:test_resnet", num_classes=10)


# ------------------------------------------------------------------------------------------------ torchvision


def _tv_cached_file(tmp_path, url: str):
    path = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_torchvision_weights_from_torch_hub_cache(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.save(ref.state_dict(), _tv_cached_file(tmp_path, enum.url))
    for weights in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        source = resolve_model_source("resnet18", weights=weights)
        assert source.weights == "ResNet18_Weights.IMAGENET1K_V1" and source.num_classes == 1000
    model = load_model("resnet18", weights="DEFAULT")
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - mean) / std), atol=1e-5)


def test_torchvision_without_weights_refuses_unless_random_init():
    with pytest.raises(ValueError) as err:
        load_model("resnet18")
    assert "random_init" in _one_line(err) and "weights" in str(err.value)
    with pytest.raises(ValueError):
        load_model("tv:resnet18", num_classes=10)
    model = load_model("tv:resnet18", num_classes=10, random_init=True)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_weights_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model("resnet18", weights="DEFAULT")
    assert "torch hub cache" in _one_line(err)
    with pytest.raises(ValueError) as err:
        resolve_model_source("resnet18", weights="IMAGENET1K_V9")
    assert "IMAGENET1K_V1" in _one_line(err)
    with pytest.raises(ValueError, match="not for resnet18"):
        resolve_model_source("resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError):
        resolve_model_source("resnet18", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="either checkpoint or weights"):
        resolve_model_source("resnet18", tmp_path / "a.pt", weights="DEFAULT")
    with pytest.raises(ValueError, match="contradicts"):
        resolve_model_source("resnet18", weights="DEFAULT", random_init=True)
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model_source("definitely_not_a_model")


def test_torchvision_weights_file(tmp_path):
    ref = load_model("tv:resnet18", num_classes=7, random_init=True)
    torch.save(ref.state_dict(), tmp_path / "tv.pt")  # saved with the normalisation wrapper ("model." prefix)
    assert resolve_model_source("tv:resnet18", checkpoint=tmp_path / "tv.pt").file == tmp_path / "tv.pt"
    assert resolve_model_source("tv:resnet18", weights=str(tmp_path / "tv.pt")).file == tmp_path / "tv.pt"
    again = load_model("tv:resnet18", num_classes=7, weights=tmp_path / "tv.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ref(x), again(x))


def test_cifar_resnet_random_init_and_weights_alias(tmp_path):
    model = load_model("resnet20", random_init=True)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    torch.save(model.state_dict(), tmp_path / "r20.pt")
    again = load_model("resnet20", weights=tmp_path / "r20.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), again(x))


# ------------------------------------------------------------------------------------------------ robustbench


def _rb_file(root, dataset="cifar10", threat="corruptions", name="Standard"):
    path = root / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"checkpoint")
    return path


def test_robustbench_cache_layout_lookup(tmp_path):
    default = _rb_file(tmp_path / "cache" / "robustbench")
    source = resolve_model_source("rb:Standard")
    assert source.kind == "robustbench" and source.file == default
    assert source.options == {"dataset": "cifar10", "threat_model": "corruptions",
                              "model_dir": str(tmp_path / "cache" / "robustbench")}  # fmt: skip
    own = _rb_file(tmp_path / "mine", "imagenet", "Linf", "Salman2020Do_R18")
    assert resolve_model_source("rb:imagenet/Linf/Salman2020Do_R18", tmp_path / "mine").file == own
    local = _rb_file(tmp_path / "models", "cifar100", "corruptions", "Hendrycks2020AugMix_ResNeXt")
    assert resolve_model_source("rb:Hendrycks2020AugMix_ResNeXt", num_classes=100).file == local
    assert resolve_model_source("rb:cifar10/corruptions_3d/Standard").file == default


def test_robustbench_missing_checkpoint_is_one_line_without_robustbench(monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed
    with pytest.raises(FileNotFoundError) as err:
        load_model("rb:Standard")
    text = _one_line(err)
    assert "cifar10/corruptions/Standard.pt" in text and "not downloaded" in text
    with pytest.raises(ValueError, match="robustbench dataset"):
        resolve_model_source("rb:mnist/Standard")
    with pytest.raises(ValueError, match="threat model"):
        resolve_model_source("rb:cifar10/Linf3/Standard")


def test_robustbench_not_installed_is_one_line(monkeypatch, tmp_path):
    _rb_file(tmp_path / "cache" / "robustbench")
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(ImportError) as err:
        load_model("rb:Standard")
    assert "tta-norm[robustbench]" in _one_line(err)


def test_robustbench_loader_gets_the_cache_layout(monkeypatch, tmp_path):
    path = _rb_file(tmp_path / "cache" / "robustbench")
    calls = []

    def fake_load_model(model_name, dataset, threat_model, model_dir):
        calls.append((model_name, dataset, threat_model, model_dir))
        return torch.nn.Linear(3, 2)

    pkg = types.ModuleType("robustbench")
    utils = types.ModuleType("robustbench.utils")
    utils.load_model = fake_load_model
    pkg.utils = utils
    monkeypatch.setitem(sys.modules, "robustbench", pkg)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    model = load_model("rb:Standard")
    assert isinstance(model, torch.nn.Linear) and not model.training
    assert calls == [("Standard", "cifar10", "corruptions", str(path.parents[2]))]


# -------------------------------------------------------------------------------------------------- wrappers


def test_logit_subset_keeps_the_listed_logits_in_order():
    base = torch.nn.Linear(4, 10)
    sub = LogitSubset(base, [7, 2, 5])
    x = torch.randn(3, 4)
    assert torch.equal(sub(x), base(x)[:, [7, 2, 5]])
    with pytest.raises(ValueError, match="1,000-class"):
        LogitSubset(base, [3, 12])(x)
    with pytest.raises(ValueError, match="distinct"):
        LogitSubset(base, [1, 1])
