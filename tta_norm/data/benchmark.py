"""Corruption benchmarks (CIFAR-10-C, CIFAR-100-C, ImageNet-C) as a set of domains keyed by (corruption, severity).

Where the images come from (recorded per domain in :attr:`CorruptionBenchmark.provenance`):

- ``release``: the released files found in the data search list (:mod:`tta_norm.data.paths`): a CIFAR-C
  directory (``CIFAR-10-C/``, ``CIFAR-100-C/``; the ``.npy`` layout of REFERENCE part 3, section 3.1) or an
  ``ImageNet-C/`` folder tree. Every requested file is validated before any data is read.
- ``regenerated``: no release on disk, so the domain is built from the clean test set with the project's
  ``corruptions`` package (``corrupt(images, name, severity, seed, preset)``) and cached under
  ``<cache>/data/regenerated/<dataset>-<clean fingerprint>/<preset>-seed<seed>-<generator hash>/``.
  Generation runs in chunks of :data:`CHUNK` images with a seed derived from (seed, corruption, severity,
  chunk), so the result does not depend on how many images were asked for; a fully generated domain is
  consolidated into one memory-mapped ``<corruption>-s<severity>.npy``. Regenerated data follows the release's
  distribution, not its pixels (the original generator was unseeded: REFERENCE part 3, section 1.1).
- ``clean``: the clean test set itself (key ``("clean", 0)``), used for clean-interleaved streams. For
  CIFAR-10 this is torchvision's ``cifar-10-batches-py`` test split if present, otherwise the JPEG mirror's
  ``cifar10-jpeg/test`` (this team's machines).

Downloading the release (Zenodo, :func:`download_cifar_c`) is opt-in (``download=True``) and fails with a clear
message when offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tta_norm.data.paths import data_cache_dir, describe_search, find_dataset_dir
from tta_norm.data.readers import (
    ArrayDataset,
    DataFormatError,
    _atomic_save,
    check_cifar_c,
    is_cifar10_python,
    is_cifar100_python,
    is_cifar_c,
    is_image_folder_split,
    npy_header,
    read_cifar10_python,
    read_cifar100_python,
    read_cifar_c,
    read_image_folder,
    read_imagenet_c,
)

DomainKey = tuple[str, int]
CLEAN: DomainKey = ("clean", 0)

# benchmark order of Hendrycks & Dietterich (2019), used by Marsden & Doebler's `continual` setting
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

CHUNK = 1000
DATASETS = ("cifar10", "cifar100", "imagenet")
RELEASE_DIRS = {
    "cifar10": ("CIFAR-10-C", "cifar10-c", "cifar10_c"),
    "cifar100": ("CIFAR-100-C", "cifar100-c", "cifar100_c"),
    "imagenet": ("ImageNet-C", "imagenet-c", "imagenet_c"),
}
ZENODO = {"cifar10": ("2535967", "CIFAR-10-C.tar"), "cifar100": ("3555552", "CIFAR-100-C.tar")}


@dataclass
class CorruptionBenchmark:
    """Domains of one benchmark. ``domains[(corruption, severity)]`` are uint8 NHWC images + int64 labels."""

    dataset: str
    domains: dict[DomainKey, ArrayDataset]
    provenance: dict[DomainKey, str]
    clean_source: str | None = None
    notes: list[str] = field(default_factory=list)

    def labels(self) -> dict[DomainKey, np.ndarray]:
        return {k: d.labels for k, d in self.domains.items()}

    @property
    def regenerated(self) -> bool:
        return any(v == "regenerated" for v in self.provenance.values())

    def describe(self) -> str:
        """One line per provenance kind, e.g. ``cifar10: 15 domains regenerated (cache ...)``."""
        kinds: dict[str, int] = {}
        for v in self.provenance.values():
            kinds[v] = kinds.get(v, 0) + 1
        parts = [f"{n} {kind}" for kind, n in sorted(kinds.items())]
        return f"{self.dataset}: " + ", ".join(parts) + "".join(f"; {n}" for n in self.notes)


# ------------------------------------------------------------------------------------------------ clean test sets


def load_clean_test_set(dataset: str = "cifar10", data_dir: str | os.PathLike | None = None) -> ArrayDataset:
    """The clean test split: ``cifar-10-batches-py`` / ``cifar-100-python``, else (CIFAR-10) the JPEG mirror."""
    if dataset == "cifar10":
        root = find_dataset_dir(["cifar-10-batches-py"], is_cifar10_python, data_dir)
        if root is not None:
            return read_cifar10_python(root, "test")
        root = find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, data_dir)
        if root is not None and (root / "test").is_dir():
            return read_image_folder(root / "test")
    elif dataset == "cifar100":
        root = find_dataset_dir(["cifar-100-python"], is_cifar100_python, data_dir)
        if root is not None:
            return read_cifar100_python(root, "test")
    else:
        raise ValueError(f"no clean test set reader for {dataset!r}")
    raise FileNotFoundError(f"no clean {dataset} test set found; {describe_search(data_dir)}")


# ------------------------------------------------------------------------------------------------- regeneration


def _get_corrupt():
    try:
        import corruptions
    except ImportError as err:
        raise RuntimeError(f"cannot regenerate corruptions: the 'corruptions' package is missing ({err})") from err
    fn = getattr(corruptions, "corrupt", None)
    if not callable(fn):
        raise RuntimeError(
            "cannot regenerate the corruption benchmark: corruptions.corrupt is not available (the corruptions "
            "package does not provide it yet). Put the released files (e.g. CIFAR-10-C/<corruption>.npy + "
            "labels.npy) in a data directory instead, or pass download=True on a machine with internet access."
        )
    return fn


def _generator_hash() -> str:
    """Hash of the ``corruptions`` package sources: a changed generator never reuses stale cached images."""
    import corruptions

    h = hashlib.sha1(str(getattr(corruptions, "__version__", "")).encode())
    for base in getattr(corruptions, "__path__", []):
        for path in sorted(Path(base).rglob("*")):
            if path.suffix in (".py", ".npy", ".png", ".jpg") and path.is_file():
                h.update(path.relative_to(base).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:10]


def chunk_seed(seed: int, corruption: str, severity: int, chunk: int) -> int:
    """Seed for one generated chunk: a function of (seed, corruption, severity, chunk index) only."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(corruption.encode()), int(severity), int(chunk)])
    return int(ss.generate_state(1)[0])


