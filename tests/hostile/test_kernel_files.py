"""Hostile kernel files and arguments: private build directory, SHA-256 check, fallback, argument checks."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import tta_norm
from tta_norm import kernels
from tta_norm.norm.spec import ESTIMATORS, INSTANCES, MIXINGS

needs_compiler = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler")


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """A kernel module state that has not tried to load yet, with its cache under ``tmp_path``."""
    monkeypatch.setenv("TTA_NORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.ENV_KERNELS, raising=False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_status", "not loaded yet")
    return tmp_path / "cache" / "kernels" / f"private-{os.getuid()}"


def _compile_library(tmp_path: Path, source: str, name: str) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([kernels._compiler(), "-x", "c", "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out


def _constructor_library(tmp_path: Path, marker: Path) -> Path:
    """A library whose load runs code (writes ``marker``), like a planted one would."""
    source = (
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'  FILE* f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n'
        "}\n"
        "int tta_fused_norm(void) { return 0; }\n"
        "long long tta_median_fallbacks(void) { return 0; }\n"
    )
    return _compile_library(tmp_path, source, "planted")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()


# ------------------------------------------------------------------------------------------ private directory
@pytest.mark.parametrize("mode", [0o777, 0o755, 0o770])
def test_non_private_directory_is_refused_with_one_warning(fresh_kernels, mode):
    fresh_kernels.mkdir(parents=True)
    fresh_kernels.chmod(mode)
    with pytest.warns(kernels.KernelWarning, match="must be 700"):
        assert kernels.kernel() is None
    assert "refusing kernel directory" in kernels.status()
    assert not list(fresh_kernels.iterdir())  # nothing built or loaded there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the ATen path runs silently from now on
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            tta_norm.adapt(_model(), "ema")(x)


def test_symlinked_directory_is_refused(fresh_kernels, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    fresh_kernels.parent.mkdir(parents=True)
    fresh_kernels.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(kernels.KernelDirectoryError, match="not a directory"):
        kernels.private_dir()


def test_strict_mode_raises_instead_of_falling_back(fresh_kernels, monkeypatch):
    fresh_kernels.mkdir(parents=True)
    fresh_kernels.chmod(0o777)
    monkeypatch.setenv(kernels.ENV_KERNELS, "1")
    with pytest.raises(RuntimeError, match="unavailable.*must be 700"):
        kernels.kernel()


def test_private_directory_is_created_0700(fresh_kernels):
    path = kernels.private_dir()
    assert path == fresh_kernels
    assert (os.stat(path).st_mode & 0o777) == 0o700


# ------------------------------------------------------------------------------------- verified before dlopen
@needs_compiler
def test_planted_library_never_runs_and_is_rebuilt(fresh_kernels, tmp_path):
    built = kernels._build(kernels._compiler())
    record = built.with_name(built.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    marker = tmp_path / "constructor-ran"
    planted = _constructor_library(tmp_path, marker)
    os.replace(planted, built)  # the planted file at the predictable path (its hash does not match the record)
    assert not kernels._verified(built)
    lib = kernels.kernel()
    assert lib is not None and lib.path == built
    assert not marker.exists()  # its constructor never ran: the file was rebuilt before loading
    assert kernels._verified(built)


@needs_compiler
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="loads through the descriptor on Linux only")
def test_a_library_swapped_in_after_its_check_never_runs(fresh_kernels, tmp_path, monkeypatch):
    """The file that is loaded is the file that was hashed: a swap at the path between the check and the
    load (a race an attacker with access to the path could win) loads the checked file, not the swapped one."""
    built = kernels._build(kernels._compiler())
    marker = tmp_path / "constructor-ran"
    planted = _constructor_library(tmp_path, marker)
    real_cdll = ctypes.CDLL

    def swap_then_load(name, *args, **kwargs):
        if planted.exists():
            os.replace(planted, built)  # after every check, right before the load
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(kernels.ctypes, "CDLL", swap_then_load)
    lib = kernels.kernel()
    assert not planted.exists()  # the swap happened
    assert not marker.exists()  # and the swapped-in library's constructor never ran
    assert lib is not None and lib.path == built


def test_a_kernel_directory_swapped_after_its_check_is_refused(fresh_kernels, tmp_path):
    """The directory is checked through the descriptor the library is opened with, not by path beforehand."""
    target = kernels.private_dir() / "cpu_norm-test.so"
    target.write_bytes(b"not a library")
    target.with_name(target.name + ".sha256").write_text(hashlib.sha256(b"not a library").hexdigest())
    assert kernels._verified(target)
    fresh_kernels.chmod(0o755)  # e.g. another directory moved in at this path
    assert not kernels._verified(target)


@needs_compiler
def test_library_without_the_symbol_falls_back_with_one_warning(fresh_kernels, tmp_path, monkeypatch):
    compiled = _compile_library(tmp_path, "int unrelated(void) { return 1; }\n", "nosymbol")
    empty = kernels.private_dir() / compiled.name  # a verified library: in the private directory, recorded
    os.replace(compiled, empty)
    empty.with_name(empty.name + ".sha256").write_text(hashlib.sha256(empty.read_bytes()).hexdigest())
    monkeypatch.setattr(kernels, "_build", lambda cxx, extra_flags=(): empty)
    x = torch.randn(3, 3, 6, 6)
    with pytest.warns(kernels.KernelWarning, match="tta_fused_norm"):
        assert kernels.kernel() is None
    assert "AttributeError" in kernels.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = tta_norm.adapt(_model(), "medbn")(x)  # the ATen path; no AttributeError
    assert torch.isfinite(out).all()


@needs_compiler
def test_concurrent_builds_compile_once(fresh_kernels, monkeypatch):
    calls = []
    real_run = subprocess.run

    def slow_run(cmd, *args, **kwargs):
        calls.append(cmd)
        time.sleep(0.3)  # widen the window in which a second builder could start
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(kernels.subprocess, "run", slow_run)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(kernels._build(kernels._compiler()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1  # one compile (with OpenMP); the other builders found the verified result
    assert kernels._verified(results[0])


def test_adapt_loads_the_kernel_before_the_first_forward(fresh_kernels, monkeypatch):
    loads = []
    monkeypatch.setattr(kernels, "_load", lambda strict=False: loads.append(1))
    tta = tta_norm.adapt(_model(), "tbn")
    assert loads  # at construction: a timed forward never builds
    monkeypatch.setattr(kernels, "_tried", True)
    del loads[:]
    with torch.no_grad():
        tta(torch.randn(2, 3, 6, 6))
    assert not loads


# ---------------------------------------------------------------------------------- codes and argument checks
def test_one_definition_of_the_codes():
    assert set(kernels.ESTIMATOR_CODES) == set(ESTIMATORS)
    assert set(kernels.RULE_CODES) == set(MIXINGS)
    assert set(kernels.INSTANCE_CODES) == set(INSTANCES)
    for table in (kernels.ESTIMATOR_CODES, kernels.RULE_CODES, kernels.INSTANCE_CODES, kernels.ARG_SLOTS):
        assert sorted(table.values()) == list(range(len(table)))
    source = kernels._SOURCE.read_text()
    assert '#include "codes.h"' in source
    # the C++ code compares codes only through the enumerators of codes.h, never through bare numbers
    assert not re.findall(r"\b(?:rule|estimator|instance)\s*[=!<>]=?\s*\d", source)


def _call(lib, x, out, numel, n, c, l, estimator=0, rule=0, weight=None, extents=None):
    ext = extents if extents is not None else torch.zeros(len(kernels.ARG_SLOTS), dtype=torch.int64)
    return lib.call_holding_gil(
        x.data_ptr(), out.data_ptr(), numel, n, c, l, estimator, 0, 0, rule, None, 0.0, None, None, 0,
        None if weight is None else weight.data_ptr(), None, 1e-5, None, 0, 0.0, 1, ext.data_ptr(),
    )  # fmt: skip


@pytest.mark.skipif(not kernels.available(), reason="compiled kernel unavailable")
def test_kernel_refuses_mismatched_shapes_codes_and_extents():
    lib = kernels.kernel()
    status = kernels.STATUS_CODES
    x = torch.randn(2, 3, 4)
    out = torch.full_like(x, 7.0)
    assert _call(lib, x, out, 24, 2, 3, 4) == status["ok"]
    out.fill_(7.0)
    assert _call(lib, x, out, 24, 2, 3, 8) == status["bad_shape"]  # would read past x
    assert _call(lib, x, out, 24, 1 << 40, 1 << 40, 1 << 40) == status["bad_shape"]  # overflowing product
    assert _call(lib, x, out, 24, 2, 3, 4, estimator=len(kernels.ESTIMATOR_CODES)) == status["bad_code"]
    assert _call(lib, x, out, 24, 2, 3, 4, rule=len(kernels.RULE_CODES)) == status["bad_code"]
    assert _call(lib, x, out, 24, 2, 3, 4, rule=kernels.RULE_CODES["linear"]) == status["missing_tensor"]
    small = torch.ones(2)
    ext = torch.zeros(len(kernels.ARG_SLOTS), dtype=torch.int64)
    ext[kernels.ARG_SLOTS["weight"]] = 2
    assert _call(lib, x, out, 24, 2, 3, 4, weight=small, extents=ext) == status["bad_extent"]
    ext[kernels.ARG_SLOTS["weight"]] = 0  # a pointer declared absent
    assert _call(lib, x, out, 24, 2, 3, 4, weight=small, extents=ext) == status["bad_extent"]
    assert (out == 7.0).all()  # refused calls wrote nothing
    assert lib.call_holding_gil(x.data_ptr(), out.data_ptr(), 24, 2, 3, 4, 0, 0, 0, 0, None, 0.0, None, None, 0,
                                None, None, 1e-5, None, 0, 0.0, 1, None) == status["bad_extent"]  # fmt: skip
    assert ctypes.sizeof(ctypes.c_int64) == 8


@pytest.mark.skipif(not kernels.available(), reason="compiled kernel unavailable")
def test_layer_with_a_swapped_tensor_never_reaches_the_kernel_with_it():
    """A parameter resized behind the layer's back is re-declared: the general path raises its own error."""
    model = tta_norm.adapt(_model(), "ema")
    layer = model.norm_layers()[0][1]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model(x)
        layer.weight.data = torch.ones(2)  # 2 values for 4 channels
        with pytest.raises((ValueError, RuntimeError)):
            model(x)
    with pytest.raises(ValueError, match="bad_extent"):
        kernels.launch(kernels.kernel(), torch.randn(2, 4, 3), 0, 0,
                       kernels.Arguments((None, None, None, torch.ones(2), None, None), 2), 0.0, False, 1e-5,
                       False, False, 0, 0.0)  # fmt: skip
