"""Public API of ``corruptions``: names, shapes and types, seeding, workers, and bad input."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import corruptions
from corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from corruptions._core import block_size

RANDOM = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
    "frost", "fog", "spatter", "elastic_transform",
}  # fmt: skip


def test_names_and_order():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
        "jpeg_compression",
    )  # fmt: skip
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert ALL_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_every_corruption_shapes_seeds(name, images):
    x = images[:5]
    for s in range(1, 6):
        a = corrupt(x, name, s, seed=3)
        assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == x.shape
        b = corrupt(x, name, s, seed=3)
        assert np.array_equal(a, b), "same seed must give the same bytes"
        if name in RANDOM:
            c = corrupt(x, name, s, seed=4)
            assert not np.array_equal(a, c), "a different seed should change a random corruption"
    # the input is never modified
    assert np.array_equal(x, images[:5])


def test_torch_and_single_image(images):
    x = images[:3]
    t = torch.from_numpy(x.copy())
    out = corrupt(t, "glass_blur", 4, seed=1)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and tuple(out.shape) == x.shape
    assert np.array_equal(out.numpy(), corrupt(x, "glass_blur", 4, seed=1))
    single = corrupt(x[0], "contrast", 2)
    assert single.shape == x[0].shape
    assert np.array_equal(single, corrupt(x[:1], "contrast", 2)[0])


def test_workers_do_not_change_results(images):
    bs = block_size(32, 32)
    x = np.concatenate([images] * (2 * bs // len(images) + 1))[: 2 * bs + 7]
    for name in ("gaussian_noise", "glass_blur", "motion_blur"):
        a = corrupt(x, name, 5, seed=9, workers=1)
        b = corrupt(x, name, 5, seed=9, workers=3)
        assert np.array_equal(a, b)


def test_global_rng_state_untouched(images):
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    torch_state = torch.get_rng_state().clone()
    for name in RANDOM:
        corrupt(images[:2], name, 3, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    # and the global state does not influence the result
    a = corrupt(images[:2], "shot_noise", 3, seed=0)
    np.random.seed(999)
    assert np.array_equal(a, corrupt(images[:2], "shot_noise", 3, seed=0))


def test_imagenet_preset_runs_on_small_images(images):
    x = np.concatenate([images[:2]] * 1)
    big = np.kron(x, np.ones((1, 2, 2, 1), np.uint8))  # 64x64
    for name in ALL_CORRUPTIONS:
        out = corrupt(big, name, 3, seed=0, preset="imagenet")
        assert out.shape == big.shape and out.dtype == np.uint8


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.zeros((2, 32, 32, 3), np.float32), TypeError, "uint8"),
        (np.zeros((2, 32, 32, 3), np.int64), TypeError, "uint8"),
        (torch.zeros((2, 32, 32, 3)), TypeError, "uint8"),
        (np.zeros((2, 3, 32, 32), np.uint8), ValueError, "channels"),
        (np.zeros((2, 32, 32, 4), np.uint8), ValueError, "3 channels"),
        (np.zeros((32, 32), np.uint8), ValueError, "shape"),
        (np.zeros((1, 2, 32, 32, 3), np.uint8), ValueError, "shape"),
        ([[1, 2, 3]], TypeError, "numpy array or torch tensor"),
        (np.zeros((2, 7, 32, 3), np.uint8), ValueError, "at least 8x8"),
    ],
)
def test_bad_images(bad, exc, match):
    with pytest.raises(exc, match=match):
        corrupt(bad, "contrast", 1)


def test_bad_arguments(images):
    x = images[:2]
    with pytest.raises(ValueError, match="unknown corruption 'blur'.*gaussian_noise"):
        corrupt(x, "blur", 1)
    for sev in (0, 6, -1):
        with pytest.raises(ValueError, match="severity must be in 1..5"):
            corrupt(x, "contrast", sev)
    with pytest.raises(TypeError, match="severity must be an int"):
        corrupt(x, "contrast", 2.0)
    with pytest.raises(ValueError, match="unknown preset"):
        corrupt(x, "contrast", 1, preset="tiny")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        corrupt(x, "contrast", 1, seed=-1)
    with pytest.raises(TypeError, match="seed must be"):
        corrupt(x, "contrast", 1, seed=1.5)
    with pytest.raises(ValueError, match="workers"):
        corrupt(x, "contrast", 1, workers=0)


def test_size_limits(images):
    big = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="frost .*at most 62x104"):
        corrupt(big, "frost", 1, preset="cifar")
    assert corrupt(big, "frost", 1, preset="imagenet").shape == big.shape
    small = np.zeros((1, 9, 9, 3), np.uint8)
    with pytest.raises(ValueError, match="defocus_blur severity 5 .*at least 11"):
        corrupt(small, "defocus_blur", 5, preset="imagenet")
    with pytest.raises(ValueError, match="glass_blur severity 5 .*at least 9"):
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "glass_blur", 5, preset="imagenet")


def test_frost_without_imagecorruptions(monkeypatch, images):
    from corruptions import _frost

    _frost.frost_textures.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "imagecorruptions" else real(n, *a)
    )
    with pytest.raises(RuntimeError, match="pip install imagecorruptions"):
        corrupt(images[:1], "frost", 1)
    monkeypatch.undo()
    _frost.frost_textures.cache_clear()
    assert corrupt(images[:1], "frost", 1).shape == (1, 32, 32, 3)


def test_standalone_imports():
    """``corruptions`` must not import tta_norm, nor the imagecorruptions module (frost reads its files)."""
    code = (
        "import sys, numpy as np\n"
        "import corruptions\n"
        "corruptions.corrupt(np.zeros((1, 32, 32, 3), np.uint8), 'frost', 1)\n"
        "bad = [m for m in sys.modules if m.startswith(('tta_norm', 'imagecorruptions'))]\n"
        "assert not bad, bad\n"
        "import corruptions.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_module_imports_light():
    code = "import sys; import corruptions.cli; assert 'numpy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert hasattr(corruptions, "write_cifar_c") and hasattr(corruptions, "write_imagenet_c")


def test_missing_opencv_is_explained(monkeypatch, images):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    for name in ("defocus_blur", "elastic_transform", "spatter", "snow"):
        with pytest.raises(ImportError, match="pip install opencv-python"):
            corrupt(images[:1], name, 1)
    assert corrupt(images[:1], "gaussian_noise", 1).shape == (1, 32, 32, 3)


def test_empty_batch(images):
    empty = images[:0]
    out = corrupt(empty, "glass_blur", 3)
    assert out.shape == (0, 32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("name", ["gaussian_noise", "snow"])
def test_chunks_with_their_start_equal_one_call(name):
    x = np.random.default_rng(0).integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    bs = block_size(32, 32)
    whole = corrupt(x, name, 5, seed=3, workers=1)
    parts = [corrupt(x[i : i + bs], name, 5, seed=3, start=i, workers=1) for i in range(0, len(x), bs)]
    assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(parts[1][:10], corrupt(x[bs : bs + 10], name, 5, seed=3)[:10])  # start=0: block 0
    with pytest.raises(ValueError, match="multiple of the block size"):
        corrupt(x[:10], name, 5, start=10)
    with pytest.raises(ValueError, match="start"):
        corrupt(x[:10], name, 5, start=-256)
