"""Optional compiled CPU kernel for the adaptive norm layer (float32, no autograd).

On CPU the per-layer cost of a small batch is dominated by the number of ATen calls, not by arithmetic: the
general path of :class:`tta_norm.norm.AdaptiveNorm` spends 5-10 small kernels (moments, mixing, EMA commit,
normalisation) where a plain BatchNorm spends one.  :func:`fused_norm` does estimate + mix + commit + normalise
in one call of ``cpu_norm.cpp`` (which documents the algorithms; medians are exact order statistics found by a
sampled bracket instead of a full selection).  It is a pure speed-up: tests check it against the ATen path.

The kernel is compiled with the system C++ compiler (``$CXX``, ``c++``, ``g++`` or ``clang++``; about a
second) explicitly with ``tta-norm build-kernels``, or else on first use (by :func:`tta_norm.adapt`, before any
timed forward), under a file lock so that concurrent processes never build it twice.  It goes into a private
directory ``<cache>/kernels/private-<uid>`` (``$TTA_NORM_CACHE``, default ``~/.cache/tta_norm``) that must be a
real directory owned by the user with mode 0700 (created so; anything else is refused).  The SHA-256 of the
built library is recorded next to it and checked before the library is loaded with ``ctypes``, through the
descriptor the library is then loaded from (on Linux), so a file swapped in after the check never runs; a file
that does not match is rebuilt, never loaded.  Without a compiler, with ``TTA_NORM_KERNELS=0``, or when anything
in building, verifying or loading fails (a refused directory, a missing symbol), everything runs on the ATen
path and gives the same numbers (to float rounding); the reason is given once as a :class:`KernelWarning`
and by :func:`status`.  ``TTA_NORM_KERNELS=1`` makes such a failure an error instead.  GPUs, other dtypes and
inputs that need gradients (TENT, attacks) always take the ATen path.

The argument codes (estimator, mixing rule, instance refinement) are defined once, in ``codes.h``, which the
C++ source includes and this module parses.  The C entry point refuses a call whose declared shapes and
element counts do not match its pointers (:data:`STATUS_CODES`).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import re
import shutil
import stat
import subprocess
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

ENV_KERNELS = "TTA_NORM_KERNELS"

_SOURCE = Path(__file__).with_name("cpu_norm.cpp")
_CODES_HEADER = Path(__file__).with_name("codes.h")


def _parse_codes(text: str) -> dict[str, dict[str, int]]:
    """``{"ESTIMATOR": {"mean_var": 0, ...}, "RULE": {...}, ...}`` from the enumerators of ``codes.h``."""
    codes: dict[str, dict[str, int]] = {}
    for group, name, value in re.findall(r"^\s*([A-Z]+)_(\w+)\s*=\s*(\d+)\s*,", text, flags=re.MULTILINE):
        table = codes.setdefault(group, {})
        if name in table:
            raise RuntimeError(f"codes.h defines {group}_{name} twice")
        table[name] = int(value)
    return codes


_CODES = _parse_codes(_CODES_HEADER.read_text())
#: codes of ``cpu_norm.cpp`` (``estimator``, ``rule`` and ``instance`` arguments), parsed from ``codes.h``
ESTIMATOR_CODES: dict[str, int] = _CODES["ESTIMATOR"]
RULE_CODES: dict[str, int] = _CODES["RULE"]
INSTANCE_CODES: dict[str, int] = _CODES["INSTANCE"]
#: slots of the kernel's ``extents`` argument and the kernel's return codes
ARG_SLOTS: dict[str, int] = {k: v for k, v in _CODES["ARG"].items() if k != "count"}
STATUS_CODES: dict[str, int] = _CODES["STATUS"]
_STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}
_EMA = RULE_CODES["ema"]

_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-fno-math-errno")  # fmt: skip
_lock = threading.Lock()
_lib: _Kernel | None = None
_tried = False
_status = "not loaded yet"


class KernelWarning(RuntimeWarning):
    """The compiled kernel could not be built, verified or loaded: the ATen path runs instead."""


class KernelDirectoryError(RuntimeError):
    """The kernel directory is not private (a symlink, another owner, or group/world permissions)."""


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


def private_dir() -> Path:
    """The kernel directory ``<cache>/kernels/private-<uid>``, created with mode 0700 if missing.

    Raises :class:`KernelDirectoryError` unless it is a real directory (not a symlink) owned by the current
    user with no group or world permissions."""
    from tta_norm.data.paths import cache_root  # lazy: tta_norm.data is heavy and not needed otherwise

    getuid = getattr(os, "getuid", None)
    if getuid is None:
        raise KernelDirectoryError("a private kernel directory needs a POSIX system (no os.getuid here)")
    path = cache_root() / "kernels" / f"private-{getuid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_private(os.lstat(path), path)
    return path


def _check_private(info: os.stat_result, path: Path) -> None:
    """Raise :class:`KernelDirectoryError` unless ``info`` is a directory of the user's with mode 0700."""
    if not stat.S_ISDIR(info.st_mode):
        raise KernelDirectoryError(f"refusing kernel directory {path}: not a directory (a symlink?); remove it")
    if info.st_uid != os.getuid():
        raise KernelDirectoryError(f"refusing kernel directory {path}: owned by uid {info.st_uid}, not by you")
    if info.st_mode & 0o077:
        raise KernelDirectoryError(
            f"refusing kernel directory {path}: mode {stat.S_IMODE(info.st_mode):o}, must be 700 "
            f"(chmod 700 {path}, or remove it)"
        )


