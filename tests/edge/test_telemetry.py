"""Telemetry records, their differential privacy, and the cohort figures read back from them."""

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from pipelines.edge import telemetry
from pipelines.storage import ObjectStore

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def _window(requests=100, errors=0, latency_ms=1.0, classes=2, sample_rate=0.0, max_samples=0):
    window = telemetry.InferenceWindow("m", "3", "phones", classes, sample_rate=sample_rate,
                                       max_samples=max_samples, started=T0)
    for i in range(requests):
        window.add(latency_ms, None if i < errors else i % classes, {"x": float(i)})
    return window


def test_a_window_counts_requests_errors_latency_and_predictions():
    record = _window(requests=10, errors=2, latency_ms=3.0).record("dev-1", {}, now=T0 + timedelta(minutes=5))
    assert record["kind"] == "inference" and record["privacy"] is None
    assert (record["requests"], record["errors"]) == (10, 2)
    assert sum(record["latency_hist"]) == 10 and record["latency_hist"][telemetry.latency_bin(3.0)] == 10
    assert record["predictions"] == {"0": 4.0, "1": 4.0}, "failed requests have no prediction"
    assert record["samples"] == []


def test_samples_keep_the_inputs_and_output_up_to_the_cap():
    window = _window(requests=200, sample_rate=1.0, max_samples=7)
    record = window.record("dev-1", {})
    assert len(record["samples"]) == 7
    first = record["samples"][0]
    assert {k: v for k, v in first.items() if k != "id"} == {"inputs": {"x": 0.0}, "output": 0}
    assert telemetry.INFERENCE_ID.match(first["id"]) and len({s["id"] for s in record["samples"]}) == 7


def test_a_sampled_inference_keeps_the_apps_inference_id_and_a_regressions_value():
    window = telemetry.InferenceWindow("m", "3", "phones", 4, sample_rate=1.0, max_samples=5, started=T0)
    assert window.add(1.0, 2, {"x": 1.0}, inference_id="loan-7", value=151.5) == "loan-7"
    assert window.add(1.0, None, {"x": 2.0}, inference_id="loan-8") is None, "a failed inference is not sampled"
    assert window.record("dev-1", {})["samples"] == [{"id": "loan-7", "inputs": {"x": 1.0}, "output": 2,
                                                      "value": 151.5}]
    unsampled = telemetry.InferenceWindow("m", "3", "phones", 4, sample_rate=0.0, max_samples=5, started=T0)
    assert unsampled.add(1.0, 1, {"x": 1.0}, inference_id="loan-9") is None


def test_dp_noise_is_unbiased_and_has_the_laplace_scale_for_epsilon():
    # 20,000 draws of a count of 50 at epsilon 1: Laplace(0, 4) has standard deviation 4*sqrt(2)
    # and P(|noise| > t) = exp(-t / 4). Bounds are 5-sigma wide for the sample sizes used.
    rng = np.random.default_rng(20261127)
    draws = 20_000
    epsilon, scale = 1.0, telemetry.SENSITIVITY / 1.0
    noisy = telemetry.laplace_noise(np.full(draws, 50.0), epsilon, rng)
    error = noisy - 50.0
    assert abs(error.mean()) < 5 * scale * math.sqrt(2) / math.sqrt(draws)
    assert error.std() == pytest.approx(scale * math.sqrt(2), rel=0.05)
    bound = scale * math.log(1 / 0.05)  # exceeded with probability 5%
    exceeded = float(np.mean(np.abs(error) > bound))
    assert abs(exceeded - 0.05) < 5 * math.sqrt(0.05 * 0.95 / draws)


def test_a_larger_epsilon_means_less_noise():
    rng = np.random.default_rng(1)
    spreads = {eps: np.std(telemetry.laplace_noise(np.zeros(10_000), eps, rng)) for eps in (0.5, 2.0, 8.0)}
    for eps, spread in spreads.items():
        assert spread == pytest.approx(telemetry.SENSITIVITY / eps * math.sqrt(2), rel=0.06)


