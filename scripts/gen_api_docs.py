"""Write ``docs/api.md``, the public API reference, from the docstrings of every name in the packages' ``__all__``.

Usage::

    python scripts/gen_api_docs.py            # (re)write docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 if docs/api.md is not what the code's docstrings give
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

PACKAGES = (
    "tta_norm",
    "tta_norm.norm",
    "tta_norm.stats",
    "tta_norm.methods",
    "tta_norm.streams",
    "tta_norm.metrics",
    "tta_norm.models",
    "tta_norm.data",
    "tta_norm.layers",
    "tta_norm.training",
    "tta_norm.fitting",
    "tta_norm.attacks",
    "tta_norm.bench",
    "corruptions",
)
OUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _entry(qualname: str, obj: object) -> list[str]:
    if inspect.isclass(obj):
        head = f"### class `{qualname}{_signature(obj)}`"
    elif callable(obj):
        head = f"### `{qualname}{_signature(obj)}`"
    else:
        return [f"### `{qualname}`", "", f"Constant of type `{type(obj).__name__}`.", ""]
    doc = inspect.getdoc(obj) or "(no docstring)"
    return [head, "", doc, ""]


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api_docs.py`; do not edit by hand.",
        "",
    ]
    for package in PACKAGES:
        module = importlib.import_module(package)
        names = sorted(n for n in getattr(module, "__all__", ()) if not n.startswith("__"))
        if not names:
            continue
        lines += [f"## `{package}`", ""]
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        if summary:
            lines += [summary, ""]
        for name in names:
            lines += _entry(f"{package}.{name}", getattr(module, name))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT.name} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
