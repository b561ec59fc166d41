"""The bench harness: config validation, and an end-to-end run on a tiny CIFAR-10-C built from real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta_norm.bench import ConfigError, load_config, run_benchmark, shipped_configs
from tta_norm.cli.bench import add_arguments
from tta_norm.data.paths import find_dataset_dir

MIRROR = find_dataset_dir(["cifar10-jpeg"], lambda p: (p / "test").is_dir())
MODEL_OK = True
try:
    from tta_norm.models import find_release_checkpoint

    MODEL_OK = find_release_checkpoint(20) is not None
except Exception:  # pragma: no cover - models package missing
    MODEL_OK = False
needs_real = pytest.mark.skipif(MIRROR is None or not MODEL_OK, reason="needs ../shared data and checkpoints")


def test_shipped_configs_validate() -> None:
    names = set(shipped_configs())
    assert {"quick", "standard", "continual", "batch_sweep", "noniid_sweep"} <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.cells()


def test_config_errors_are_clear_and_early() -> None:
    with pytest.raises(ConfigError, match="unknown key.*'batch_size'.*did you mean 'batch_sizes'"):
        load_config("quick", ["batch_size=[16]"])
    with pytest.raises(ConfigError, match="unknown preset 'medbm'.*did you mean 'medbn'"):
        load_config("quick", ["methods=[medbm]"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_config("quick", ["methods=[tbn+tnet]"])
    with pytest.raises(ConfigError, match="severities"):
        load_config("quick", ["severities=[6]"])
    with pytest.raises(ConfigError, match="alpha must be in"):
        load_config("quick", ["methods=[{preset: alpha, kwargs: {alpha: 2}}]"])
    with pytest.raises(ConfigError, match="unknown corruption"):
        load_config("quick", ["corruptions=[gaussian_nosie]"])
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config("no-such-config")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config("quick", ["settings=[continous]"])


def test_grid_expansion() -> None:
    cfg = load_config(
        "quick",
        ["methods=[source, tbn+tent]", "batch_sizes=[1, 16]", "seeds=[0, 1]", "orders=[iid, dirichlet]",
         "deltas=[0.1, 1.0]", "settings=[continual, gradual]", "severities=[3, 5]"],
    )  # fmt: skip
    cells = cfg.cells()
    # (iid + 2 dirichlet deltas) x 2 batch sizes x 2 seeds x 2 methods, continual x 2 severities + gradual x 1
    assert len(cells) == 3 * 2 * 2 * 2 * 3
    assert len({c.key() for c in cells}) == len(cells)


def _tiny_release(root: Path, per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10-C release (2 corruptions, 5 severities) made from real mirror test images."""
    from corruptions import write_cifar_c

    classes = sorted(p.name for p in (MIRROR / "test").iterdir())
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((MIRROR / "test" / cls).iterdir())[:per_class]:
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(label)
    order = np.random.default_rng(0).permutation(len(labels))  # CIFAR's test set is not class-sorted
    x, y = np.stack(images)[order], np.array(labels)[order]
    write_cifar_c(x, y, root / "CIFAR-10-C", ["brightness", "gaussian_noise"], seed=0, progress=False)
    return x, y


@needs_real
def test_end_to_end_on_real_images_with_resume_and_determinism(tmp_path: Path) -> None:
    _tiny_release(tmp_path / "data")
    overrides = [
        f"data_dir={tmp_path / 'data'}", "corruptions=[brightness, gaussian_noise]", "n_examples=null",
        "methods=[source, tbn, medbn, tbn+tent]", "batch_sizes=[40]", "device=cpu", "plots=true",
    ]  # fmt: skip
    cfg = load_config("quick", overrides + [f"output={tmp_path / 'a'}"])
    out = run_benchmark(cfg, progress=False).out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 4
    by_method = {r["cell"]["method"]["name"]: r["metrics"] for r in records}
    assert by_method["source"]["samples"] == 240  # 2 corruptions x 120 images
    assert set(by_method["source"]["per_domain"]) == {"brightness@5", "gaussian_noise@5"}
    assert "2 release" in records[0]["data"]  # read from the release layout, not regenerated
    # the shared checkpoint recognises most brightness images; gaussian noise is much harder for it
    assert by_method["source"]["per_domain"]["brightness@5"] < 0.5
    assert by_method["source"]["per_domain"]["gaussian_noise@5"] > by_method["source"]["per_domain"]["brightness@5"]
    # every method saw the identical stream
    assert len({m["stream_fingerprint"] for m in by_method.values()}) == 1
    report = (out / "report.md").read_text()
    assert "| tbn+tent |" in report and "brightness" in report
    assert "### latency per batch" in report
    assert (out / "plots" / "per_corruption_0.png").stat().st_size > 1000
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "err:brightness@5" in csv_lines[0]
    head, first = csv_lines[0].split(","), csv_lines[1].split(",")
    assert float(first[head.index("latency_median_ms")]) > 0

    # resume: nothing is recomputed
    before = (out / "results.jsonl").read_text()
    run_benchmark(cfg, resume=True, progress=False)
    assert (out / "results.jsonl").read_text() == before

    # determinism: a second output directory gets the same numbers
    cfg_b = load_config("quick", overrides + [f"output={tmp_path / 'b'}", "plots=false"])
    out_b = run_benchmark(cfg_b, progress=False).out
    records_b = [json.loads(line) for line in (out_b / "results.jsonl").read_text().splitlines()]
    for ra, rb in zip(records, records_b, strict=True):
        assert ra["metrics"]["per_domain"] == rb["metrics"]["per_domain"]


def test_cli_dry_run_and_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    from tta_norm.cli import main

    assert main(["bench", "quick", "--dry-run", "-s", "batch_sizes=[1,200]"]) == 0
    out = capsys.readouterr().out
    assert "10 cells" in out
    assert main(["bench", "quick", "-s", "batchsizes=[1]"]) == 2
    assert "did you mean 'batch_sizes'" in capsys.readouterr().err
    assert main(["bench", "--list-configs"]) == 0
    assert callable(add_arguments)
