"""scripts/small_batch_study.py on tiny synthetic data: the untrained starting row, the training rows, the report,
resume (the study's functions themselves: ``test_small_batch.py``)."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tta_norm.fitting.benchdata import classification_error
from tta_norm.training import small_batch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "small_batch_study.py"


@pytest.fixture
def study(monkeypatch):
    from tta_norm.data.paths import model_search_dirs

    if not any(sorted(d.glob("resnet20-*.th")) for d in model_search_dirs() if d.is_dir()):
        pytest.skip("the released resnet20 checkpoint (../shared/models) is not available")
    spec = importlib.util.spec_from_file_location("small_batch_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    test = (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 20))
    domain = types.SimpleNamespace(images=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                                   labels=rng.integers(0, 10, 10))  # fmt: skip
    bench = types.SimpleNamespace(domains={"fog-5": domain})

    import tta_norm.fitting._data as data_mod
    import tta_norm.fitting.benchdata as bench_mod

    monkeypatch.setattr(data_mod, "load_source_split", lambda split, n, **kw: train if split == "train" else test)
    monkeypatch.setattr(bench_mod, "subset_corruption_benchmark", lambda *a, **kw: bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module, test, domain
    torch.set_num_threads(threads)  # leave the process as found: later tests need the default thread count


def test_init_row_is_the_released_model_and_resume_skips_cells(study, tmp_path, monkeypatch):
    from tta_norm.models import load_model

    module, (te_x, te_y), domain = study
    argv = ["--budget", "smoke", "--init", "release", "--batch-sizes", "8", "--variants", "bn", "gn",
            "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert module.main(argv) == 0
    rows = {(r["variant"], r["batch_size"]): r for r in map(json.loads, (tmp_path / "results.jsonl").open())}
    assert set(rows) == {("bn", 0), ("gn", 0), ("bn", 8), ("gn", 8)}

    released = load_model("resnet20")
    expect = classification_error(released, te_x, te_y, torch.device("cpu"))
    assert rows["bn", 0]["clean_error"] == expect and rows["bn", 0]["steps"] == 0
    assert rows["bn", 0]["corruption"]["source"] == classification_error(released, domain.images, domain.labels,
                                                                         torch.device("cpu"))  # fmt: skip
    assert "tbn" in rows["bn", 8]["corruption"] and "tbn" not in rows["gn", 8]["corruption"]
    assert rows["bn", 8]["steps"] == 2  # 16 images // 8, one epoch
    report = (tmp_path / "report.md").read_text()
    assert "| bn | init |" in report and "| gn | 8 |" in report

    # resume: every cell is cached, so nothing trains again (train would fail the test)
    monkeypatch.setattr(small_batch, "train_variant", lambda *a, **kw: pytest.fail("a cached cell was retrained"))
    assert module.main(argv) == 0
