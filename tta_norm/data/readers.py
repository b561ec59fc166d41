"""Readers for the data formats the harness evaluates on. All return :class:`ArrayDataset`: uint8 images in
NHWC layout (possibly a read-only ``np.memmap``) and int64 labels.

- torchvision's CIFAR pickles: ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``) and ``cifar-100-python`` (``train``, ``test``, ``meta``; fine or coarse labels).
- ImageFolder trees (``<root>/<class>/<image>``; classes sorted by name, files sorted by name), e.g. the
  JPEG mirror ``../shared/data/cifar10-jpeg/{train,test}``. JPEGs are decoded once (threads, progress
  bar) into a uint8 array cached under ``<cache>/data/imagefolder`` and memory-mapped afterwards;
  decoding per batch would dominate the run time.
- The CIFAR-10-C / CIFAR-100-C release layout (Hendrycks & Dietterich 2019; REFERENCE part 3, section
  3.1): ``<root>/<corruption>.npy`` of shape (5 * n, H, W, 3) uint8, severity ``s`` in rows ``[(s-1) n, s
  n)``, plus ``labels.npy`` (5 * n,) uint8 (cast to int64 here). Files are validated (existence, header,
  size, label count) before any array is touched, so a truncated download fails with a clear message up
  front.
- The ImageNet-C folder layout ``<root>/<corruption>/<severity>/<wnid>/<image>.JPEG`` (an ImageFolder per
  (corruption, severity)), optionally restricted to a list of ``wnid/file`` ids (robustbench's
  5,000-image list), labels by wnid.

Any ImageFolder read can be restricted to ``n_examples`` images (a seeded class-stratified subset, or the first
ids of a list) before decoding: only those images are decoded and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corruptions._folders import has_split_folders as is_image_folder_split  # noqa: F401 (the data readers' name)
from corruptions._folders import is_image_entry as _is_image_entry
from corruptions._pickle import CifarPickleError, load_cifar_pickle
from tta_norm._files import write_atomically
from tta_norm.data.paths import data_cache_dir
from tta_norm.data.subsets import stratified_subset

CIFAR_C_SEVERITIES = 5


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (truncated, wrong shape, count mismatch...)."""


