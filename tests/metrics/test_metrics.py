from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tta_norm.metrics import (
    BatchTimer,
    MetricsAccumulator,
    PeakMemory,
    calibration_bins,
    error_rate,
    expected_calibration_error,
    grouped_error,
    latency_stats,
    mean_entropy,
    online_error_curve,
    softmax_confidence,
    softmax_entropy,
    wilson_interval,
)
from tta_norm.streams import CLEAN, StreamLoader, StreamSpec, build_stream, domain_schedule

pytestmark = pytest.mark.usefixtures("_isolated_cache")  # tests here write to the cache


def test_error_rate_and_grouped_error():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert error_rate(logits, labels) == 0.25
    assert error_rate(np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1])) == 0.25
    correct = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    groups = np.array([0, 0, 1, 1, 2, 2])
    assert grouped_error(correct, groups) == {0: 0.5, 1: 0.0, 2: 1.0}
    assert grouped_error(correct, groups, ["a", "b", "c"]) == {"a": 0.5, "b": 0.0, "c": 1.0}
    with pytest.raises(ValueError):
        error_rate(logits, labels[:3])


def test_online_error_curve():
    assert np.allclose(online_error_curve([1, 0, 0, 1]), [0.0, 0.5, 2 / 3, 0.5])


def test_ece_hand_computed_five_bins():
    conf = np.array([0.9, 0.9, 0.7, 0.3, 0.5])
    correct = np.array([1, 0, 1, 1, 0])
    # bins of width 0.2: (0.8,1]: acc .5 conf .9 -> 2/5*.4 = .16; (0.6,0.8]: 1 vs .7 -> 1/5*.3 = .06;
    # (0.4,0.6]: 0 vs .5 -> .1; (0.2,0.4]: 1 vs .3 -> .14; total .46
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.46)


def test_ece_default_fifteen_bins_and_boundaries():
    # right-closed bins: 0.5 with 4 bins falls in (0.25, 0.5] (index 1); 1.0 in the last bin; 0 in the first
    bins = calibration_bins([0.5, 1.0, 0.0], [1, 1, 0], n_bins=4)
    assert bins["count"].tolist() == [1, 1, 0, 1]
    # 15 bins: confidences 0.95 (bin 14) and 0.5 (bin 7: (7/15, 8/15]); ECE = 1/2*|1-.95| + 1/2*|0-.5|
    assert expected_calibration_error([0.95, 0.5], [1, 0]) == pytest.approx(0.5 * 0.05 + 0.5 * 0.5)
    perfect = expected_calibration_error(np.full(1000, 0.75), np.arange(1000) % 4 != 0)
    assert perfect == pytest.approx(0.0)
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [1])


