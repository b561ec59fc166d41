"""Source readers and benchmark writers in the released CIFAR-10-C and ImageNet-C layouts.

Readers (no torchvision needed):

* :func:`load_cifar_batches` - the python pickles of ``cifar-10-batches-py`` / ``cifar-100-python``.
* :func:`load_image_folder` - an ImageFolder tree ``<root>/<class>/<image>`` (classes sorted by name,
  files sorted, as torchvision orders them; only the files directly inside each class folder).

Writers:

* :func:`write_cifar_c` - the CIFAR-10-C release layout: ``<name>.npy`` uint8 ``(5*N, H, W, 3)`` with
  severity ``k`` in rows ``(k-1)*N .. k*N-1``, and ``labels.npy`` (the N labels tiled 5 times, uint8), which
  ``robustbench.data.load_cifar10c`` reads unchanged.
* :func:`write_imagenet_c` - the ImageNet-C layout ``<name>/<severity>/<class>/<file>`` of JPEGs at quality
  85 (``optimize=True``), after ``Resize(256)`` and ``CenterCrop(224)`` like ``make_imagenet_c.py``.

Both are resumable: files are written to a temporary name and renamed, finished files are skipped, and the
random draws depend only on ``(seed, corruption, severity, preset, block of images)`` (consecutive blocks
from the first image, 256 images at 32 x 32), so an interrupted run continues with the same bytes it would have
written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._core import (
    block_size,
    check_name,
    check_preset,
    check_seed,
    check_severity,
    check_size,
    check_workers,
    run_corruption,
)
from ._folders import IMG_EXTENSIONS, SPLITS, has_split_folders, is_image_entry
from ._names import ALL_CORRUPTIONS, CORRUPTIONS
from ._pickle import load_cifar_pickle

SEVERITIES = (1, 2, 3, 4, 5)
MANIFEST = "manifest.json"
PERMUTATION = "permutation.npy"
ROW_ORDER_SEED = 0


def class_mixing_permutation(n: int, seed: int = ROW_ORDER_SEED) -> np.ndarray:
    """The fixed row order for sources listed class by class (ImageFolder trees): ``numpy.random.default_rng(
    seed).permutation(n)``, the permutation ``tta_norm``'s benchmark applies to the same clean set, so any
    prefix of a written file (what ``robustbench.data.load_cifar10c`` reads) mixes the classes."""
    return np.random.default_rng(seed).permutation(int(n))


# --------------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------------




def _find_cifar_dir(root: Path) -> tuple[Path, str] | None:
    for cand in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand, "cifar10"
        if (cand / "test").is_file() and (cand / "meta").is_file():
            return cand, "cifar100"
    return None


def load_cifar_batches(root: str | os.PathLike, train: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read the CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) python pickles.

    ``root`` is that directory or its parent. Returns uint8 images ``(N, 32, 32, 3)`` and int64 labels
    (fine labels for CIFAR-100) in the stored order, as ``torchvision.datasets.CIFAR10(...).data`` does. Each
    batch's ``data`` must be uint8 ``(N, 3072)`` and its labels ``N`` integers in range (10 or 100 classes).
    The files are pickles, read without running code (:func:`corruptions._pickle.load_cifar_pickle`: a file
    that names anything but plain data is a :class:`~corruptions._pickle.CifarPickleError`).
    """
    found = _find_cifar_dir(Path(root))
    if found is None:
        raise FileNotFoundError(
            f"no CIFAR python batches under {root}: expected cifar-10-batches-py/ (data_batch_1..5, "
            "test_batch) or cifar-100-python/ (train, test, meta)"
        )
    d, kind = found
    if kind == "cifar10":
        files = [d / f"data_batch_{i}" for i in range(1, 6)] if train else [d / "test_batch"]
        label_key, n_classes = "labels", 10
    else:
        files = [d / ("train" if train else "test")]
        label_key, n_classes = "fine_labels", 100
    data, labels = [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing CIFAR batch file {f}")
        entry = load_cifar_pickle(f)
        if "data" not in entry or label_key not in entry:
            raise ValueError(f"{f}: missing 'data' or {label_key!r} (keys: {sorted(entry)[:6]}); not a CIFAR batch")
        x, y = _cifar_batch_arrays(f, entry["data"], entry[label_key], label_key, n_classes)
        data.append(x.reshape(-1, 3, 32, 32))
        labels.append(y)
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


def _cifar_batch_arrays(path: Path, data, labels, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ``data`` as stored (uint8 ``(N, 3072)``, as ``tta_norm``'s reader requires; nothing is cast or
    reshaped to fit) and its labels: ``N`` integers in ``0..n_classes-1``."""
    try:
        x, y = np.asarray(data), np.asarray(labels)
    except (ValueError, TypeError) as err:  # ragged lists
        raise ValueError(f"{path}: 'data' or {label_key!r} is not an array ({err})") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or (y.size and y.dtype.kind not in "iu"):
        raise ValueError(f"{path}: {len(x)} images but {label_key!r} is {y.dtype} {y.shape}, not {len(x)} integers")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{path}: {label_key!r} must be in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


@dataclass(frozen=True)
class ImageFolderIndex:
    """Files of an ImageFolder tree: sorted class names, and per file its relative path and label."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]  # paths relative to root, "<class>/<file>"
    labels: np.ndarray


def index_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """List ``<root>/<class>/<image>`` like ``tta_norm``'s reader (``tta_norm.data.readers.list_image_folder``):
    classes are the sorted non-hidden folders, and each holds the sorted image files directly inside it.

    Sub-folders of a class folder are not read (the reader that evaluates the output does not read them
    either); hidden files (macOS ``._*``) are skipped. A class folder without images is an error, since labels
    are folder positions and it would shift every later one."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / cls) if is_image_entry(e))
        if not names:
            empty.append(cls)
        files += [f"{cls}/{name}" for name in names]
        labels += [label] * len(names)
    if empty and files:
        raise ValueError(f"{root}: class folders {empty[:5]} hold no images; labels are folder positions, so "
                         "remove them (or the folders that are not classes)")  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in class folders under {root}")
    return ImageFolderIndex(root, tuple(classes), tuple(files), np.asarray(labels, dtype=np.int64))


def image_folder_split(root: str | os.PathLike, split: str | None = None) -> Path:
    """The ImageFolder tree to read from ``root``: ``root/<split>`` (``split`` defaults to ``"test"``) if ``root``
    has split folders (:func:`has_split_folders`), else ``root`` itself, for which a ``split`` is an error."""
    root = Path(root)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if has_split_folders(root):
        path = root / (split or "test")
        if not path.is_dir():
            raise FileNotFoundError(f"{root} has no {path.name}/ folder (expected "
                                    f"{root}/{{train,test}}/<class>/<image>)")  # fmt: skip
        return path
    if split is not None:
        raise ValueError(f"split {split!r} asked for, but {root} has no train/ or test/ folder of class folders; "
                         "pass the ImageFolder tree itself without a split")  # fmt: skip
    return root


def _resize_center_crop(img, resize: int | None, crop: int | None):
    """torchvision ``Resize(resize)`` (shorter side, PIL bilinear) and ``CenterCrop(crop)`` on a PIL image."""
    from PIL import Image

    if resize is not None:
        w, h = img.size
        if (w <= h and w != resize) or (h < w and h != resize):
            if w < h:
                ow, oh = resize, int(resize * h / w)
            else:
                oh, ow = resize, int(resize * w / h)
            img = img.resize((ow, oh), Image.BILINEAR)
    if crop is not None:
        w, h = img.size
        if w < crop or h < crop:
            raise ValueError(f"image of size {w}x{h} is smaller than the crop {crop}")
        top = int(round((h - crop) / 2.0))
        left = int(round((w - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
    return img


def read_image(path: str | os.PathLike, resize: int | None = None, crop: int | None = None) -> np.ndarray:
    """One image as RGB uint8 ``(H, W, 3)``, optionally resized (shorter side) and centre-cropped.

    An image PIL refuses as a decompression bomb (over twice ``PIL.Image.MAX_IMAGE_PIXELS``) is a
    ``ValueError`` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = _resize_center_crop(im.convert("RGB"), resize, crop)
            return np.asarray(img, dtype=np.uint8).copy()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{path}: {err}") from err


def load_image_folder(
    root: str | os.PathLike, resize: int | None = None, crop: int | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read a whole ImageFolder tree into memory: uint8 ``(N, H, W, 3)``, int64 labels, class names.

    All images must have the same size after the optional ``resize``/``crop`` (CIFAR-style sets such as
    ``cifar10-jpeg/test``). For ImageNet-size sets use :func:`write_imagenet_c`, which streams.
    """
    index = index_image_folder(root)
    images = [read_image(index.root / f, resize, crop) for f in index.files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images under {root} have different sizes {sorted(shapes)[:4]}; pass resize/crop")
    return np.stack(images), index.labels, index.classes


def load_source(path: str | os.PathLike, train: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from CIFAR python batches (if found under ``path``) or an ImageFolder tree (the
    ``train/`` or ``test/`` one of a directory that has them: :func:`image_folder_split`)."""
    if _find_cifar_dir(Path(path)) is not None:
        return load_cifar_batches(path, train=train)
    images, labels, _ = load_image_folder(image_folder_split(path, "train" if train else None))
    return images, labels


# --------------------------------------------------------------------------------------------------------
# atomic files, progress
# --------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    _atomic_write(path, write)


def _save_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    _atomic_write(path, write)


def source_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the source images' bytes, shape and labels: a directory is resumed only from the same source."""
    h = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it or pass overwrite=True") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ValueError(f"{path} is not a manifest of this generator; remove it or pass overwrite=True")
    manifest.setdefault("files", {})
    return manifest


def _check_settings(out: Path, old: object, new: dict) -> None:
    """Resuming ``out`` needs the settings it was written with: name the ones that differ."""
    if old == new:
        return
    old = old if isinstance(old, dict) else {}
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    raise ValueError(f"{out} holds a dataset written with other settings ({'; '.join(diff)}); choose another "
                     "directory or pass overwrite=True")  # fmt: skip


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a project dependency
        return nullcontext(None)
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def _check_corruption_list(corruptions: Iterable[str] | None) -> list[str]:
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    if not names:
        raise ValueError("no corruptions selected")
    for n in names:
        check_name(n)
    return list(dict.fromkeys(names))


def _check_severity_list(severities: Iterable[int] | None) -> list[int]:
    sev = sorted({check_severity(s) for s in (SEVERITIES if severities is None else severities)})
    if not sev:
        raise ValueError("no severities selected")
    return sev


# --------------------------------------------------------------------------------------------------------
# CIFAR-10-C release layout
# --------------------------------------------------------------------------------------------------------


def write_cifar_c(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    out_dir: str | os.PathLike,
    corruptions: Iterable[str] | None = None,
    severities: Iterable[int] | None = None,
    seed: int = 0,
    preset: str = "cifar",
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    row_order: np.ndarray | None = None,
) -> dict[str, list[int]]:
    """Write ``<out_dir>/<name>.npy`` (uint8 ``(5*N, H, W, 3)``) per corruption and ``labels.npy``.

    Rows ``(k-1)*N .. k*N-1`` hold severity ``k``.  ``row_order`` (a permutation of ``0..N-1``, e.g.
    :func:`class_mixing_permutation`) reorders the source first: row ``i`` of every block is source image
    ``row_order[i]``; it is saved as ``permutation.npy`` and recorded in the manifest.  If only some
    ``severities`` are requested, the rows of the others are left zero and ``manifest.json`` records which
    severities each file holds; a later call with more severities fills them in. A file whose requested
    severities are all present is skipped. ``manifest.json`` also pins ``seed``, ``preset``, ``N``, the row
    order and the source (:func:`source_digest` of the images and labels): resuming with different ones is
    refused, naming them, unless ``overwrite=True``, which starts a new dataset there (its manifest is written
    first; files of the old one that are not rewritten stay on disk unlisted, and ``tta_norm`` refuses to read
    them). A non-empty directory without ``manifest.json`` (e.g. a downloaded release) is likewise refused
    unless ``overwrite=True``. Returns ``{name: severities present}``.
    """
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
    ):
        raise ValueError("images must be a uint8 numpy array of shape (N, H, W, 3)")
    labels = np.asarray(labels)
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n == 0:
        raise ValueError("no images to corrupt")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError("labels must be in 0..255 to be stored as uint8 like the release")
    if row_order is not None:
        row_order = np.asarray(row_order)
        if row_order.shape != (n,) or not np.array_equal(np.sort(row_order), np.arange(n)):
            raise ValueError(f"row_order must be a permutation of 0..{n - 1}")
    names = _check_corruption_list(corruptions)
    sev = _check_severity_list(severities)
    seed = check_seed(seed)
    preset = check_preset(preset)
    nworkers = check_workers(workers)
    _, h, w, _ = images.shape
    for name in names:
        for s in sev:
            check_size(name, s, preset, h, w)
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    if not overwrite and not manifest_path.exists() and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} holds files but no {MANIFEST} (not written by this generator, e.g. a downloaded "
                         "release): choose another directory or pass overwrite=True")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": seed, "preset": preset, "n": int(n), "shape": [int(h), int(w)], "layout": "cifar",
                "source_sha256": source_digest(images, labels)}  # fmt: skip
    if row_order is not None:
        settings["row_order"] = PERMUTATION
    manifest = {"settings": settings, "files": {}}
    old = _read_manifest(manifest_path) if manifest_path.exists() and not overwrite else None
    if old is not None and not overwrite:
        _check_settings(out, old.get("settings"), settings)
        manifest = old
    else:  # a new dataset: its manifest (no files yet) replaces the old one before any file changes
        _save_json(manifest_path, manifest)
    if row_order is not None:
        perm_path = out / PERMUTATION
        if not perm_path.exists() or not np.array_equal(np.load(perm_path), row_order):
            if perm_path.exists() and not overwrite and manifest["files"]:
                raise ValueError(f"{perm_path} holds another row order; choose another directory or overwrite=True")
            _save_npy(perm_path, row_order.astype(np.int64))
        images, labels = images[row_order], labels[row_order]
    labels_u8 = np.tile(labels.astype(np.uint8), 5)
    lab_path = out / "labels.npy"
    if overwrite or not lab_path.exists() or not np.array_equal(np.load(lab_path), labels_u8):
        _save_npy(lab_path, labels_u8)
    todo = []
    for name in names:
        have = (
            set(manifest["files"].get(name, []))
            if (out / f"{name}.npy").exists() and not overwrite
            else set()
        )
        missing = [s for s in sev if s not in have]
        if missing:
            todo.append((name, sorted(have), missing))
    with _progress(sum(len(m) for _, _, m in todo) * n, "corrupt", progress) as bar:
        for name, have, missing in todo:
            path = out / f"{name}.npy"
            data = np.load(path) if have else np.zeros((5 * n, h, w, 3), dtype=np.uint8)
            for s in missing:
                if bar is not None:
                    bar.set_postfix_str(f"{name} s{s}")
                data[(s - 1) * n : s * n] = run_corruption(images, name, s, seed, preset, nworkers)
                if bar is not None:
                    bar.update(n)
            _save_npy(path, data)
            manifest["files"][name] = sorted(set(have) | set(missing))
            _save_json(manifest_path, manifest)
    return {k: list(v) for k, v in manifest["files"].items()}


