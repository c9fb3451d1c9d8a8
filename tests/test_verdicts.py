"""verdicts.py: the Wilson interval against hand-computed values and statsmodels' formula, and each verdict
on the cases the report card must get right (starved, no effect at 0 -> 0, overlapping intervals)."""
import math

import pytest

from verdicts import Measure, compare, in_words, is_starved, stage_verdict, steps_text, tally, wilson_interval


def test_wilson_interval_by_hand():
    # 0 of 20: low 0, high z^2/(n + z^2) = 3.8416/23.8416
    assert wilson_interval(0.0, 20) == pytest.approx((0.0, 3.8416 / 23.8416))
    # 10 of 20: symmetric around 0.5, half-width z sqrt(1/80 + z^2/1600) / (1 + z^2/20)
    half = 1.96 * math.sqrt(0.25 / 20 + 1.96 ** 2 / 1600) / (1 + 1.96 ** 2 / 20)
    assert wilson_interval(0.5, 20) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(0.5, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)  # the published table value
    low, high = wilson_interval(1.0, 5)
    assert high == 1.0 and low == pytest.approx(5 / (5 + 3.8416))
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_a_stage_that_ran_2_of_300_steps_is_starved():
    flat = [Measure("accuracy", 0.1, 0.1, n=20, before_n=20)]
    assert stage_verdict(2, 300, "max_time", flat) == "starved"
    assert is_starved(2, 300, None) and not is_starved(2, 300, "early_stop") and not is_starved(2, 300, "max_steps")
    assert stage_verdict(300, 300, "max_steps", flat) == "no effect"  # ran its budget: not starved, just no effect
    assert stage_verdict(80, 300, "max_time", flat) == "no effect"  # over a quarter of the steps
    assert steps_text(2, 300, "max_time") == "2 of 300 steps (stopped by the clock)"
    assert "starved: it ran 2 of 300 steps" in in_words("grpo", "starved", flat, steps_text(2, 300, "max_time"))


def test_a_rate_0_to_0_is_no_effect_and_overlap_is_not_worked():
    assert compare(Measure("stop rate", 0.0, 0.0, n=16, before_n=16)) == "no effect"
    assert stage_verdict(400, 400, "max_steps", [Measure("stop rate", 0.0, 0.0, n=16, before_n=16)]) == "no effect"
    # 8/20 -> 11/20: the 95% intervals overlap
    assert compare(Measure("accuracy", 0.40, 0.55, n=20, before_n=20)) == "no effect"
    # the same rates on 400 items do not overlap
    assert compare(Measure("accuracy", 0.40, 0.55, n=400, before_n=400)) == "worked"
    assert compare(Measure("accuracy", 0.0, 0.5, n=20, before_n=20)) == "worked"
    assert compare(Measure("accuracy", 0.8, 0.2, n=20, before_n=20)) == "regressed"
    # an exact reference before (chance 0.5): only the after value has an interval
    assert compare(Measure("preference accuracy", 0.5, 0.65, n=20)) == "no effect"  # [0.43, 0.82]
    assert compare(Measure("preference accuracy", 0.5, 0.70, n=30)) == "worked"  # [0.52, 0.83]
    assert compare(Measure("preference accuracy", 0.5, 0.75, n=60)) == "worked"


def test_metrics_without_a_count_use_the_tolerance_and_direction():
    assert compare(Measure("val bpb", 2.50, 2.40, higher_is_better=False)) == "worked"
    assert compare(Measure("val bpb", 2.50, 2.49, higher_is_better=False)) == "no effect"  # 0.4% < 1%
    assert compare(Measure("val bpb", 2.40, 2.50, higher_is_better=False)) == "regressed"
    assert compare(Measure("val bpb", 2.40, None)) == "not measured"
    assert Measure("val bpb", 2.5, 2.4, higher_is_better=False).text() == "val bpb 2.500 -> 2.400 (-4.0%)"
    assert Measure("accuracy", 0.0, 0.5, n=20, before_n=20).text() == \
        "accuracy 0.00 [0.00, 0.16] -> 0.50 [0.30, 0.70] (n=20)"


def test_a_guard_that_regressed_makes_the_stage_regress():
    smaller = Measure("weights MB", 4.0, 1.0, higher_is_better=False)
    ok = Measure("val bpb", 2.0, 2.05, higher_is_better=False, tolerance=0.05, goal=False)
    worse = Measure("val bpb", 2.0, 2.5, higher_is_better=False, tolerance=0.05, goal=False)
    assert stage_verdict(None, None, None, [smaller, ok]) == "worked"
    assert stage_verdict(None, None, None, [smaller, worse]) == "regressed"
    assert "val bpb 2.000 -> 2.500 (+25.0%)" in in_words("quant_rtn", "regressed", [smaller, worse], "-")
    # a guard alone decides nothing
    assert stage_verdict(None, None, None, [ok]) == "not measured"


def test_tally_counts_judged_stages():
    verdicts = {"pretrain": "worked", "sft": "no effect", "grpo": "starved", "dpo": "worked",
                "tokenizer": "not measured", "ppo": "not run", "quant_rtn": "regressed"}
    assert tally(verdicts) == "2 of 5 judged stages worked (1 no effect, 1 regressed, 1 starved)"
    assert tally({"a": "worked"}) == "1 of 1 judged stages worked"


def test_a_stage_that_took_no_step_is_starved_not_regressed():
    """dpo on SmolLM2 stopped by the clock before its first step: its held-out accuracy read 0.5 (the chance
    prior) -> 0.00 (every margin exactly 0 against the identical reference), which is no regression."""
    accuracy = Measure("preference accuracy", 0.5, 0.0, n=60)
    assert stage_verdict(0, 30, "max_time", [accuracy]) == "starved"
    assert stage_verdict(0, 30, "max_steps", [accuracy]) == "no effect"
    assert stage_verdict(1, 30, "max_time", [accuracy]) == "regressed"  # one real update: the drop counts