@dataclass
class ArrayDataset:
    """Images (uint8, N x H x W x C) and labels (int64, N) plus where they came from."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...] | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataFormatError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels).astype(np.int64, copy=False)
        if self.labels.shape != (self.images.shape[0],):
            raise DataFormatError(
                f"{self.source or 'dataset'}: {self.images.shape[0]} images but labels of shape "
                f"{self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def head(self, n: int | None) -> ArrayDataset:
        """The first ``n`` samples (all if ``n`` is None), without copying."""
        if n is None or n >= len(self):
            return self
        return ArrayDataset(self.images[:n], self.labels[:n], self.classes, self.source, dict(self.info))

    def subset(self, index: np.ndarray) -> ArrayDataset:
        """Samples at ``index`` (copied into memory)."""
        index = np.asarray(index, dtype=np.int64)
        return ArrayDataset(
            np.ascontiguousarray(self.images[index]),
            self.labels[index],
            self.classes,
            self.source,
            dict(self.info),
        )


# ---------------------------------------------------------------------------- torchvision CIFAR pickles

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _unpickle(path: Path) -> dict:
    """Read a CIFAR batch file with :class:`corruptions._pickle.CifarUnpickler` (never runs code named by the
    file)."""
    try:
        return load_cifar_pickle(path)
    except CifarPickleError as err:
        raise DataFormatError(str(err)) from err


def _cifar_rows_to_nhwc(data, path: Path) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 (N, 3072), got {arr.dtype} {arr.shape}")
    return arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar10_python(root: str | os.PathLike, split: str = "test") -> ArrayDataset:
    """torchvision's ``cifar-10-batches-py`` directory; ``split`` is ``"train"`` (5 batches) or ``"test"``."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = [], []
    for name in names:
        batch = _unpickle(root / name)
        if "data" not in batch or "labels" not in batch:
            raise DataFormatError(f"{root / name}: missing 'data' or 'labels' (keys: {sorted(batch)})")
        x = _cifar_rows_to_nhwc(batch["data"], root / name)
        y = np.asarray(batch["labels"], dtype=np.int64)
        if len(y) != len(x):
            raise DataFormatError(f"{root / name}: {len(x)} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        classes = tuple(_unpickle(meta).get("label_names", CIFAR10_CLASSES))
    return ArrayDataset(
        np.ascontiguousarray(np.concatenate(images)),
        np.concatenate(labels),
        classes,
        f"cifar10-python:{root}:{split}",
    )


def read_cifar100_python(
    root: str | os.PathLike, split: str = "test", label_type: str = "fine"
) -> ArrayDataset:
    """torchvision's ``cifar-100-python`` directory; ``label_type``: ``"fine"`` (100) or ``"coarse"`` (20)."""
    root = Path(root)
    if split not in ("train", "test") or label_type not in ("fine", "coarse"):
        raise ValueError(f"bad split/label_type: {split!r}, {label_type!r}")
    batch = _unpickle(root / split)
    key = f"{label_type}_labels"
    if "data" not in batch or key not in batch:
        raise DataFormatError(f"{root / split}: missing 'data' or {key!r} (keys: {sorted(batch)})")
    x = _cifar_rows_to_nhwc(batch["data"], root / split)
    y = np.asarray(batch[key], dtype=np.int64)
    if len(y) != len(x):
        raise DataFormatError(f"{root / split}: {len(x)} images but {len(y)} labels")
    classes = None
    if (root / "meta").is_file():
        names = _unpickle(root / "meta").get(f"{label_type}_label_names")
        classes = tuple(names) if names is not None else None
    return ArrayDataset(np.ascontiguousarray(x), y, classes, f"cifar100-python:{root}:{split}")


def is_cifar10_python(path: Path) -> bool:
    return (path / "test_batch").is_file()


def is_cifar100_python(path: Path) -> bool:
    return (path / "test").is_file() and (path / "meta").is_file()


# ---------------------------------------------------------------------------------- ImageFolder trees


def list_image_folder(
    root: str | os.PathLike,
    *,
    max_per_class: int | None = None,
    ids: Iterable[str] | None = None,
    class_index: Mapping[str, int] | None = None,
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Files, labels and classes of an ImageFolder tree (classes and files sorted by name).

    ``ids`` restricts to files given as ``"<class>/<file name>"`` and returns them in the order of ``ids``;
    ``max_per_class`` keeps the first files of each class.  ``class_index`` maps class folder names to labels
    (e.g. wnid -> ImageNet index; every folder must be in it; ``classes`` is then its names by label); by
    default the label is the position of the folder among the sorted folders, and (as torchvision's
    ImageFolder) a folder without images is an error, since it would shift every later label.  Hidden folders
    (``.ipynb_checkpoints``...) are never classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
    if not folders:
        raise DataFormatError(f"{root} has no class sub-directories (expected <root>/<class>/<image>)")
    if class_index is None:
        empty = [c for c in folders if not any(_is_image_entry(e) for e in os.scandir(root / c))]
        if empty:
            raise DataFormatError(f"{root}: class folders {empty[:5]} hold no images; labels are folder positions, "
                                  "so remove them (or the folders that are not classes)")  # fmt: skip
        label_of = {c: i for i, c in enumerate(folders)}
        classes = folders
    else:
        unknown = [c for c in folders if c not in class_index]
        if unknown:
            raise DataFormatError(f"{root}: class folders {unknown[:5]} are not classes of this dataset")
        label_of = dict(class_index)
        classes = tuple(sorted(label_of, key=label_of.__getitem__))
    wanted = None
    if ids is not None:
        ids = [s.strip().replace("\\", "/") for s in ids]
        wanted = {}
        for s in ids:
            cls, _, fname = s.rpartition("/")
            wanted.setdefault(cls.split("/")[-1], set()).add(fname)
    files: list[Path] = []
    labels: list[int] = []
    for cls in folders:
        names = sorted(e.name for e in os.scandir(root / cls) if _is_image_entry(e))
        if wanted is not None:
            names = [n for n in names if n in wanted.get(cls, ())]
        if max_per_class is not None:
            names = names[:max_per_class]
        files += [root / cls / n for n in names]
        labels += [label_of[cls]] * len(names)
    if wanted is not None:
        n_wanted = sum(len(v) for v in wanted.values())
        if n_wanted != len(files):
            raise DataFormatError(f"{root}: {n_wanted} ids requested but only {len(files)} files found")
        position = {f"{f.parent.name}/{f.name}": i for i, f in enumerate(files)}
        order = [position[f"{s.rpartition('/')[0].split('/')[-1]}/{s.rpartition('/')[2]}"] for s in ids]
        files = [files[i] for i in order]
        labels = [labels[i] for i in order]
    if not files:
        raise DataFormatError(f"{root}: no image files found")
    return files, np.asarray(labels, dtype=np.int64), classes


def _decode(path: Path, size: int | None, crop: int | None = None) -> np.ndarray:
    """One image as uint8 HWC RGB; with ``size``, torchvision's ``Resize(size)`` then ``CenterCrop(crop)`` on
    the PIL image (short side to ``size``, the long side ``int(size * long / short)``, bilinear; crop offsets
    ``int(round((side - crop) / 2))``), the ImageNet evaluation transform."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                crop = crop or size
                w, h = im.size
                if min(w, h) != size:
                    short, long = (w, h) if w <= h else (h, w)
                    new_long = int(size * long / short)
                    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BILINEAR)
                w, h = im.size
                if (w, h) != (crop, crop):
                    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
                    im = im.crop((left, top, left + crop, top + crop))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataFormatError(f"cannot decode {path}: {err}") from err


def decode_images(
    files: Sequence[Path],
    *,
    size: int | None = None,
    crop: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc="",
) -> np.ndarray:
    """Decode ``files`` into one uint8 NHWC array (threaded; PIL releases the GIL while decoding).

    All images must have the same size unless ``size`` is given (then: resize the short side to ``size`` and
    center-crop to ``crop x crop``, ``crop`` defaulting to ``size``)."""
    from tqdm.auto import tqdm

    if not files:
        raise ValueError("no files to decode")
    first = _decode(files[0], size, crop)
    out = np.empty((len(files),) + first.shape, dtype=np.uint8)
    workers = workers or min(4, os.cpu_count() or 1)
    chunk = 256

    out[0] = first

    def work(start: int) -> int:
        for i in range(max(start, 1), min(start + chunk, len(files))):
            img = _decode(files[i], size, crop)
            if img.shape != first.shape:
                raise DataFormatError(
                    f"{files[i]} has shape {img.shape}, expected {first.shape} like {files[0]}; "
                    "pass size= (and crop=) to resize"
                )
            out[i] = img
        return min(start + chunk, len(files)) - start

    with tqdm(total=len(files), desc=desc or "decoding images", unit="img", disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(work, range(0, len(files), chunk)):
                bar.update(n)
    return out


def _folder_fingerprint(files: Sequence[Path], extra: str) -> str:
    h = hashlib.sha1(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_image_folder(
    root: str | os.PathLike,
    *,
    size: int | None = None,
    crop: int | None = None,
    max_per_class: int | None = None,
    ids: Iterable[str] | None = None,
    n_examples: int | None = None,
    seed: int = 0,
    class_index: Mapping[str, int] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> ArrayDataset:
    """An ImageFolder tree decoded into a uint8 NHWC array (see :func:`list_image_folder` for the filters).

    ``n_examples`` selects images from the file list *before decoding*: the first ``n_examples`` ids when
    ``ids`` is given (robustbench's convention for its id list), else a seeded class-stratified subset in
    random order (:func:`tta_norm.data.subsets.stratified_subset` with ``seed``).  Only the selected images
    are decoded and cached.  ``size``/``crop``: resize the short side, then center-crop (see
    :func:`decode_images`).

    With ``cache`` (default) the decoded array is stored under ``cache_dir`` (default
    ``<cache>/data/imagefolder``), keyed by the selected file list, sizes and modification times, and
    memory-mapped on later calls."""
    root = Path(root).resolve()
    files, labels, classes = list_image_folder(root, max_per_class=max_per_class, ids=ids, class_index=class_index)
    info: dict = {"n_listed": len(files)}
    if n_examples is not None and n_examples < len(files):
        if ids is not None:
            pick = np.arange(n_examples)
            info["subset"] = f"first {n_examples} ids"
        else:
            pick = stratified_subset(labels, n_examples, seed)
            info["subset"] = f"stratified n={n_examples} seed={seed}"
        files = [files[i] for i in pick]
        labels = labels[pick]
    source = f"imagefolder:{root}"
    if not cache:
        images = decode_images(
            files, size=size, crop=crop, workers=workers, progress=progress, desc=f"decoding {root.name}"
        )
        return ArrayDataset(images, labels, classes, source, info)
    resize = "" if size is None else "|resize=torchvision"  # (resized arrays of an older rule are not reused)
    key = _folder_fingerprint(files, f"{root}|size={size}|crop={crop}{resize}")
    base = Path(cache_dir) if cache_dir is not None else data_cache_dir() / "imagefolder"
    target = base / f"{root.parent.name}-{root.name}-{key}"
    img_file, lab_file, meta_file = target / "images.npy", target / "labels.npy", target / "meta.json"
    info["cache"] = str(target)
    if img_file.is_file() and lab_file.is_file() and meta_file.is_file():
        try:
            images = np.load(img_file, mmap_mode="r")
            cached_labels = np.load(lab_file)
            if images.shape[0] == len(files) and np.array_equal(cached_labels, labels):
                return ArrayDataset(images, labels, classes, source, info)
        except (ValueError, OSError):
            pass  # corrupt cache entry: rebuild below
    images = decode_images(
        files, size=size, crop=crop, workers=workers, progress=progress, desc=f"decoding {root.name}"
    )
    target.mkdir(parents=True, exist_ok=True)
    _atomic_save(img_file, images)
    _atomic_save(lab_file, labels)
    tmp = meta_file.with_name(f".{meta_file.name}.{os.getpid()}.tmp")  # unique: concurrent runs share the cache
    tmp.write_text(json.dumps({"root": str(root), "n": len(files), "classes": list(classes), "size": size,
                               "crop": crop, "subset": info.get("subset")}))  # fmt: skip
    os.replace(tmp, meta_file)
    return ArrayDataset(np.load(img_file, mmap_mode="r"), labels, classes, source, info)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # (a file object: np.save would append ".npy" to a path)
            np.save(f, array)

    write_atomically(path, save)


# ---------------------------------------------------------------------------- CIFAR-C release layout


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` file; checks that the file holds all the data it declares."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as err:
            raise DataFormatError(f"{path} is not a valid .npy file ({err})") from err
        offset = f.tell()
    if fortran:
        raise DataFormatError(f"{path}: Fortran-ordered arrays are not supported")
    if dtype.hasobject:
        raise DataFormatError(f"{path} holds Python objects (a pickled array), never loaded; only plain numeric "
                              "arrays are read")  # fmt: skip
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise DataFormatError(
            f"{path} is truncated: header declares {shape} {dtype} ({expected} bytes) but the file has "
            f"{actual} bytes. Re-download or delete it."
        )
    return tuple(int(s) for s in shape), dtype, offset


def check_cifar_c(
    root: str | os.PathLike, corruptions: Sequence[str], severities: Sequence[int] | None = None
) -> int:
    """Validate a CIFAR-C release directory for ``corruptions`` without reading the data.

    Returns ``n``, the number of images per severity. Raises ``FileNotFoundError`` (naming every missing file)
    or :class:`DataFormatError` (truncated file, wrong dtype/shape, label count mismatch). A ``manifest.json``
    as written by ``corruptions.write_cifar_c`` (``{"files": {name: [severities present]}}``; absent rows are
    zeros) is honoured: asking for a severity a file does not hold, or for a file it does not list (left from
    an earlier dataset in the directory), is an error."""
    root = Path(root)
    missing = [c for c in ["labels", *corruptions] if not (root / f"{c}.npy").is_file()]
    if missing:
        present = sorted(p.stem for p in root.glob("*.npy"))
        raise FileNotFoundError(
            f"CIFAR-C directory {root} lacks {', '.join(m + '.npy' for m in missing)} (present: {present})"
        )
    lshape, ldtype, _ = npy_header(root / "labels.npy")
    if len(lshape) != 1 or ldtype.kind not in "ui":
        raise DataFormatError(f"{root / 'labels.npy'}: expected 1-d integer labels, got {ldtype} {lshape}")
    total = lshape[0]
    for c in corruptions:
        shape, dtype, _ = npy_header(root / f"{c}.npy")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise DataFormatError(f"{root / (c + '.npy')}: expected uint8 (N, H, W, 3), got {dtype} {shape}")
        if shape[0] != total:
            raise DataFormatError(
                f"{root / (c + '.npy')} has {shape[0]} images but labels.npy has {total} labels"
            )
    if total % CIFAR_C_SEVERITIES:
        raise DataFormatError(f"{root}: {total} rows is not 5 severity blocks of equal size")
    n = total // CIFAR_C_SEVERITIES
    blocks = np.load(root / "labels.npy", mmap_mode="r").reshape(CIFAR_C_SEVERITIES, n)
    if not (blocks == blocks[:1]).all():
        raise DataFormatError(
            f"{root / 'labels.npy'}: its {total} labels are not one block of {n} repeated for the 5 severities "
            "(the release layout); a file with fewer severities (e.g. severity 5 only) cannot be read as this one"
        )
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            present = json.loads(manifest.read_text()).get("files", {})
        except (ValueError, AttributeError) as err:
            raise DataFormatError(f"{manifest} is not valid JSON ({err})") from err
        wanted = set(int(x) for x in (severities or range(1, CIFAR_C_SEVERITIES + 1)))
        for c in corruptions:
            if c not in present:
                raise DataFormatError(
                    f"{root / (c + '.npy')} is not listed in {manifest.name}: a file left from another dataset "
                    "written to this directory (its rows need not match labels.npy); regenerate or remove it"
                )
            if not wanted <= set(present[c]):
                raise DataFormatError(
                    f"{root / (c + '.npy')} holds severities {sorted(present[c])} only (manifest.json); "
                    f"requested {sorted(wanted)}"
                )
    return n


def read_cifar_c(
    root: str | os.PathLike, corruption: str, severities: Sequence[int] = (5,)
) -> dict[int, ArrayDataset]:
    """Severity blocks of ``<root>/<corruption>.npy`` (memory-mapped) with the matching labels (int64)."""
    root = Path(root)
    for s in severities:
        if not 1 <= int(s) <= CIFAR_C_SEVERITIES:
            raise ValueError(f"severity must be in 1..5, got {s}")
    n = check_cifar_c(root, [corruption], severities)
    images = np.load(root / f"{corruption}.npy", mmap_mode="r")
    labels = np.load(root / "labels.npy").astype(np.int64)
    out = {}
    for s in severities:
        rows = slice((int(s) - 1) * n, int(s) * n)
        out[int(s)] = ArrayDataset(
            images[rows], labels[rows], None, f"release:{root / corruption}.npy:s{s}", {"severity": int(s)}
        )
    return out


def is_cifar_c(path: Path) -> bool:
    return (path / "labels.npy").is_file()


# ---------------------------------------------------------------------------------------- ImageNet-C


def read_imagenet_c(
    root: str | os.PathLike,
    corruption: str,
    severity: int,
    *,
    ids: Iterable[str] | None = None,
    n_examples: int | None = None,
    seed: int = 0,
    size: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ArrayDataset:
    """``<root>/<corruption>/<severity>/<wnid>/*`` decoded (and cached) like :func:`read_image_folder`.

    Labels are the ImageNet-1k indices of the wnid folders (:mod:`tta_norm.data.imagenet_classes`); a folder
    that is not an ImageNet wnid is an error (hidden folders are skipped).  ``ids``: ``"wnid/file"`` strings,
    read in their order (robustbench's id list);
    ``n_examples``: the first n ids, or without ids a seeded class-stratified subset, chosen before decoding."""
    from tta_norm.data.imagenet_classes import imagenet_index

    folder = Path(root) / corruption / str(int(severity))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet-C folder not found: {folder} (layout <root>/<corruption>/<1..5>/<wnid>/)"
        )
    ds = read_image_folder(folder, size=size, ids=ids, n_examples=n_examples, seed=seed,
                           class_index=imagenet_index(), cache=cache, cache_dir=cache_dir, progress=progress)
    ds.source = f"release:{folder}"
    ds.info["severity"] = int(severity)
    return ds
