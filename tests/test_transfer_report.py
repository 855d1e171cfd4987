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
    assert not any(name.startswith("compose, mean") for name in checks)     # one seed: no mean


def test_composition_target_on_the_mean_over_seeds():
    """Seeds keeping 0.95 / 0.875 of the subjectivity gain: mean 91% ± 5 PASS (one seed below);
    wordnet 0.75 / 0.85: mean 80% FAIL; a merge missing on one seed gets no mean."""
    base = {"singles": {"subjectivity": 0.80, "wordnet": 0.60}, "zero_shot": {"subjectivity": 0.60, "wordnet": 0.40}}
    compose = [{"seed": 0, **base, "ties": {"subjectivity": 0.79, "wordnet": 0.55}, "fisher": {"subjectivity": 0.8, "wordnet": 0.6}},
               {"seed": 1, **base, "ties": {"subjectivity": 0.775, "wordnet": 0.57}}]
    checks = {c["check"]: c for c in check_targets({"rows": []}, compose)}
    subj = checks["compose, mean over 2 seeds, ties: share of the single transfer's gain kept on subjectivity (per seed 95 / 87)"]
    assert subj["value"] == "91% ± 5" and subj["result"] == "PASS"
    word = checks["compose, mean over 2 seeds, ties: share of the single transfer's gain kept on wordnet (per seed 75 / 85)"]
    assert word["value"] == "80% ± 7" and word["result"] == "FAIL"
    assert not any("fisher" in name and name.startswith("compose, mean") for name in checks)


def test_seed_tasks_run_the_other_tasks_at_the_first_seed_only():
    from benchmarks.transfer import Plan

    plan = Plan(settings=("real", "reverse"), tasks={"real": ("wordnet", "subjectivity"), "reverse": ("wordnet",)},
                seeds={"real": (0, 1, 2), "reverse": (0,)}, sizes=(128,), seed_tasks=("wordnet",),
                compose=True, fewshot=(), ablations=False)
    assert plan.tasks_at("real", 0) == ("wordnet", "subjectivity")
    assert plan.tasks_at("real", 1) == ("wordnet",) == plan.tasks_at("real", 2)
    everything = Plan(**{**plan.__dict__, "seed_tasks": None})
    assert everything.tasks_at("real", 2) == ("wordnet", "subjectivity")
    assert plan.priors_at("real") == ()
    priors = Plan(**{**plan.__dict__, "priors": (1.0, 3.0), "prior_settings": ("reverse",)})
    assert priors.priors_at("real") == () and priors.priors_at("reverse") == (1.0, 3.0)
    assert Plan(**{**priors.__dict__, "prior_settings": None}).priors_at("real") == (1.0, 3.0)


def test_kept_gain_is_the_share_of_the_single_gain():
    from benchmarks.transfer import kept_gain

    assert kept_gain(0.55, 0.40, 0.60) == pytest.approx(0.75)
    assert kept_gain(0.35, 0.40, 0.60) == pytest.approx(-0.25)         # below zero-shot: negative
    assert kept_gain(0.50, 0.40, 0.40) != kept_gain(0.50, 0.40, 0.40)  # no single gain: NaN


def test_identity_prior_variants_are_judged_like_the_default():
    units = [_unit(0, 0.40, 0.80, naive=0.66, **{"bico-128": 0.64, "bico-prior1": 0.70}),
             _unit(1, 0.40, 0.80, naive=0.67, **{"bico-128": 0.65, "bico-prior1": 0.71})]
    checks = {c["check"]: c for c in check_targets(summarise({"units": units}), [])}
    assert checks["real/wordnet: bico-128 vs naive"]["result"] == "FAIL"          # 0.645 < 0.665
    prior = checks["real/wordnet: bico-prior1 vs naive"]
    assert prior["result"] == "PASS" and prior["value"] == "70.5 vs 66.5 (spread 0.7)"
    rec = checks["mean gain recovery of bico-128 over tasks/settings with gain >= 10 points"]
    assert rec["value"] == "61%"                    # the default's recovery only: (0.245 / 0.40)