# --------------------------------------------------------------------------------------------------------
# ImageNet-C layout
# --------------------------------------------------------------------------------------------------------


def _jpeg_name(rel: str) -> str:
    p = Path(rel)
    return rel if p.suffix.lower() in (".jpg", ".jpeg") else str(p.with_suffix(".jpg"))


def write_imagenet_c(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    corruptions: Iterable[str] | None = None,
    severities: Iterable[int] | None = None,
    seed: int = 0,
    preset: str = "imagenet",
    resize: int | None = 256,
    crop: int | None = 224,
    quality: int = 85,
    workers: int | None = None,
    progress: bool = True,
    chunk: int = 64,
    overwrite: bool = False,
) -> int:
    """Corrupt an ImageFolder tree into ``<out_dir>/<name>/<severity>/<class>/<file>`` JPEGs.

    Each image is read as RGB, resized (shorter side ``resize``, bilinear) and centre-cropped to ``crop``
    (``Resize(256)``/``CenterCrop(224)`` like ``make_imagenet_c.py``; pass ``None`` to skip either; then all
    images must share one size), corrupted, and saved as JPEG ``quality`` with ``optimize=True``. Files keep
    their name (non-JPEG extensions become ``.jpg``; two sources that would get one name, such as ``x.png`` and
    ``x.bmp``, are refused before anything is written). Existing files are skipped; the random draws of image
    ``i`` depend only on ``(seed, corruption, severity, preset, i)`` and the block it falls in, so resumed
    runs write the same bytes. ``manifest.json`` pins the settings (seed, preset, resize, crop, quality) and
    the source (:func:`listing_digest`): resuming with other ones, or writing into a non-empty directory
    without a manifest, is refused unless ``overwrite=True``, which rewrites every selected file (an
    interrupted overwrite must be finished with ``overwrite=True``). Returns the number of files written.
    """
    from PIL import Image

    index = index_image_folder(source)
    names = _check_corruption_list(corruptions)
    sev = _check_severity_list(severities)
    seed = check_seed(seed)
    preset = check_preset(preset)
    nworkers = check_workers(workers)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    out = Path(out_dir)
    n = len(index.files)
    targets = [_jpeg_name(f) for f in index.files]
    first_source: dict[str, str] = {}
    for f, t in zip(index.files, targets, strict=True):
        if first_source.setdefault(t, f) != f:
            raise ValueError(f"{index.root / first_source[t]} and {index.root / f} would both be written as {t}; "
                             "rename one of them")  # fmt: skip
    first = read_image(index.root / index.files[0], resize, crop)
    h, w, _ = first.shape
    for name in names:
        for s in sev:
            check_size(name, s, preset, h, w)
    settings = {"layout": "imagenet", "seed": seed, "preset": preset, "resize": resize, "crop": crop,
                "quality": int(quality), "source_sha256": listing_digest(index)}  # fmt: skip
    manifest_path = out / MANIFEST
    if not overwrite:
        if manifest_path.exists():
            old = _read_manifest(manifest_path)
            _check_settings(out, old.get("settings"), settings)
            if old.get("overwriting"):
                raise ValueError(f"{out}: an overwrite was interrupted, so some files may hold the old settings; "
                                 "finish it with overwrite=True")  # fmt: skip
        elif out.is_dir() and any(out.iterdir()):
            raise ValueError(f"{out} holds files but no {MANIFEST} (not written by this generator, or by an older "
                             "version): choose another directory or pass overwrite=True")  # fmt: skip
    _save_json(manifest_path, {"settings": settings, "files": {}, "overwriting": bool(overwrite)})
    bs = block_size(h, w)
    step = max(bs, (chunk // bs) * bs)  # chunks start at multiples of the block size
    jobs = [(name, s) for name in names for s in sev]
    written = 0

    def save(img: np.ndarray, path: Path) -> None:
        _atomic_write(
            path, lambda tmp: Image.fromarray(img).save(tmp, format="JPEG", quality=quality, optimize=True)
        )

    with _progress(n * len(jobs), "corrupt", progress) as bar:
        for i0 in range(0, n, step):
            rel = targets[i0 : i0 + step]
            pending = [
                (name, s) for name, s in jobs
                if overwrite or not all((out / name / str(s) / r).exists() for r in rel)
            ]  # fmt: skip
            if pending:
                batch = np.stack(
                    [read_image(index.root / f, resize, crop) for f in index.files[i0 : i0 + step]]
                )
                if batch.shape[1:3] != (h, w):
                    raise ValueError("images have different sizes after resize/crop; set crop")
            for name, s in jobs:
                if (name, s) in pending:
                    res = run_corruption(batch, name, s, seed, preset, nworkers, start=i0)
                    for img, r in zip(res, rel, strict=True):
                        path = out / name / str(s) / r
                        if overwrite or not path.exists():
                            save(img, path)
                            written += 1
                if bar is not None:
                    bar.update(len(rel))
    _save_json(manifest_path, {"settings": settings, "files": {}})
    return written


def listing_digest(index: ImageFolderIndex) -> str:
    """SHA-256 of an ImageFolder source's listing: each file's relative path, size and label (no image is read,
    so a tree of a million files is fingerprinted in seconds)."""
    h = hashlib.sha256()
    for rel, label in zip(index.files, index.labels.tolist(), strict=True):
        h.update(f"{rel}\0{(index.root / rel).stat().st_size}\0{label}\n".encode())
    return h.hexdigest()


def all_names(selection: str) -> list[str]:
    """Expand a CLI selection: ``common`` (the 15), ``extra`` (the 4), ``all`` (19) or a comma list."""
    if selection == "common":
        return list(CORRUPTIONS)
    if selection == "extra":
        return [n for n in ALL_CORRUPTIONS if n not in CORRUPTIONS]
    if selection == "all":
        return list(ALL_CORRUPTIONS)
    names = [s.strip() for s in selection.split(",") if s.strip()]
    for n in names:
        check_name(n)
    return names