def test_entropy_and_confidence():
    logits = torch.zeros(3, 10)
    assert np.allclose(softmax_entropy(logits), math.log(10))
    assert mean_entropy(torch.tensor([[100.0, 0.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(softmax_confidence(torch.tensor([[0.0, math.log(3.0)]])), [0.75])


def test_latency_stats():
    s = latency_stats(np.arange(1, 101) / 1000.0)  # 1..100 ms
    assert s["median_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["total_ms"] == pytest.approx(5050.0)


def test_accumulator_matches_functional_reference():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(103, 10)) * 3)
    labels = torch.from_numpy(rng.integers(0, 10, 103))
    domains = np.repeat([0, 1, 2], [40, 40, 23])
    acc = MetricsAccumulator(["gaussian_noise@5", "fog@3", "clean"], [5, 3, None], clean_domains=[2])
    for i in range(0, 103, 16):
        acc.update(logits[i : i + 16], labels[i : i + 16], torch.from_numpy(domains[i : i + 16]), latency=0.01,
                   skipped=1 if i == 32 else 0, segment=int(domains[i]))  # fmt: skip
    s = acc.summary(curve_points=None)
    correct = logits.argmax(1).numpy() == labels.numpy()
    assert s["samples"] == 103 and s["batches"] == 7
    assert s["error"] == pytest.approx(1 - correct.mean())
    assert s["per_domain"]["fog@3"] == pytest.approx(1 - correct[40:80].mean())
    assert s["per_severity"] == {5: pytest.approx(1 - correct[:40].mean()), 3: pytest.approx(1 - correct[40:80].mean())}
    assert s["mean_domain_error"] == pytest.approx(np.mean([1 - correct[:40].mean(), 1 - correct[40:80].mean()]))
    conf = softmax_confidence(logits)
    assert s["ece"] == pytest.approx(expected_calibration_error(conf, correct))
    assert s["mean_entropy"] == pytest.approx(mean_entropy(logits))
    assert s["steps_skipped"] == 1
    assert s["latency"]["median_ms"] == pytest.approx(10.0)
    assert np.allclose(s["online_error"]["error"], online_error_curve(correct))
    assert [r["name"] for r in s["per_segment"]] == ["0", "1", "2"]
    assert [r["segment"] for r in s["clean_segments"]] == [2]


def test_online_curve_subsampling_keeps_last_point():
    acc = MetricsAccumulator()
    acc.update(torch.randn(1000, 5), torch.randint(0, 5, (1000,)))
    curve = acc.online_curve(points=50)
    assert len(curve["samples"]) <= 51 and curve["samples"][-1] == 1000 and curve["samples"][0] == 1


def test_accumulator_bad_input():
    acc = MetricsAccumulator()
    with pytest.raises(ValueError):
        acc.update(torch.randn(4), torch.zeros(4))
    with pytest.raises(ValueError):
        acc.update(torch.randn(4, 3), torch.zeros(4), np.zeros(3))


def test_timer_and_peak_memory_cpu():
    timer = BatchTimer("cpu")
    with timer:
        sum(range(1000))
    assert timer.last >= 0 and len(timer.times) == 1
    with PeakMemory("cpu") as mem:
        block = np.ones((64, 1024, 1024), dtype=np.uint8)  # 64 MiB, touched
        block[::4096] = 2
    assert mem.result["kind"] == "cpu_max_rss"
    assert mem.result["peak_bytes"] > 64 * 2**20
    assert mem.result["delta_bytes"] >= 0


def test_bench_style_loop_on_a_stream():
    """The loop the bench command will run: loader -> model -> accumulator, with per-domain breakdown."""
    rng = np.random.default_rng(0)
    from tta_norm.data import ArrayDataset

    keys = domain_schedule(["a", "b"], (5,), clean_interleaved=True)
    data = {k: ArrayDataset(rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, 40))
            for k in set(keys)}  # fmt: skip
    plan = build_stream({k: d.labels for k, d in data.items()}, keys, StreamSpec(batch_size=8), seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    acc = MetricsAccumulator.from_plan(plan)
    timer = BatchTimer()
    resets = 0
    for batch in StreamLoader(plan, data):
        resets += batch.reset
        with timer, torch.no_grad():
            logits = model(batch.x)
        acc.update(logits, batch.y, batch.domain, latency=timer.last, segment=batch.segment)
    s = acc.summary()
    assert resets == 1
    assert s["samples"] == 160 and set(s["per_domain"]) == {"a@5", "b@5", "clean"}
    assert [r["name"] for r in s["clean_segments"]] == ["clean", "clean"]
    assert set(s["per_severity"]) == {5}
    assert CLEAN in plan.domains


@pytest.mark.parametrize("k,n", [(0, 2), (1, 2), (2, 2), (0, 10), (5, 10), (13, 30), (30, 30), (1, 1000)])
def test_wilson_interval_matches_scipy_and_closed_forms(k, n):
    from scipy.stats import binomtest

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    if k == 0:  # closed form at zero successes: upper = z^2 / (n + z^2)
        z2 = 1.959963984540054**2
        assert lo == 0.0 and hi == pytest.approx(z2 / (n + z2))


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # exact at the ends (rounding used to leave 1 - 1e-16 at 30 of 30, 5e-17 at 0 of 3)
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize(
    ("logits", "labels", "domain", "message"),
    [
        (torch.randn(4, 10), torch.tensor([0, 1, 2, 57]), None, "labels 0..57 do not fit the model's 10 outputs"),
        (torch.randn(4, 10), torch.tensor([0, 1, 2, -1]), None, "do not fit"),
        (torch.full((4, 10), float("nan")), torch.tensor([0, 1, 2, 3]), None, "NaN or Inf"),
        (torch.randn(4, 10), torch.tensor([0, 1, 2]), None, "4 logits but labels of shape"),
        (torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), np.zeros(3), "domain ids of shape"),
    ],
)
def test_a_refused_batch_leaves_the_accumulator_as_it_was(logits, labels, domain, message):
    acc = MetricsAccumulator()
    acc.update(torch.eye(4, 10) * 5, torch.arange(4))
    before = json.dumps(acc.summary(), sort_keys=True)  # (NaN reads "NaN": equal to itself)
    with pytest.raises(ValueError, match=message):
        acc.update(logits, labels, domain)
    assert acc.batches == 1 and len(acc) == 4 and json.dumps(acc.summary(), sort_keys=True) == before


def test_domain_and_segment_ids_must_name_one():
    """A negative id was read from the end of the names (scored under the wrong domain); one past the end was
    accepted and summary() failed after the whole stream had run."""
    acc = MetricsAccumulator(["fog@5", "snow@5"], [5, 5], segment_names=["a", "b"])
    acc.update(torch.eye(2, 3) * 5, torch.arange(2), 1, segment=1)
    before = json.dumps(acc.summary(), sort_keys=True)
    for domain, segment in ((-1, None), (2, None), (np.array([0, 2]), None), (0, 2), (0, -1)):
        with pytest.raises(ValueError, match="domain|segment"):
            acc.update(torch.eye(2, 3) * 5, torch.arange(2), domain, segment=segment)
    assert json.dumps(acc.summary(), sort_keys=True) == before
    with pytest.raises(ValueError, match="severities"):
        MetricsAccumulator(["fog@5", "snow@5"], [5])
    unnamed = MetricsAccumulator()  # ids without names: any id >= 0
    unnamed.update(torch.eye(2, 3) * 5, torch.arange(2), 7, segment=3)
    with pytest.raises(ValueError, match="domain"):
        unnamed.update(torch.eye(2, 3) * 5, torch.arange(2), -2)