def _sha256(file: BinaryIO) -> str:
    """SHA-256 of what ``file`` reads from its current position on."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _open_verified(target: Path) -> int | None:
    """An open descriptor of ``target`` if it is a regular file owned by the user, not writable by others, in
    a private directory, and its contents match the recorded SHA-256; else ``None``.

    Everything is checked through descriptors (the directory opened without following links, the file
    opened in it, its status and contents read from the open file), so what was checked is what the
    descriptor holds even if the paths change meanwhile; :class:`_Kernel` loads the library through it."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        dir_fd = os.open(target.parent, flags | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        _check_private(os.fstat(dir_fd), target.parent)
        with open(os.open(target.name + ".sha256", flags, dir_fd=dir_fd), "rb") as record:
            expected = record.read(256).decode("ascii", "replace").strip()
        fd = os.open(target.name, flags, dir_fd=dir_fd)
    except (OSError, KernelDirectoryError):
        return None
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        with open(os.dup(fd), "rb") as file:
            if _sha256(file) == expected:
                return fd
    os.close(fd)
    return None


def _verified(target: Path) -> bool:
    """Whether ``target`` passes :func:`_open_verified`."""
    fd = _open_verified(target)
    if fd is None:
        return False
    os.close(fd)
    return True


def _build(cxx: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The verified library for this source, compiler, flags and CPU: built into :func:`private_dir` under a
    file lock unless a verified build is there already.  ``extra_flags`` builds a variant (tests build the
    portable, non-AVX-512 one with ``-mno-avx512f``)."""
    from filelock import FileLock

    flags = (*_FLAGS, *extra_flags)
    source = _SOURCE.read_bytes() + _CODES_HEADER.read_bytes()
    key = hashlib.sha256(source + cxx.encode() + " ".join(flags).encode() + _machine_tag().encode()).hexdigest()
    out_dir = private_dir()
    target = out_dir / f"cpu_norm-{key[:16]}.so"
    if _verified(target):
        return target
    with FileLock(str(out_dir / "build.lock")):
        if _verified(target):  # another process built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        errors = []
        for openmp in (("-fopenmp",), ()):  # OpenMP shares torch's libgomp (same soname); without: one thread
            cmd = [cxx, *flags, *openmp, str(_SOURCE), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                with open(tmp, "rb") as file:
                    digest = _sha256(file)
                record = target.with_name(target.name + ".sha256")
                record_tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
                record_tmp.write_text(digest + "\n")
                os.replace(tmp, target)
                os.replace(record_tmp, record)
                if not _verified(target):
                    raise RuntimeError(f"the built kernel {target} does not match its recorded SHA-256")
                return target
            errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
        tmp.unlink(missing_ok=True)
    raise RuntimeError("compiling the fused norm kernel failed:\n" + "\n".join(errors))


_LOADS = itertools.count()


class _Kernel:
    """The loaded library: ``call`` releases the GIL (large inputs: other Python threads, e.g. a prefetching
    loader, keep running), ``call_holding_gil`` does not (small inputs: releasing and re-taking the GIL costs
    more than the kernel's own work at batch 1).  ``AttributeError`` if a symbol is missing."""

    def __init__(self, path: Path) -> None:
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        argtypes = [p, p, i64, i64, i64, i64, i32, i32, i32, i32, p, f64, p, p, i32, p, p, f64, p, i32, f64, i32, p]
        self.path = path
        fd = _open_verified(path)
        if fd is None:
            raise RuntimeError(f"{path} does not match its recorded SHA-256 (changed since it was built?)")
        try:
            # loaded through the verified descriptor where the system names one (Linux), so the file that
            # runs is the file that was hashed; elsewhere by its path in the private directory.  The loader
            # reuses an already loaded library of the same *name*, and descriptor numbers are reused: each
            # load spells its name differently ("./" steps), so only the file's identity can match
            source = (f"/proc/self/fd/{'./' * next(_LOADS)}{fd}" if os.path.isdir("/proc/self/fd")
                      else str(path))  # fmt: skip
            self.call = ctypes.CDLL(source).tta_fused_norm
            self.call_holding_gil = ctypes.PyDLL(source).tta_fused_norm
            self.fallbacks = ctypes.CDLL(source).tta_median_fallbacks
        finally:
            os.close(fd)
        for fn in (self.call, self.call_holding_gil):
            fn.argtypes = argtypes
            fn.restype = i32
        self.fallbacks.restype = i64


#: inputs with fewer elements call the kernel without releasing the GIL
HOLD_GIL_BELOW = 1 << 16


def build() -> str:
    """Build (or find) and load the kernel now, e.g. at install time (``tta-norm build-kernels``); the status.

    Raises ``RuntimeError`` when the kernel cannot be used (the reason), instead of falling back."""
    global _tried
    with _lock:
        _tried = False
    _load(strict=True)
    return _status


def _load(strict: bool = False) -> _Kernel | None:
    global _lib, _tried, _status
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        mode = os.environ.get(ENV_KERNELS, "auto").strip().lower()
        strict = strict or mode in ("1", "on", "true", "yes")
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
        except Exception as err:  # any failure to build, verify or load: the ATen path
            _lib = None
            _status = f"unavailable ({type(err).__name__}: {err}): ATen path"
            _tried = True
            if strict:
                raise RuntimeError(f"the fused norm kernel is unavailable: {err}") from err
            warnings.warn(f"tta_norm fused norm kernel {_status}", KernelWarning, stacklevel=3)
        _tried = True
        return _lib


_F32 = torch.float32


def extent(t: Tensor | None) -> int:
    """What Python declares to the kernel for an optional argument: 0 when absent, its element count when it
    is a contiguous float32 CPU tensor, else -1 (refused by the kernel)."""
    if t is None:
        return 0
    return t.numel() if t.dtype is _F32 and t.is_cpu and t.is_contiguous() else -1


class Arguments:
    """The optional tensors of one kernel call as the kernel reads them: their addresses (``ptrs``, in the
    order of :data:`ARG_SLOTS`) and declared element counts (``extents``, an int64 array whose address the
    kernel receives).  Built once per layout and reused while the addresses stay the same
    (:class:`tta_norm.norm.AdaptiveNorm` keeps one per layer)."""

    __slots__ = ("ptrs", "extents", "extents_ptr", "ok")

    def __init__(self, tensors: tuple[Tensor | None, ...], channels: int) -> None:
        if len(tensors) != len(ARG_SLOTS):
            raise ValueError(f"expected {len(ARG_SLOTS)} optional tensors, got {len(tensors)}")
        self.ptrs = tuple(None if t is None else t.data_ptr() for t in tensors)
        counts = [extent(t) for t in tensors]
        self.extents = torch.tensor(counts, dtype=torch.int64)
        self.extents_ptr = self.extents.data_ptr()
        wants = [2 * channels if slot == ARG_SLOTS["stats_out"] else channels for slot in range(len(counts))]
        self.ok = all(n == 0 or n == want for n, want in zip(counts, wants, strict=True))


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
    if x.numel() == 0:
        return None
    c = x.shape[1]
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    if rule and (ref_mean is None or ref_var is None):
        raise ValueError("mixing with reference statistics needs ref_mean and ref_var")
    if stats_out is not None and extent(stats_out) != 2 * c:
        raise ValueError("stats_out must be a contiguous float32 CPU tensor of shape (2, C)")
    args = Arguments((alpha_t, ref_mean, ref_var, weight, bias, stats_out), c)
    if not args.ok:
        return None
    if commit and rule == _EMA:
        for t in (ref_mean, ref_var):
            torch.autograd.graph.increment_version(t)
    return launch(
        lib, x, estimator, rule, args, 0.0 if alpha_t is not None else alpha, commit, eps, unbiased,
        average_median, instance, instance_param,
    )  # fmt: skip


def kernel() -> _Kernel | None:
    """The loaded kernel (building it on first use), or ``None`` when it is unavailable or disabled."""
    return _lib if _tried else _load()


def launch(
    lib: _Kernel,
    x: Tensor,
    estimator: int,
    rule: int,
    args: Arguments,
    alpha: float,
    commit: bool,
    eps: float,
    unbiased: bool,
    average_median: bool,
    instance: int,
    instance_param: float,
    stats_out: Tensor | None = None,
) -> Tensor:
    """The kernel call itself: ``x`` must be a non-empty contiguous float32 CPU tensor (the caller checks);
    the optional tensors come as :class:`Arguments`, whose declared element counts the kernel checks against
    the shape (a mismatch raises ``ValueError`` before any memory is touched).  For callers that keep their
    :class:`Arguments` across calls (:class:`tta_norm.norm.AdaptiveNorm`); everyone else uses
    :func:`fused_norm`.  ``stats_out`` replaces the address of the declared ``stats_out`` (a fresh ``(2, C)``
    float32 tensor of the caller's)."""
    n, c = x.shape[0], x.shape[1]
    numel = x.numel()
    out = torch.empty_like(x)
    alpha_p, mean_p, var_p, weight_p, bias_p, stats_p = args.ptrs
    if stats_out is not None:
        stats_p = stats_out.data_ptr()
    call = lib.call_holding_gil if numel < HOLD_GIL_BELOW else lib.call
    rc = call(
        x.data_ptr(), out.data_ptr(), numel, n, c, numel // (n * c), estimator, unbiased, average_median, rule,
        alpha_p, alpha, mean_p, var_p, commit, weight_p, bias_p, eps, stats_p, instance, instance_param,
        torch.get_num_threads(), args.extents_ptr,
    )  # fmt: skip
    if rc != 0:
        raise ValueError(
            f"fused norm kernel refused its arguments ({_STATUS_NAMES.get(rc, rc)}): shape {tuple(x.shape)}, "
            f"declared element counts {args.extents.tolist()}"
        )
    return out