def test_rerender_recomputes_summary_and_checks_from_the_recorded_units(tmp_path):
    import json

    from benchmarks.transfer import main

    units = [_unit(0, 0.40, 0.80, naive=0.66, **{"bico-128": 0.64, "bico-prior1": 0.70}),
             _unit(1, 0.40, 0.80, naive=0.67, **{"bico-128": 0.65, "bico-prior1": 0.71})]
    report = {"command": "python -m benchmarks.transfer --seeds 0 1", "started": "s", "finished": "f",
              "wall_minutes": 0.0, "machine": "m", "compute_minutes": 1.0, "weights": [1.0],
              "plan": {"sizes": [128], "priors": [1.0]}, "results": {"units": units, "compose": []},
              "summary": {"rows": []}, "checks": [], "notes": []}
    path = tmp_path / "transfer.json"
    path.write_text(json.dumps(report))
    assert main(["--rerender", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["summary"]["rows"][0]["methods"]["bico-prior1"]["test"][0] == pytest.approx(0.705)
    md = (tmp_path / "transfer.md").read_text()
    assert "| real/wordnet: bico-prior1 vs naive | 70.5 vs 66.5 (spread 0.7) | beats it beyond seed noise | PASS |" in md
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert "bico-prior1" in header and "fewshot-128" not in header and "bico-32" not in header  # not run: no column


def _report(command, units, **plan):
    return {"command": command, "started": f"start {command}", "finished": f"end {command}", "wall_minutes": 1.0,
            "machine": "m", "weights": [1.0], "plan": {"sizes": [128], **plan},
            "results": {"units": units, "compose": []}}


def test_combine_replaces_a_rerun_setting_and_lists_each_rows_command(tmp_path):
    import json

    from benchmarks.transfer import main

    def unit(setting, seed, target, bico):
        return {**_unit(seed, 0.40, 0.80, naive=0.60, **{"bico-128": bico}), "setting": setting, "target": target}

    first = _report("run-all", [unit("real", 0, "B", 0.70), unit("version", 0, "V-old", 0.50)])
    second = _report("run-version", [unit("version", 0, "V-new", 0.66)], priors=[1.0], version_lr=5e-4)
    paths = []
    for name, rep in (("a.json", first), ("b.json", second)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(rep))
    out = tmp_path / "out"
    assert main(["--combine", *map(str, paths), "--results", str(out)]) == 0
    saved = json.loads((out / "transfer.json").read_text())
    rows = {(u["setting"], u["seed"]): u for u in saved["results"]["units"]}
    assert rows[("version", 0)]["target"] == "V-new" and rows[("version", 0)]["run_command"] == "run-version"
    assert [s["command"] for s in saved["sources"]] == ["run-all", "run-version"]
    assert [s["rows"] for s in saved["sources"]] == [["real"], ["version"]]
    md = (out / "transfer.md").read_text()
    assert "- `run-all`: settings real; start run-all to end run-all" in md
    assert "lr 0.0005" in md and "| version | wordnet | 1 | 40.0 | 60.0 [50%] | 66.0 [65%] |" in md


def test_combine_refuses_two_target_models_in_one_setting(tmp_path):
    import json

    from benchmarks.transfer import main

    a = _report("a", [{**_unit(0, 0.4, 0.8, naive=0.6), "setting": "version", "target": "V1"}])
    b = _report("b", [{**_unit(1, 0.4, 0.8, naive=0.6), "setting": "version", "target": "V2"}])
    for name, rep in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(rep))
    with pytest.raises(SystemExit, match="setting version has rows on 2 different target models"):
        main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--results", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_combine_and_rerender_name_an_unreadable_file(tmp_path):
    from benchmarks.transfer import main

    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"--rerender: .*broken.json is not a readable transfer results file"):
        main(["--rerender", str(bad)])
    with pytest.raises(SystemExit, match=r"--combine: .*missing.json is not a readable transfer results file"):
        main(["--combine", str(tmp_path / "missing.json"), "--results", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_cached_unit_counts_computed_and_read_units(tmp_path, monkeypatch):
    from benchmarks import transfer

    monkeypatch.setattr(transfer, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(transfer, "UNIT_COUNTS", {"computed": 0, "read": 0})
    calls = []
    first = transfer.cached_unit("references", {"setting": "real", "task": "wordnet", "seed": 0},
                                 lambda: calls.append(1) or {"x": 1})
    again = transfer.cached_unit("references", {"setting": "real", "task": "wordnet", "seed": 0},
                                 lambda: calls.append(1) or {"x": 2})
    assert first["x"] == again["x"] == 1 and calls == [1]
    assert transfer.UNIT_COUNTS == {"computed": 1, "read": 1}


def test_time_budget_is_judged_only_on_a_run_from_an_empty_cache():
    from benchmarks.transfer import FULL_RUN_MINUTES, _provenance, wall_check

    base = {"command": "c", "started": "s", "finished": "f", "compute_minutes": 80.0}
    cold = {**base, "wall_minutes": 91.0, "units": {"computed": 117, "read": 0}}
    (check,) = wall_check(cold)
    assert check["value"] == "91 min" and check["result"] == "PASS" and check["target"] == f"<= {FULL_RUN_MINUTES} min"
    assert "every unit computed in it (117 units)" in check["check"]
    assert wall_check({**cold, "wall_minutes": FULL_RUN_MINUTES + 1.0})[0]["result"] == "FAIL"
    warm = {**base, "wall_minutes": 3.0, "units": {"computed": 2, "read": 115}}
    assert wall_check(warm) == [] and wall_check({**base, "wall_minutes": 3.0}) == []   # cached, or not recorded
    assert "which computed 2 units and read 115 from the cache" in _provenance(warm)[1]
    assert "cache use not recorded" in _provenance({**base, "wall_minutes": 3.0})[1]


def test_identity_prior_arguments_and_auto_column(tmp_path):
    """--identity-prior takes numbers >= 0 and `auto` (refusing others); `auto` runs as the
    `bico-priorauto` method with `identity_prior: auto`, gets its own column and its own checks,
    and sorts after the numbers when files are combined."""
    import argparse
    import json

    from benchmarks.transfer import main, methods_for, prior_method, prior_value

    assert prior_value("auto") == "auto" and prior_value("1") == 1.0 and prior_value("0") == 0.0
    for bad in ("-1", "nan", "inf", "often"):
        with pytest.raises(argparse.ArgumentTypeError):
            prior_value(bad)
    assert prior_method("auto") == "bico-priorauto" and prior_method(1.0) == "bico-prior1"
    methods = {m.name: m.transfer for m in methods_for((128,), False, (1.0, "auto"))}
    assert methods["bico-priorauto"] == {"method": "bico", "identity_prior": "auto"}
    units = [{**_unit(0, 0.40, 0.80, naive=0.66, **{"bico-128": 0.64, "bico-priorauto": 0.70}), "target": "B"}]
    for k, plan in enumerate(({"priors": ["auto"]}, {"priors": [1.0]})):
        (tmp_path / f"{k}.json").write_text(json.dumps(_report(f"cmd{k}", units, **plan)))
    assert main(["--combine", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--results", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert saved["plan"]["priors"] == [1.0, "auto"]
    md = (tmp_path / "out" / "transfer.md").read_text()
    assert "| real/wordnet: bico-priorauto vs naive | 70.0 vs 66.0 (1 seed) |" in md
    header = next(line for line in md.splitlines() if line.startswith("| setting"))
    assert "bico-priorauto" in header and "bico-prior1 " not in header     # prior 1 was not run anywhere
