"""The transfer benchmark's summary and target checks on hand-made unit results (no models):
means, spreads and gain recovery against hand-computed values, and each verdict's rule."""

from __future__ import annotations

import pytest

from benchmarks.transfer import check_targets, summarise


def _unit(seed, zs, ft, **methods):
    return {"setting": "real", "task": "wordnet", "seed": seed, "target_zero_shot": zs,
            "target_finetuned": ft, "source_expert": 0.9,
            "methods": {name: {"test": acc, "weight": 1.0} for name, acc in methods.items()}}


def test_summary_means_spreads_and_recovery():
    units = [_unit(0, 0.40, 0.80, naive=0.42, gradfix=0.50, **{"bico-128": 0.70}),
             _unit(1, 0.40, 0.80, naive=0.44, gradfix=0.52, **{"bico-128": 0.66})]
    row = summarise({"units": units})["rows"][0]
    assert row["seeds"] == 2
    assert row["gain"] == pytest.approx(0.40)
    mean, std = row["methods"]["bico-128"]["test"]
    assert mean == pytest.approx(0.68) and std == pytest.approx(0.0282842712, rel=1e-6)   # stdev of 0.70, 0.66
    rec_mean, _ = row["methods"]["bico-128"]["recovery"]
    assert rec_mean == pytest.approx(0.70)                  # ((0.30 + 0.26) / 0.40) / 2


def test_checks_need_a_margin_beyond_the_spread():
    units = [_unit(0, 0.40, 0.80, naive=0.60, gradfix=0.50, **{"bico-128": 0.70, "fewshot-128": 0.75}),
             _unit(1, 0.40, 0.80, naive=0.70, gradfix=0.52, **{"bico-128": 0.66, "fewshot-128": 0.69})]
    checks = {c["check"]: c for c in check_targets(summarise({"units": units}), [])}
    # bico 0.68 +- 0.028; naive 0.65 +- 0.071: margin 0.03 < 0.071 -> not beyond noise
    assert checks["real/wordnet: bico-128 vs naive"]["result"] == "FAIL"
    # gradfix 0.51 +- 0.014: margin 0.17 > 0.028
    assert checks["real/wordnet: bico-128 vs gradfix"]["result"] == "PASS"
    # few-shot 0.72 +- 0.042: bico is 0.04 below, within the spread -> "at least matches"
    assert checks["real/wordnet: bico-128 vs fewshot-128"]["result"] == "PASS"
    rec = checks["mean gain recovery of bico-128 over tasks/settings with gain >= 10 points"]
    assert rec["value"] == "70%" and rec["result"] == "PASS"


def test_one_seed_verdicts_say_so_and_small_gains_are_not_judged():
    one = [_unit(0, 0.40, 0.80, naive=0.42, **{"bico-128": 0.50})]
    checks = check_targets(summarise({"units": one}), [])
    vs_naive = next(c for c in checks if c["check"].endswith("vs naive"))
    assert vs_naive["result"].startswith("PASS") and "1 seed" in vs_naive["result"]
    assert next(c for c in checks if c["check"].startswith("mean gain"))["result"] == "FAIL"   # 25% < 60%
    small = [_unit(0, 0.70, 0.75, naive=0.72, **{"bico-128": 0.71})]       # a 5-point gain
    assert check_targets(summarise({"units": small}), []) == []


def test_composition_keeps_share_of_each_single_gain():
    compose = [{"seed": 0, "singles": {"subjectivity": 0.80, "wordnet": 0.60},
                "zero_shot": {"subjectivity": 0.60, "wordnet": 0.40},
                "ties": {"subjectivity": 0.79, "wordnet": 0.55},
                "task_arithmetic": {"subjectivity": 0.70, "wordnet": 0.50}}]
    checks = {c["check"]: c for c in check_targets({"rows": []}, compose)}
    kept = checks["compose seed 0 ties: share of the single transfer's gain kept on subjectivity"]
    assert kept["value"] == "95%" and kept["result"] == "PASS"       # 0.19 / 0.20
    kept = checks["compose seed 0 ties: share of the single transfer's gain kept on wordnet"]
    assert kept["value"] == "75%" and kept["result"] == "FAIL"       # 0.15 / 0.20
    assert checks["compose seed 0 task_arithmetic: share of the single transfer's gain kept on wordnet"]["result"] == "-"


def test_seed_tasks_run_the_other_tasks_at_the_first_seed_only():
    from benchmarks.transfer import Plan

    plan = Plan(settings=("real", "reverse"), tasks={"real": ("wordnet", "subjectivity"), "reverse": ("wordnet",)},
                seeds={"real": (0, 1, 2), "reverse": (0,)}, sizes=(128,), seed_tasks=("wordnet",),
                compose=True, fewshot=(), ablations=False)
    assert plan.tasks_at("real", 0) == ("wordnet", "subjectivity")
    assert plan.tasks_at("real", 1) == ("wordnet",) == plan.tasks_at("real", 2)
    everything = Plan(**{**plan.__dict__, "seed_tasks": None})
    assert everything.tasks_at("real", 2) == ("wordnet", "subjectivity")


def test_kept_gain_is_the_share_of_the_single_gain():
    from benchmarks.transfer import kept_gain

    assert kept_gain(0.55, 0.40, 0.60) == pytest.approx(0.75)
    assert kept_gain(0.35, 0.40, 0.60) == pytest.approx(-0.25)         # below zero-shot: negative
    assert kept_gain(0.50, 0.40, 0.40) != kept_gain(0.50, 0.40, 0.40)  # no single gain: NaN
