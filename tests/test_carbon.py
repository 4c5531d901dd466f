"""The carbon estimate: a hand-computed example, overrides, and bad settings."""
from __future__ import annotations

import pytest

from m2cache.carbon import CarbonModel
from m2cache.errors import ConfigError


def test_estimate_matches_a_hand_computed_example() -> None:
    model = CarbonModel()
    # 10 s on an H200 generating 100 tokens; 6 GB read off the SSD, 12 GB copied up.
    est = model.estimate(10.0, 100, {"ssd_to_dram": 6_000_000_000, "dram_to_hbm": 12_000_000_000},
                         "NVIDIA H200")
    expected = {
        "cpu": 65.0 * 10,                  # 650 J
        "dram": 0.375 * 16 * 10,           # 60 J
        "gpu": 700.0 * 10,                 # 7000 J
        "ssd": 5.0 * (6e9 / 3e9),          # busy 2 s -> 10 J
        "ssd_to_dram": 6e9 * 8 * 10e-12,   # 0.48 J
        "dram_to_hbm": 12e9 * 8 * 10e-12,  # 0.96 J
    }
    assert est.breakdown == pytest.approx(expected)
    joules = 650 + 60 + 7000 + 10 + 0.48 + 0.96
    assert est.joules == pytest.approx(joules)
    assert est.grams == pytest.approx(joules / 3.6e6 * 820)
    assert est.grams_per_1k_tokens == pytest.approx(joules / 3.6e6 * 820 * 1000 / 100)


def test_cpu_device_has_no_accelerator_term_and_ssd_busy_time_is_capped_by_the_run() -> None:
    est = CarbonModel().estimate(1.0, 10, {"ssd_to_dram": 30_000_000_000}, "cpu")
    assert est.breakdown["gpu"] == 0.0
    assert est.breakdown["ssd"] == pytest.approx(5.0 * 1.0)


def test_from_string_overrides_named_constants_and_the_grid_alias() -> None:
    model = CarbonModel.from_string(" grid=400, cpu_w=45 ,gpu_w=300")
    assert (model.grid_g_per_kwh, model.cpu_w, model.gpu_w) == (400.0, 45.0, 300.0)
    assert model.dram_gb == CarbonModel().dram_gb
    assert CarbonModel.from_string("") == CarbonModel()
    assert CarbonModel.from_string("gpu_w=auto").gpu_w is None
    half = CarbonModel.from_string("grid=410").estimate(1.0, 1, {}, "cpu")
    full = CarbonModel().estimate(1.0, 1, {}, "cpu")
    assert half.grams == pytest.approx(full.grams / 2)


def test_gpu_override_replaces_the_nominal_power_of_the_device() -> None:
    est = CarbonModel(gpu_w=100.0).estimate(2.0, 1, {}, "NVIDIA H100 80GB HBM3")
    assert est.breakdown["gpu"] == pytest.approx(200.0)


@pytest.mark.parametrize("spec", ["grid=400,bogus=1", "cpu_w", "cpu_w=fast", "cpu_w=-5",
                                  "ssd_bytes_per_s=0"])
def test_bad_settings_raise_config_error_naming_the_problem(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        CarbonModel.from_string(spec)
    assert spec.split(",")[-1].split("=")[0] in str(info.value)


def test_unknown_key_error_lists_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="grid_g_per_kwh"):
        CarbonModel.from_string("watts=3")


def test_unknown_device_without_gpu_w_asks_for_it() -> None:
    with pytest.raises(ConfigError, match="gpu_w"):
        CarbonModel().estimate(1.0, 1, {}, "tpu-v5")


def test_unknown_edge_and_zero_tokens_are_rejected() -> None:
    with pytest.raises(ValueError, match="edges"):
        CarbonModel().estimate(1.0, 1, {"hbm_to_moon": 1}, "cpu")
    with pytest.raises(ValueError):
        CarbonModel().estimate(1.0, 0, {}, "cpu")
