"""The user-facing documentation stays true to the code: links resolve, the API reference is current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_links_to_existing_pages():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?:)[^)#]+)\)", readme)
    assert targets, "the README links no documentation page"
    missing = [t for t in targets if not (ROOT / t).is_file()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_stays_a_guide():
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.render(), "docs/api.md is stale: run python scripts/gen_api_docs.py"


def test_code_and_docs_speak_of_the_project_only():
    pattern = re.compile(r"\bissue ?#?\d|this team|team's machines", re.IGNORECASE)
    offenders = []
    for folder in ("tta_norm", "corruptions", "scripts", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".yaml", ".sh", ".cpp", ".toml"} and path.is_file():
                offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                              if pattern.search(line)]
    assert not offenders, f"process words in code or docs: {offenders}"
