"""Optional compiled CPU kernel for the adaptive norm layer (float32, no autograd).

On CPU the per-layer cost of a small batch is dominated by the number of ATen calls, not by arithmetic: the
general path of :class:`tta_norm.norm.AdaptiveNorm` spends 5-10 small kernels (moments, mixing, EMA commit,
normalisation) where a plain BatchNorm spends one.  :func:`fused_norm` does estimate + mix + commit + normalise
in one call of ``cpu_norm.cpp`` (which documents the algorithms; medians are exact order statistics found by a
sampled bracket instead of a full selection).  It is a pure speed-up: tests check it against the ATen path.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, ``c++``, ``g++`` or ``clang++``;
about a second) into ``<cache>/kernels`` (``$TTA_NORM_CACHE``, default ``~/.cache/tta_norm``) and loaded with
``ctypes``.  Without a compiler, or with ``TTA_NORM_KERNELS=0``, everything runs on the ATen path and gives
the same numbers (to float rounding).  ``TTA_NORM_KERNELS=1`` makes a failed build an error instead of a
silent fallback.  :func:`status` says which is in use.  GPUs, other dtypes and inputs that need gradients
(TENT, attacks) always take the ATen path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

ENV_KERNELS = "TTA_NORM_KERNELS"

#: codes of ``cpu_norm.cpp`` (``estimator`` and ``rule`` arguments)
ESTIMATOR_CODES = {"mean_var": 0, "median_msd": 1, "median_mad": 2, "median_mad_normal": 3}
RULE_CODES = {"test": 0, "linear": 1, "mixture": 2, "ema": 3, "source": 4}
INSTANCE_CODES = {"none": 0, "iabn": 1, "example": 2}

_SOURCE = Path(__file__).with_name("cpu_norm.cpp")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-fno-math-errno")  # fmt: skip
_lock = threading.Lock()
_lib: _Kernel | None = None
_tried = False
_status = "not loaded yet"


def status() -> str:
    """Whether the compiled kernel is in use, and why not if it is not (loads it if not tried yet)."""
    _load()
    return _status


def available() -> bool:
    """``True`` when the compiled kernel is loaded (building it on the first call)."""
    return _load() is not None


def median_fallbacks() -> int:
    """How many median selections missed their sampled bracket and ran a full selection (diagnostics)."""
    lib = _load()
    return int(lib.fallbacks()) if lib is not None else 0


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine_tag() -> str:
    """CPU model and flags (``-march=native`` builds are specific to them)."""
    tag = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))]
        tag += "|" + "|".join(sorted(set(lines)))
    except OSError:
        pass
    return tag


def _build(cxx: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``cpu_norm.cpp`` into the cache (once per source, compiler, flags and CPU); the path of the .so.
    ``extra_flags`` builds a variant (tests build the portable, non-AVX-512 one with ``-mno-avx512f``)."""
    from tta_norm.data.paths import cache_root  # lazy: tta_norm.data is heavy and not needed otherwise

    flags = (*_FLAGS, *extra_flags)
    source = _SOURCE.read_bytes()
    key = hashlib.sha1(source + cxx.encode() + " ".join(flags).encode() + _machine_tag().encode()).hexdigest()[:12]
    out_dir = cache_root() / "kernels"
    target = out_dir / f"cpu_norm-{key}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    errors = []
    for openmp in (("-fopenmp",), ()):  # OpenMP shares torch's libgomp (same soname); without it: one thread
        cmd = [cxx, *flags, *openmp, str(_SOURCE), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)
            return target
        errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    raise RuntimeError("compiling the fused norm kernel failed:\n" + "\n".join(errors))


class _Kernel:
    """The loaded library: ``call`` releases the GIL (large inputs: other Python threads, e.g. a prefetching
    loader, keep running), ``call_holding_gil`` does not (small inputs: releasing and re-taking the GIL costs
    more than the kernel's own work at batch 1)."""

    def __init__(self, path: Path) -> None:
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        argtypes = [p, p, i64, i64, i64, i32, i32, i32, i32, p, f64, p, p, i32, p, p, f64, p, i32, f64, i32]
        self.path = path
        self.call = ctypes.CDLL(str(path)).tta_fused_norm
        self.call_holding_gil = ctypes.PyDLL(str(path)).tta_fused_norm
        for fn in (self.call, self.call_holding_gil):
            fn.argtypes = argtypes
            fn.restype = i32
        self.fallbacks = ctypes.CDLL(str(path)).tta_median_fallbacks
        self.fallbacks.restype = i64


#: inputs with fewer elements call the kernel without releasing the GIL
HOLD_GIL_BELOW = 1 << 16