def test_the_fleet_error_rate_stays_within_its_bound_under_noise():
    # 50 devices, 200 requests each, 2% errors, epsilon 4: the fleet's noisy error count has a
    # standard deviation of sqrt(50) * sqrt(2) * 4/4 = 10 (0.1% of 10,000 requests), and the
    # sum of 50 Laplace draws is close to normal: over 2,000 simulated fleets about 4.55% of
    # error rates lie beyond 2 sigma, none beyond 6 sigma, and the mean is the truth.
    rng = np.random.default_rng(7)
    window = _window(requests=200, errors=4)  # every device saw the same traffic; each adds its own noise
    rates = []
    for _ in range(2000):
        records = [window.record(f"dev-{d}", {}, epsilon=4.0, rng=rng) for d in range(50)]
        rates.append(telemetry.cohort_stats(records).error_rate)
    rates = np.array(rates)
    sigma = math.sqrt(50) * math.sqrt(2) * (telemetry.SENSITIVITY / 4.0) / 10_000
    beyond = float(np.mean(np.abs(rates - 0.02) > 2 * sigma))
    assert abs(beyond - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / 2000)
    assert np.max(np.abs(rates - 0.02)) < 6 * sigma
    assert abs(rates.mean() - 0.02) < 5 * sigma / math.sqrt(2000)


def test_noised_records_say_so_and_hide_the_exact_counts():
    record = _window(requests=100, errors=3).record("dev-1", {}, epsilon=1.0, rng=np.random.default_rng(3))
    assert record["privacy"] == {"mechanism": "laplace", "epsilon": 1.0, "sensitivity": telemetry.SENSITIVITY}
    assert record["requests"] != 100 and record["errors"] != 3
    assert set(record["predictions"]) == {"0", "1"}, "every class is reported, even with no prediction"


def test_latency_quantile_and_prediction_shift_from_summed_histograms():
    fast = [_window(requests=100, latency_ms=1.0).record(f"d{i}", {}) for i in range(3)]
    slow = [_window(requests=100, latency_ms=10.0).record(f"s{i}", {}) for i in range(3)]
    fast_stats, slow_stats = telemetry.cohort_stats(fast), telemetry.cohort_stats(slow)
    assert fast_stats.devices == 3 and fast_stats.requests == 300
    # Bins are a factor sqrt(2) wide: a quantile is known to within that factor.
    assert 1.0 / math.sqrt(2) < fast_stats.latency_quantile(0.95) <= 1.0 * math.sqrt(2)
    assert 10.0 / math.sqrt(2) < slow_stats.latency_quantile(0.95) <= 10.0 * math.sqrt(2)
    same = telemetry.total_variation(fast_stats.prediction_shares(), slow_stats.prediction_shares())
    assert same == 0.0
    assert telemetry.total_variation({"0": 1.0, "1": 0.0}, {"0": 0.5, "1": 0.5}) == pytest.approx(0.5)


def test_records_are_partitioned_by_model_date_and_group_and_read_back_by_window(tmp_path):
    store = ObjectStore((tmp_path / "store").as_uri())
    for minutes in (0, 30, 60 * 25):  # the last one lands in the next day's partition
        record = _window(requests=5).record("dev-1", {}, now=T0 + timedelta(minutes=minutes))
        telemetry.write_record(store, record)
    telemetry.write_record(store, {"kind": "status", "device_id": "dev-1", "model": "m", "version": "3",
                                   "group": "phones", "ts": telemetry.timestamp(T0), "state": "active"})
    assert (tmp_path / "store" / "telemetry" / "m" / "2026-11-27" / "phones" / "dev-1.jsonl").is_file()
    assert (tmp_path / "store" / "telemetry" / "m" / "2026-11-28" / "phones" / "dev-1.jsonl").is_file()
    everything = telemetry.read_records(store, "m", T0 - timedelta(hours=1), T0 + timedelta(days=2))
    assert len(everything) == 4
    window = telemetry.read_records(store, "m", T0 + timedelta(minutes=10), T0 + timedelta(hours=2), "inference")
    assert [r["ts"] for r in window] == [telemetry.timestamp(T0 + timedelta(minutes=30))]
    assert telemetry.read_records(store, "other", T0, T0 + timedelta(days=1)) == []
