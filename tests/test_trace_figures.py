"""The one definition of the run's figures (m2cache.figures), which the stats and the trace share."""
from __future__ import annotations

from m2cache.carbon import CarbonModel
from m2cache.figures import FIGURE_KEYS, Counters, figures

RUN = Counters(tokens=10, decode_tokens=8, first_tokens=2, prefill_s=1.0, decode_s=4.0, stall_s=2.0,
               ttft_s_sum=3.0, ssd_to_dram_bytes=5000, dram_to_hbm_bytes=2500, hbm_hits=30, hbm_misses=10,
               dram_served=9, dram_neuron_reads=1)


def test_bytes_per_token_divide_by_every_generated_token_the_prefills_included() -> None:
    assert figures(RUN)["bytes_per_token"] == {"ssd_to_dram": 500.0, "dram_to_hbm": 250.0}


def test_stall_fraction_is_the_stall_time_over_the_time_all_steps_took() -> None:
    assert figures(RUN)["stall_fraction"] == 2.0 / 5.0


def test_decode_speed_counts_decode_tokens_over_decode_time_only() -> None:
    assert figures(RUN)["decode_tokens_per_s"] == 8 / 4.0


def test_hit_ratios_and_time_to_first_token_come_from_their_counts() -> None:
    f = figures(RUN)
    assert f["hit_ratio"] == {"hbm": 0.75, "dram": 0.9, "window": 0.0} and f["ttft_s"] == 1.5
    g = figures(Counters(tokens=4, window_hits=30, window_misses=10, disk_reads=20, disk_bytes=2_000_000))
    assert g["hit_ratio"]["window"] == 0.75
    assert g["reads_per_token"] == 5.0 and g["bytes_per_read"] == 100_000.0


def test_a_difference_of_snapshots_counts_what_happened_in_between() -> None:
    later = RUN + Counters(tokens=4, decode_tokens=4, decode_s=2.0, ssd_to_dram_bytes=400)
    between = later - RUN
    assert between == Counters(tokens=4, decode_tokens=4, decode_s=2.0, ssd_to_dram_bytes=400)
    assert figures(between)["bytes_per_token"]["ssd_to_dram"] == 100.0


def test_counters_come_back_from_their_dict_and_ignore_names_they_do_not_know() -> None:
    assert Counters.from_dict({**RUN.to_dict(), "from_a_later_version": 1}) == RUN


def test_no_tokens_give_zero_figures_and_no_carbon_estimate() -> None:
    f = figures(Counters())
    assert f["bytes_per_token"] == {"ssd_to_dram": 0.0, "dram_to_hbm": 0.0} and f["stall_fraction"] == 0.0
    assert f["ttft_s"] is None and "carbon_g_per_1k_tokens" not in f


def test_carbon_is_estimated_over_the_step_time_and_every_generated_token() -> None:
    model = CarbonModel()
    expected = model.estimate(5.0, 10, {"ssd_to_dram": 5000, "dram_to_hbm": 2500}, "cpu")
    assert figures(RUN, carbon=model)["carbon_g_per_1k_tokens"] == expected.grams_per_1k_tokens


def test_every_figure_is_listed_in_figure_keys() -> None:
    assert set(figures(RUN)) == set(FIGURE_KEYS)