def _load() -> _Kernel | None:
    global _lib, _tried, _status
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        mode = os.environ.get(ENV_KERNELS, "auto").strip().lower()
        try:
            if mode in ("0", "off", "false", "no"):
                _status = f"disabled ({ENV_KERNELS}={mode}): ATen path"
            else:
                cxx = _compiler()
                if cxx is None:
                    raise RuntimeError("no C++ compiler found (set CXX or install g++/clang++)")
                path = _build(cxx)
                _lib = _Kernel(path)
                _status = f"compiled kernel {path}"
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _status = f"unavailable ({err}): ATen path"
            if mode in ("1", "on", "true", "yes"):
                _tried = True
                raise RuntimeError(f"{ENV_KERNELS}={mode} but the fused norm kernel is unavailable: {err}") from err
        _tried = True
        return _lib


_F32 = torch.float32


def _bad(t: Tensor | None, c: int) -> bool:
    """Not usable as a ``(C,)`` argument (wrong dtype/device/size, or strided)."""
    return t is not None and (t.dtype is not _F32 or not t.is_cpu or t.numel() != c or not t.is_contiguous())


def fused_norm(
    x: Tensor,
    estimator: int,
    rule: int,
    *,
    alpha: float | Tensor = 0.0,
    ref_mean: Tensor | None = None,
    ref_var: Tensor | None = None,
    commit: bool = False,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    unbiased: bool = False,
    average_median: bool = False,
    stats_out: Tensor | None = None,
    instance: int = 0,
    instance_param: float = 0.0,
) -> Tensor | None:
    """Estimate, mix, (commit) and normalise in one kernel call; ``None`` when the kernel cannot take the input.

    ``x``: contiguous float32 CPU tensor ``(N, C, *spatial)``.  ``estimator``/``rule``: :data:`ESTIMATOR_CODES`,
    :data:`RULE_CODES`.  ``alpha``: weight on the test statistics (a ``(C,)`` tensor for channel-wise mixing,
    clamped to [0, 1]; the momentum for ``"ema"``).  ``ref_mean``/``ref_var``: source statistics or the EMA
    state, updated in place for ``"ema"`` with ``commit`` (non-finite channels keep their value).
    ``stats_out`` (``(2, C)``) receives the mixed mean and variance.  ``instance`` (:data:`INSTANCE_CODES`)
    refines them per sample: IABN with ``instance_param`` = k, or example weighing with weight
    ``instance_param``.  Does no autograd: callers check that no gradient is needed."""
    lib = kernel()
    if lib is None or x.dtype is not _F32 or not x.is_cpu or x.dim() < 2 or not x.is_contiguous():
        return None
    numel = x.numel()
    if numel == 0:
        return None
    c = x.shape[1]
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    if _bad(weight, c) or _bad(bias, c) or _bad(ref_mean, c) or _bad(ref_var, c) or _bad(alpha_t, c):
        return None
    if rule and (ref_mean is None or ref_var is None):
        raise ValueError("mixing with reference statistics needs ref_mean and ref_var")
    if stats_out is not None and _bad(stats_out, 2 * c):
        raise ValueError("stats_out must be a contiguous float32 CPU tensor of shape (2, C)")
    return launch(
        lib, x, estimator, rule, alpha_t, 0.0 if alpha_t is not None else alpha, ref_mean, ref_var, commit, weight,
        bias, eps, unbiased, average_median, stats_out, instance, instance_param,
    )  # fmt: skip


def kernel() -> _Kernel | None:
    """The loaded kernel (building it on first use), or ``None`` when it is unavailable or disabled."""
    return _lib if _tried else _load()


def launch(
    lib: _Kernel,
    x: Tensor,
    estimator: int,
    rule: int,
    alpha_t: Tensor | None,
    alpha: float,
    ref_mean: Tensor | None,
    ref_var: Tensor | None,
    commit: bool,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    unbiased: bool,
    average_median: bool,
    stats_out: Tensor | None,
    instance: int,
    instance_param: float,
) -> Tensor:
    """The kernel call itself, without checks: every tensor must be float32, on the CPU and contiguous, ``x``
    non-empty with ``C`` channels and the others of ``C`` elements (``stats_out``: ``2 C``).  For callers that
    guarantee this cheaply (:class:`tta_norm.norm.AdaptiveNorm` checks its own tensors once per dtype/device);
    everyone else uses :func:`fused_norm`."""
    n, c = x.shape[0], x.shape[1]
    numel = x.numel()
    out = torch.empty_like(x)
    call = lib.call_holding_gil if numel < HOLD_GIL_BELOW else lib.call
    rc = call(
        x.data_ptr(), out.data_ptr(), n, c, numel // (n * c), estimator, unbiased, average_median, rule,
        None if alpha_t is None else alpha_t.data_ptr(), alpha,
        None if ref_mean is None else ref_mean.data_ptr(), None if ref_var is None else ref_var.data_ptr(),
        commit, None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(), eps,
        None if stats_out is None else stats_out.data_ptr(), instance, instance_param, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"fused norm kernel rejected its arguments (code {rc})")
    return out
