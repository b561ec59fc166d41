"""Corruption benchmarks (CIFAR-10-C, CIFAR-100-C, ImageNet-C) as a set of domains keyed by (corruption, severity).

Where the images come from (recorded per domain in :attr:`CorruptionBenchmark.provenance`):

- ``release``: the released files found in the data search list (:mod:`tta_norm.data.paths`): a CIFAR-C
  directory (``CIFAR-10-C/``, ``CIFAR-100-C/``; the ``.npy`` layout of REFERENCE part 3, section 3.1) or an
  ``ImageNet-C/`` folder tree. Every requested file is validated before any data is read.
- ``regenerated``: no release on disk, so the domain is built from the clean test set with the project's
  ``corruptions`` package (``corrupt(images, name, severity, seed, preset)``) and cached under
  ``<cache>/data/regenerated/<dataset>-<clean fingerprint>/<preset>-seed<seed>-<generator hash>/`` as one
  memory-mapped ``<corruption>-s<severity>.npy`` per domain. Each domain is one ``corrupt`` call over the whole
  clean set with ``seed``, i.e. the same rows ``corruptions.write_cifar_c`` writes with that seed (``n_examples``
  only trims what is returned, so quick runs and full runs share the cache). Regenerated data follows the
  release's distribution, not its pixels (the original generator was unseeded: REFERENCE part 3, 1.1).
- natural-shift sets (``imagenet_r``, ``imagenet_a``, ``imagenet_sketch``; :mod:`tta_norm.data.natural`): one
  ``release`` domain named after the dataset.
- ``clean``: the clean test set itself (key ``("clean", 0)``), used for clean-interleaved streams. For
  CIFAR-10 this is torchvision's ``cifar-10-batches-py`` test split if present, otherwise the JPEG mirror's
  ``cifar10-jpeg/test``.

Downloading the release (Zenodo, :func:`download_cifar_c`) is opt-in (``download=True``) and fails with a clear
message when offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tta_norm.data.natural import NaturalShift, find_natural_shift, natural_shift, read_natural_shift
from tta_norm.data.paths import data_cache_dir, describe_search, download_dir, find_dataset_dir
from tta_norm.data.readers import (
    CIFAR10_CLASSES,
    ArrayDataset,
    DataFormatError,
    _atomic_save,
    check_cifar_c,
    is_cifar10_python,
    is_cifar100_python,
    is_cifar_c,
    is_image_folder_split,
    list_image_folder,
    npy_header,
    read_cifar10_python,
    read_cifar100_python,
    read_cifar_c,
    read_image_folder,
    read_imagenet_c,
)
from tta_norm.data.subsets import read_image_ids, stratified_subset

DomainKey = tuple[str, int]
CLEAN: DomainKey = ("clean", 0)

# benchmark order of Hendrycks & Dietterich (2019), used by Marsden & Doebler's `continual` setting
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

DATASETS = ("cifar10", "cifar100", "imagenet", "imagenet_r", "imagenet_a", "imagenet_sketch")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def dataset_classes(dataset: str) -> int:
    """The number of classes benchmark ``dataset`` is scored on (labels ``0..n-1``; ImageNet-R/A: 200)."""
    shift = natural_shift(dataset)
    return len(shift.wnids) if shift is not None else NUM_CLASSES[dataset]


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


def load_clean_test_set(
    dataset: str = "cifar10", data_dir: str | os.PathLike | None = None, progress: bool = True
) -> ArrayDataset:
    """The clean test split: ``cifar-10-batches-py`` / ``cifar-100-python``, else (CIFAR-10) the JPEG mirror
    (``progress``: a bar while its images are decoded)."""
    if dataset == "cifar10":
        root = find_dataset_dir(["cifar-10-batches-py"], is_cifar10_python, data_dir)
        if root is not None:
            return read_cifar10_python(root, "test")
        root = find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, data_dir)
        if root is not None and (root / "test").is_dir():
            named = {c: i for i, c in enumerate(CIFAR10_CLASSES)}  # labelled by folder name, not position
            return _interleave_classes(read_image_folder(root / "test", class_index=named, progress=progress))
    elif dataset == "cifar100":
        root = find_dataset_dir(["cifar-100-python"], is_cifar100_python, data_dir)
        if root is not None:
            return read_cifar100_python(root, "test")
    else:
        raise ValueError(f"no clean test set reader for {dataset!r}")
    raise FileNotFoundError(f"no clean {dataset} test set found; {describe_search(data_dir)}")


def _interleave_classes(data: ArrayDataset) -> ArrayDataset:
    """A fixed (seed 0) permutation of an ImageFolder test set, whose files come sorted by class.

    CIFAR's own test split is in random class order, so its first n images (``n_examples``) are a fair
    sample; a class-sorted folder's first n images would all be one class.  The permutation makes any prefix of
    the mirror a seeded random, roughly class-balanced sample, the same for every domain and run."""
    order = np.random.default_rng(0).permutation(len(data))
    return data.subset(order)


# ------------------------------------------------------------------------------------------------- regeneration


def _get_corrupt():
    try:
        import corruptions
    except ImportError as err:
        raise RuntimeError(f"cannot regenerate corruptions: the 'corruptions' package is missing ({err})") from err
    fn = getattr(corruptions, "corrupt", None)
    if not callable(fn):
        raise RuntimeError(
            "cannot regenerate the corruption benchmark: the installed corruptions package has no "
            "corrupt() function. Put the released files (e.g. CIFAR-10-C/<corruption>.npy + "
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
) -> ArrayDataset:
    """``corruption`` at ``severity`` applied to the whole clean set (one ``corrupt`` call with ``seed``), cached
    as ``directory/<corruption>-s<severity>.npy`` and memory-mapped; the first ``n`` rows are returned.

    The rows equal those :func:`corruptions.write_cifar_c` writes for the same images, seed and preset, so a
    regenerated domain and a release written by the ``corruptions`` command are interchangeable."""
    n_all = len(clean)
    path = directory / f"{corruption}-s{severity}.npy"
    shape = (n_all,) + tuple(clean.images.shape[1:])
    if path.is_file():
        try:
            if npy_header(path)[0] == shape:
                arr = np.load(path, mmap_mode="r")
                return ArrayDataset(arr, clean.labels, clean.classes, "regenerated", {"file": str(path)}).head(n)
        except DataFormatError:
            pass  # truncated cache entry: regenerate it
    corrupt = corrupt or _get_corrupt()
    src = np.ascontiguousarray(clean.images)
    arr = np.asarray(corrupt(src, corruption, severity=int(severity), seed=int(seed), preset=preset))
    if arr.dtype != np.uint8 or arr.shape != src.shape:
        raise RuntimeError(
            f"corruptions.corrupt({corruption!r}, severity={severity}) returned {arr.dtype} {arr.shape}, "
            f"expected uint8 {src.shape}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(path, arr)
    arr = np.load(path, mmap_mode="r")
    return ArrayDataset(arr, clean.labels, clean.classes, "regenerated", {"file": str(path)}).head(n)


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
    imagenet_ids: Sequence[str] | str | None = None,
    progress: bool = True,
) -> CorruptionBenchmark:
    """Domains ``(corruption, severity)`` of ``dataset`` (``cifar10``, ``cifar100``, ``imagenet``, or a
    natural-shift set ``imagenet_r`` / ``imagenet_a`` / ``imagenet_sketch``).

    ``source``: ``"auto"`` (release if found, else regenerate), ``"release"`` (error if absent) or
    ``"regenerate"`` (always from the clean test set; CIFAR only). ``n_examples``: for CIFAR the first n test
    images of every domain (the clean sets are in random class order); for ImageNet-C and the natural-shift
    sets a class-stratified subset drawn with ``seed`` before decoding, or with ``imagenet_ids`` (a list of
    ``"wnid/file"``, a list file, or ``"robustbench"`` for the installed robustbench's 5,000-image list) the
    first n ids in list order.  The same images are used in every domain.  ``include_clean`` adds the clean
    test set as ``("clean", 0)``.  ``seed`` also seeds regeneration; ``preset`` only matters for
    regeneration (default ``"cifar"`` / ``"imagenet"``).  A natural-shift set is one domain per severity
    (the same images; severities do not apply) named after the dataset: ``corruptions`` must be
    ``[dataset]`` (the default 15-corruption list is replaced by it).  All inputs are validated before any
    long work starts."""
    shift = natural_shift(dataset)
    if shift is not None:
        return _load_natural_shift_benchmark(shift, corruptions, severities, data_dir=data_dir, source=source,
                                             include_clean=include_clean, n_examples=n_examples, seed=seed,
                                             imagenet_ids=imagenet_ids, progress=progress)  # fmt: skip
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
        release = _find_release(dataset, data_dir)
        if release is None and download:
            if dataset == "imagenet":
                raise ValueError("ImageNet-C download is not supported; place ImageNet-C/ in a data directory")
            release = download_cifar_c(dataset, download_dir(data_dir))
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
        ids = read_image_ids(imagenet_ids) if isinstance(imagenet_ids, (str, os.PathLike)) else imagenet_ids
        if ids is not None:
            ids = list(ids)[:n_examples]
            if len(set(ids)) != len(ids):
                raise ValueError("imagenet_ids: an image id is listed twice (it would be scored twice)")
            subset = f"{len(ids)} listed images"
        else:
            ids, subset = imagenet_c_subset(release / corruptions[0] / str(severities[0]), n_examples, seed)
        for c in corruptions:
            for s in severities:
                domains[(c, s)] = read_imagenet_c(release, c, s, ids=ids, progress=progress)
                domains[(c, s)].info["subset"] = subset
                provenance[(c, s)] = "release"
        notes.append(f"release {release}, the same {subset} in every domain")
    elif release is not None:
        check_cifar_c(release, corruptions, severities)  # every file validated before reading any
        for c in corruptions:
            for s, ds in read_cifar_c(release, c, severities).items():
                domains[(c, s)] = ds.head(n_examples)
                provenance[(c, s)] = "release"
        notes.append(f"release {release}")
    else:
        corrupt = _get_corrupt()  # fail before loading anything if the generator is missing
        clean = load_clean_test_set(dataset, data_dir, progress)
        known = _known_corruptions()
        unknown = [c for c in corruptions if known is not None and c not in known]
        if unknown:
            raise ValueError(f"corruptions unknown to the corruptions package: {unknown}")
        directory = Path(cache_dir) if cache_dir is not None else data_cache_dir() / "regenerated"
        preset = preset or ("imagenet" if dataset == "imagenet" else "cifar")
        directory = directory / f"{dataset}-{_fingerprint(clean)}" / f"{preset}-seed{seed}-{_generator_hash()}"
        directory.mkdir(parents=True, exist_ok=True)
        _write_meta(directory, dataset, clean, seed, preset)
        from tqdm.auto import tqdm

        todo = [(c, s) for c in corruptions for s in severities]
        missing = [k for k in todo if not (directory / f"{k[0]}-s{k[1]}.npy").is_file()]
        with tqdm(total=len(missing) * len(clean), unit="img", disable=not progress or not missing,
                  desc=f"regenerating {dataset}-C (cached in {directory})") as bar:  # fmt: skip
            for c, s in todo:
                domains[(c, s)] = regenerate_domain(
                    clean, c, s, directory, seed=seed, preset=preset, n=n_examples, corrupt=corrupt
                )
                provenance[(c, s)] = "regenerated"
                if (c, s) in missing:
                    bar.update(len(clean))
        notes.append(f"regenerated from {clean.source} with seed {seed}, preset {preset!r}, cache {directory}")
    if include_clean:
        clean = clean or load_clean_test_set(dataset, data_dir, progress)
        domains[CLEAN] = clean.head(n_examples)
        provenance[CLEAN] = "clean"
    _check_label_range(dataset, domains)
    return CorruptionBenchmark(dataset, domains, provenance, clean.source if clean is not None else None, notes)


def resolve_benchmark_source(
    dataset: str = "cifar10",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (5,),
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
    imagenet_ids: Sequence[str] | str | None = None,
) -> str:
    """Where :func:`load_corruption_benchmark` would take the data from, checked without reading or decoding
    any image: a one-line description (``"imagenet: release /data/ImageNet-C"``, ``"cifar10: regenerated
    from /data/cifar10-jpeg"``) or a one-line ``ValueError`` / ``FileNotFoundError``.  For a config's
    dry run."""
    shift = natural_shift(dataset)
    if shift is not None:
        _check_natural_shift_request(shift, corruptions, source, imagenet_ids)
        return f"{shift.name}: release {find_natural_shift(shift.name, data_dir)} ({len(shift.wnids)} classes)"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if source not in ("auto", "release", "regenerate"):
        raise ValueError(f"source must be 'auto', 'release' or 'regenerate', got {source!r}")
    release = None
    if source != "regenerate":
        release = _find_release(dataset, data_dir)
    if dataset == "imagenet":
        if release is None:
            raise FileNotFoundError(f"imagenet corruption release ({'/'.join(RELEASE_DIRS[dataset])}) not found; "
                                    f"{describe_search(data_dir)}")  # fmt: skip
        missing = [f"{c}/{s}" for c in corruptions for s in severities if not (release / c / str(s)).is_dir()]
        if missing:
            raise FileNotFoundError(f"ImageNet-C release {release} lacks {', '.join(missing[:5])}")
        if isinstance(imagenet_ids, (str, os.PathLike)):
            n_ids = len(read_image_ids(imagenet_ids))
            return f"imagenet: release {release}, {n_ids} listed images ({imagenet_ids})"
        return f"imagenet: release {release}"
    if release is not None:
        check_cifar_c(release, list(corruptions), severities)
        return f"{dataset}: release {release}"
    if source == "release":
        raise FileNotFoundError(f"{dataset} corruption release ({'/'.join(RELEASE_DIRS[dataset])}) not found; "
                                f"{describe_search(data_dir)}")  # fmt: skip
    _get_corrupt()
    names = {"cifar10": (["cifar-10-batches-py"], is_cifar10_python), "cifar100": (["cifar-100-python"],
             is_cifar100_python)}  # fmt: skip
    root = find_dataset_dir(*names[dataset], data_dir)
    if root is None and dataset == "cifar10":
        root = find_dataset_dir(["cifar10-jpeg"], is_image_folder_split, data_dir)
    if root is None:
        raise FileNotFoundError(f"no clean {dataset} test set to regenerate from; {describe_search(data_dir)}")
    return f"{dataset}: regenerated from {root}"


def _check_natural_shift_request(shift: NaturalShift, corruptions: Sequence[str], source: str, imagenet_ids) -> None:
    """What a natural-shift set cannot be asked for (checked alike by the loader and the dry run)."""
    names = list(corruptions)
    if names not in ([shift.name], list(CORRUPTIONS)):
        raise ValueError(f"{shift.name} is one domain: corruptions must be [{shift.name}], got {names}")
    if source == "regenerate":
        raise ValueError(f"{shift.name} cannot be regenerated: use source 'auto' or 'release'")
    if imagenet_ids is not None:
        raise ValueError("imagenet_ids selects ImageNet-C images; natural-shift sets use n_examples")


def _load_natural_shift_benchmark(
    shift: NaturalShift, corruptions: Sequence[str], severities: Sequence[int], *, data_dir, source: str,
    include_clean: bool, n_examples: int | None, seed: int, imagenet_ids, progress: bool,
) -> CorruptionBenchmark:  # fmt: skip
    _check_natural_shift_request(shift, corruptions, source, imagenet_ids)
    if include_clean:
        raise ValueError(f"{shift.name} has no clean test set to interleave: set clean_interleaved false")
    severities = list(dict.fromkeys(int(s) for s in severities))
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad or not severities:
        raise ValueError(f"severities must be in 1..5, got {bad or severities}")
    root = find_natural_shift(shift.name, data_dir)
    data = read_natural_shift(shift.name, root, n_examples=n_examples, seed=seed, progress=progress)
    domains = {(shift.name, s): data for s in severities}
    provenance = dict.fromkeys(domains, "release")
    n_classes = len(shift.wnids)
    return CorruptionBenchmark(shift.name, domains, provenance, None,
                               [f"release {root}, {n_classes} classes, {data.info.get('subset', 'all images')}"])


def imagenet_c_subset(folder: Path, n_examples: int | None, seed: int) -> tuple[list[str], str]:
    """The ``"wnid/file"`` ids every ImageNet-C domain reads, taken from one domain's ``folder``: all its files,
    or a seeded class-stratified subset of ``n_examples`` (:func:`~tta_norm.data.subsets.stratified_subset`),
    and a description.  Every domain then reads exactly these files, so a domain that lacks one is an error,
    never a different subset (a partly extracted release would otherwise score each corruption on other
    images)."""
    from tta_norm.data.imagenet_classes import imagenet_index

    files, labels, _ = list_image_folder(folder, class_index=imagenet_index())
    if n_examples is not None and n_examples < len(files):
        pick, subset = stratified_subset(labels, n_examples, seed), f"stratified n={n_examples} seed={seed}"
    else:
        pick, subset = np.arange(len(files)), f"all {len(files)} images"
    return [f"{files[i].parent.name}/{files[i].name}" for i in pick], subset


def _check_label_range(dataset: str, domains: dict[DomainKey, ArrayDataset]) -> None:
    """Labels outside ``0..classes-1`` would be scored as plain errors: refuse them (another dataset's files).
    A CIFAR domain of at least 10 images per class that holds fewer than half of the classes is refused too: a
    CIFAR-10-C release read as CIFAR-100-C (labels 0..9 are in range) would be scored without a word."""
    n_classes = NUM_CLASSES[dataset]
    for key, data in domains.items():
        labels = np.asarray(data.labels)
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataFormatError(f"{dataset} {key[0]}: labels span {labels.min()}..{labels.max()}, outside "
                                  f"0..{n_classes - 1} ({data.source}); files of another dataset?")  # fmt: skip
        present = len(np.unique(labels))
        if dataset in ("cifar10", "cifar100") and len(labels) >= 10 * n_classes and 2 * present < n_classes:
            raise DataFormatError(f"{dataset} {key[0]}: {len(labels)} images of only {present} of its {n_classes} "
                                  f"classes ({data.source}); files of another dataset?")  # fmt: skip


def _find_release(dataset: str, data_dir: str | os.PathLike | None) -> Path | None:
    others = [n for d, names in RELEASE_DIRS.items() if d != dataset for n in names]
    return find_dataset_dir(RELEASE_DIRS[dataset], _release_check(dataset), data_dir, others=others)


def _release_check(dataset: str):
    if dataset == "imagenet":
        return _is_imagenet_c
    return is_cifar_c


def _is_imagenet_c(path: Path) -> bool:
    """``path`` holds the ImageNet-C layout: some ``<corruption>/<1..5>/`` folder (under any directory name)."""
    return any((path / c / str(s)).is_dir() for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS) for s in range(1, 6))


def _known_corruptions() -> set[str] | None:
    import corruptions

    names = set(getattr(corruptions, "CORRUPTIONS", ())) | set(getattr(corruptions, "EXTRA_CORRUPTIONS", ()))
    return names or None


def _write_meta(directory: Path, dataset: str, clean: ArrayDataset, seed: int, preset: str) -> None:
    meta = directory / "meta.json"
    if not meta.is_file():
        tmp = directory / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"dataset": dataset, "clean_source": clean.source, "n": len(clean),
                                   "seed": seed, "preset": preset}, indent=1))  # fmt: skip
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