def _fingerprint(data: ArrayDataset) -> str:
    h = hashlib.sha1(np.ascontiguousarray(data.images).data)
    h.update(np.ascontiguousarray(data.labels).data)
    return h.hexdigest()[:12]


def regenerate_domain(
    clean: ArrayDataset,
    corruption: str,
    severity: int,
    directory: Path,
    *,
    seed: int = 0,
    preset: str = "cifar",
    n: int | None = None,
    corrupt=None,
    progress=None,
) -> ArrayDataset:
    """Images of ``corruption`` at ``severity`` for the first ``n`` (default all) clean images, from the cache
    in ``directory`` or generated (and cached) now. ``progress``: an optional tqdm bar updated per image."""
    n_all = len(clean)
    n = n_all if n is None else min(n, n_all)
    final = directory / f"{corruption}-s{severity}.npy"
    if final.is_file():
        try:
            shape, _, _ = npy_header(final)
            if shape[0] == n_all:
                arr = np.load(final, mmap_mode="r")
                return ArrayDataset(arr[:n], clean.labels[:n], clean.classes, "regenerated", {"file": str(final)})
        except DataFormatError:
            pass  # truncated cache entry: regenerate
    corrupt = corrupt or _get_corrupt()
    directory.mkdir(parents=True, exist_ok=True)
    n_chunks_all = -(-n_all // CHUNK)
    parts = []
    for i in range(-(-n // CHUNK)):
        path = directory / f"{corruption}-s{severity}.chunk{i:04d}.npy"
        lo, hi = i * CHUNK, min((i + 1) * CHUNK, n_all)
        arr = None
        if path.is_file():
            try:
                arr = np.load(path)
                if arr.shape != (hi - lo,) + clean.images.shape[1:]:
                    arr = None
            except (ValueError, OSError):
                arr = None
        if arr is None:
            src = np.ascontiguousarray(clean.images[lo:hi])
            arr = corrupt(src, corruption, severity=severity, seed=chunk_seed(seed, corruption, severity, i),
                          preset=preset)  # fmt: skip
            arr = np.asarray(arr)
            if arr.dtype != np.uint8 or arr.shape != src.shape:
                raise RuntimeError(
                    f"corruptions.corrupt({corruption!r}, severity={severity}) returned {arr.dtype} {arr.shape}, "
                    f"expected uint8 {src.shape}"
                )
            _atomic_save(path, arr)
            if progress is not None:
                progress.update(hi - lo)
        parts.append(arr)
    chunk_files = [directory / f"{corruption}-s{severity}.chunk{i:04d}.npy" for i in range(n_chunks_all)]
    if n == n_all and all(p.is_file() for p in chunk_files):
        _atomic_save(final, np.concatenate(parts))
        for p in chunk_files:
            p.unlink()
        arr = np.load(final, mmap_mode="r")
        return ArrayDataset(arr, clean.labels, clean.classes, "regenerated", {"file": str(final)})
    images = np.concatenate(parts)[:n]
    return ArrayDataset(images, clean.labels[:n], clean.classes, "regenerated", {"dir": str(directory)})


# ------------------------------------------------------------------------------------------------ the benchmark


def load_corruption_benchmark(
    dataset: str = "cifar10",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (5,),
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    include_clean: bool = False,
    n_examples: int | None = None,
    seed: int = 0,
    preset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    imagenet_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> CorruptionBenchmark:
    """Domains ``(corruption, severity)`` of ``dataset`` (``cifar10``, ``cifar100``, ``imagenet``).

    ``source``: ``"auto"`` (release if found, else regenerate), ``"release"`` (error if absent) or
    ``"regenerate"`` (always from the clean test set; CIFAR only). ``n_examples``: keep the first n test images
    of every domain (the same images in each). ``include_clean`` adds the clean test set as ``("clean", 0)``.
    ``seed`` / ``preset`` only matter for regeneration (preset defaults to ``"cifar"`` / ``"imagenet"``).
    All inputs are validated before any long work starts."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if source not in ("auto", "release", "regenerate"):
        raise ValueError(f"source must be 'auto', 'release' or 'regenerate', got {source!r}")
    corruptions = list(corruptions)
    severities = [int(s) for s in severities]
    if not corruptions or len(set(corruptions)) != len(corruptions):
        raise ValueError(f"need distinct corruption names, got {corruptions}")
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad:
        raise ValueError(f"severities must be in 1..5, got {bad}")
    severities = list(dict.fromkeys(severities))

    release = None
    if source != "regenerate":
        release = find_dataset_dir(RELEASE_DIRS[dataset], _release_check(dataset), data_dir)
        if release is None and download:
            if dataset == "imagenet":
                raise ValueError("ImageNet-C download is not supported; place ImageNet-C/ in a data directory")
            release = download_cifar_c(dataset, Path(data_dir) if data_dir is not None else data_cache_dir())
    if release is None and (source == "release" or dataset == "imagenet"):
        raise FileNotFoundError(
            f"{dataset} corruption release ({'/'.join(RELEASE_DIRS[dataset])}) not found; "
            f"{describe_search(data_dir)}"
            + ("" if dataset == "imagenet" else "; use source='auto' to regenerate it from the clean test set")
        )

    domains: dict[DomainKey, ArrayDataset] = {}
    provenance: dict[DomainKey, str] = {}
    notes: list[str] = []
    clean = None
    if release is not None and dataset == "imagenet":
        for c in corruptions:
            for s in severities:
                if not (release / c / str(s)).is_dir():
                    raise FileNotFoundError(f"ImageNet-C release {release} lacks {c}/{s}/")
        for c in corruptions:
            for s in severities:
                domains[(c, s)] = read_imagenet_c(release, c, s, ids=imagenet_ids, progress=progress).head(n_examples)
                provenance[(c, s)] = "release"
        notes.append(f"release {release}")
    elif release is not None:
        check_cifar_c(release, corruptions)  # every file validated before reading any
        for c in corruptions:
            for s, ds in read_cifar_c(release, c, severities).items():
                domains[(c, s)] = ds.head(n_examples)
                provenance[(c, s)] = "release"
        notes.append(f"release {release}")
    else:
        corrupt = _get_corrupt()  # fail before loading anything if the generator is missing
        clean = load_clean_test_set(dataset, data_dir)
        known = _known_corruptions()
        unknown = [c for c in corruptions if known is not None and c not in known]
        if unknown:
            raise ValueError(f"corruptions unknown to the corruptions package: {unknown}")
        directory = Path(cache_dir) if cache_dir is not None else data_cache_dir() / "regenerated"
        preset = preset or ("imagenet" if dataset == "imagenet" else "cifar")
        directory = directory / f"{dataset}-{_fingerprint(clean)}" / f"{preset}-seed{seed}-{_generator_hash()}"
        directory.mkdir(parents=True, exist_ok=True)
        _write_meta(directory, dataset, clean, seed, preset)
        n = len(clean) if n_examples is None else min(n_examples, len(clean))
        from tqdm.auto import tqdm

        todo = [(c, s) for c in corruptions for s in severities]
        with tqdm(total=_missing_images(directory, todo, n, len(clean)), unit="img", disable=not progress,
                  desc=f"regenerating {dataset}-C (cached in {directory})") as bar:  # fmt: skip
            for c, s in todo:
                domains[(c, s)] = regenerate_domain(
                    clean, c, s, directory, seed=seed, preset=preset, n=n, corrupt=corrupt, progress=bar
                )
                provenance[(c, s)] = "regenerated"
        notes.append(f"regenerated from {clean.source} with seed {seed}, preset {preset!r}, cache {directory}")
    if include_clean:
        clean = clean or load_clean_test_set(dataset, data_dir)
        domains[CLEAN] = clean.head(n_examples)
        provenance[CLEAN] = "clean"
    return CorruptionBenchmark(dataset, domains, provenance, clean.source if clean is not None else None, notes)


def _release_check(dataset: str):
    if dataset == "imagenet":
        return lambda p: p.name.lower().replace("_", "-") == "imagenet-c" and any(q.is_dir() for q in p.iterdir())
    return is_cifar_c


def _known_corruptions() -> set[str] | None:
    import corruptions

    names = set(getattr(corruptions, "CORRUPTIONS", ())) | set(getattr(corruptions, "EXTRA_CORRUPTIONS", ()))
    return names or None


def _missing_images(directory: Path, todo, n: int, n_all: int) -> int:
    total = 0
    for c, s in todo:
        if (directory / f"{c}-s{s}.npy").is_file():
            continue
        for i in range(-(-n // CHUNK)):
            if not (directory / f"{c}-s{s}.chunk{i:04d}.npy").is_file():
                total += min((i + 1) * CHUNK, n_all) - i * CHUNK
    return total


def _write_meta(directory: Path, dataset: str, clean: ArrayDataset, seed: int, preset: str) -> None:
    meta = directory / "meta.json"
    if not meta.is_file():
        tmp = directory / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"dataset": dataset, "clean_source": clean.source, "n": len(clean),
                                   "seed": seed, "preset": preset, "chunk": CHUNK}, indent=1))  # fmt: skip
        os.replace(tmp, meta)


# ---------------------------------------------------------------------------------------------------- download


def download_cifar_c(dataset: str, dest: str | os.PathLike, *, timeout: float = 30.0) -> Path:
    """Download and extract the CIFAR-10-C / CIFAR-100-C release from Zenodo into ``dest`` (opt-in).

    Checks the MD5 published by the Zenodo API. Raises ``RuntimeError`` with a clear message when offline."""
    import tarfile
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    record, fname = ZENODO[dataset]
    dest = Path(dest)
    api = f"https://zenodo.org/api/records/{record}"
    try:
        with urllib.request.urlopen(api, timeout=timeout) as r:
            info = json.load(r)
        entry = next(f for f in info["files"] if f["key"] == fname)
        url, checksum = entry["links"]["self"], entry.get("checksum", "")
        dest.mkdir(parents=True, exist_ok=True)
        tar_path = dest / fname
        md5 = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tar_path.with_suffix(".part"), "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {fname}") as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    md5.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError, StopIteration, KeyError) as err:
        raise RuntimeError(
            f"could not download {fname} from Zenodo record {record} ({err}). This machine may be offline: "
            f"place the extracted {RELEASE_DIRS[dataset][0]}/ directory in a data directory instead, or let the "
            "harness regenerate the benchmark from the clean test set (source='auto')."
        ) from err
    if checksum.startswith("md5:") and md5.hexdigest() != checksum[4:]:
        raise RuntimeError(f"MD5 mismatch for {fname}: got {md5.hexdigest()}, expected {checksum[4:]}")
    os.replace(tar_path.with_suffix(".part"), tar_path)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    root = dest / RELEASE_DIRS[dataset][0]
    if not is_cifar_c(root):
        raise RuntimeError(f"extracted {fname} but {root}/labels.npy is missing")
    return root
