"""What counts as an image file and as a dataset directory of split ImageFolder trees (os only: light to import,
shared with ``tta_norm``'s readers so both list the same files)."""

from __future__ import annotations

import os
from pathlib import Path

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("test", "train")


def is_image_entry(entry: os.DirEntry) -> bool:
    """A non-hidden file with an image extension (macOS ``._*`` files are skipped)."""
    return entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMG_EXTENSIONS)


def has_split_folders(root: str | os.PathLike) -> bool:
    """``root`` is a dataset directory with ``test/`` or ``train/`` ImageFolder trees (like ``cifar10-jpeg``):
    one of them holds folders."""
    for split in SPLITS:
        p = Path(root) / split
        if p.is_dir() and any(e.is_dir() for e in os.scandir(p)):
            return True
    return False
