"""The confirmatory stage: fresh documents (disjoint from every exploratory one, read from the profiles), the rule that
picks the confirmatory claims, equivalence verdicts at their bounds, and the forest plot of CLAIMS.md."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from replaceme_core.experiments import confirmatory as cf
from replaceme_core.experiments.claims import load_register, parse_register, write_claims_page
from replaceme_core.experiments.paper import notebook_names, plan_lanes
from replaceme_core.experiments.workbench import load_profile

PROFILES = ("smoke", "cpu", "gpu", "paper")
SIZES = {"arc_easy": 570, "hellaswag": 10042, "piqa": 1838, "sciq": 1000, "lambada_openai": 5153}


def entry(kind, value=0.0, margin=None, cid="x.y", notebook="01_main_results", **extra):
    test = {"kind": kind, "value": value} | ({"margin": margin} if margin is not None else {})
    return {"id": cid, "notebook": notebook, "claim": "c", "ref": "Table 2", "statistic": "s", "test": test, **extra}


@pytest.mark.parametrize("name", PROFILES)
def test_confirmatory_documents_are_disjoint_from_every_exploratory_suite(name):
    profile = load_profile(name)
    assert cf.disjointness_problems(profile, SIZES) == []
    explored = cf.exploratory_ranges(profile, SIZES)
    for task, ranges in cf.confirmatory_ranges(profile, SIZES).items():
        for start, stop, _ in ranges:
            assert start < stop, f"{name}: {task} has no confirmatory document"
            for s, e, where in explored.get(task, []):  # every suite the profile declares, whichever section holds it
                assert stop <= s or e <= start, f"{name}: {task} {start}..{stop - 1} overlaps {where} {s}..{e - 1}"


def test_the_cpu_profile_has_a_confirmatory_stage_whose_rule_matches_its_suite():
    p = load_profile("cpu")
    suites = cf.confirmatory_suites(p)
    assert suites == [p["confirmatory"]["suite"]]
    start, stop = p["eval"][suites[0]]["docs"]
    assert stop - start == p["confirmatory"]["documents"]
    # every exploratory suite of the profile was found, so a new one cannot slip past the check
    where = {w for ranges in cf.exploratory_ranges(p, SIZES).values() for *_, w in ranges}
    assert {"eval.main", "eval.sweep", "eval.window", "calibration_data.eval", "repeatability.eval",
            "calibration_data.task_specific", "calibration_data.task_specific (calibration half)"} <= where
    reg = load_register()
    for cid in p["confirmatory"]["required"] + p["confirmatory"]["measurable"]:
        reg.spec(cid)  # an exploratory claim of the register
        assert f"equiv.{cid}" in reg.claims, f"{cid}: its equivalence test is not declared"


def test_an_overlap_or_a_limit_is_refused():
    p = {"eval": {"main": {"tasks": ["arc_easy", "sciq"], "limit": 56},
                  "confirm": {"tasks": ["arc_easy", "sciq"], "docs": [40, 100]}},
         "confirmatory": {"suite": "confirm"}}
    problems = cf.disjointness_problems(p, SIZES)
    assert any("arc_easy documents 40..55" in x and "eval.main" in x for x in problems)
    p["eval"]["confirm"]["docs"] = [56, 600]
    p["calibration_data"] = {"task_specific": {"task": "sciq", "samples": 64, "limit": 40}}
    assert any("sciq documents 500..599" in x for x in cf.disjointness_problems(p, SIZES))  # the calibration half
    p["eval"]["main"]["limit"] = None  # every document is exploratory
    assert cf.disjointness_problems(p, SIZES)
    p["eval"]["confirm"] = {"tasks": ["arc_easy"], "limit": 20}
    assert "needs a `docs" in cf.disjointness_problems(p, SIZES)[0]


def test_plan_picks_required_then_near_claims_headline_first():
    reg = parse_register([entry("greater", cid="a.req", headline=True), entry("greater", cid="a.near"),
                          entry("greater", cid="a.near_head", headline=True), entry("greater", cid="a.far"),
                          entry("greater", cid="a.held"), entry("greater", cid="a.nearer")])
    sizing = pd.DataFrame([
        {"id": "a.req", "verdict": "inconclusive", "data_to_decide": 12.0},
        {"id": "a.near", "verdict": "inconclusive", "data_to_decide": 3.5},
        {"id": "a.near_head", "verdict": "inconclusive", "data_to_decide": 3.9},
        {"id": "a.nearer", "verdict": "inconclusive", "data_to_decide": 2.1},
        {"id": "a.far", "verdict": "inconclusive", "data_to_decide": 40.0},
        {"id": "a.held", "verdict": "held", "data_to_decide": float("nan")},
    ])
    rule = {"required": ["a.req", "a.held"], "measurable": ["a.near", "a.near_head", "a.far", "a.nearer", "a.held"],
            "max_factor": 4, "max_further": 2, "documents": 100}
    plan = cf.plan(rule, sizing, reg, exploratory_n=50)
    assert list(plan["claim"]) == ["a.req", "a.held", "a.near_head", "a.nearer"]  # headline first, then nearest
    need = dict(zip(plan["claim"], plan["documents needed"]))
    assert need["a.req"] == 600 and need["a.held"] == 50 and need["a.nearer"] == 105
    assert list(plan["powered"]) == [False, True, False, False]  # 3.9 × 50 and 2.1 × 50 exceed the 100 planned
    # without any exploratory sizing (the notebooks have not run): the required claims only
    empty = cf.plan(rule, sizing.iloc[:0], reg, exploratory_n=50)
    assert list(empty["claim"]) == ["a.req", "a.held"] and list(empty["exploratory verdict"]) == ["not run"] * 2


def test_supported_picks_keep_the_most_supported_runs():
    assert cf.supported_picks({2: 0.40, 3: 0.02, 11: 0.58}, 0.20, 2) == [11, 2]
    assert cf.supported_picks({2: 0.20, 11: 0.20, 5: 0.6}, 0.20, 2) == [5, 2]
    assert cf.supported_picks({2: 0.1}, 0.20, 2) == []


@pytest.mark.parametrize("interval, verdict", [
    ((-0.0999, 0.0999), "held"),        # strictly inside ±0.10
    ((-0.10, 0.05), "inconclusive"),    # touching a bound is not inside
    ((-0.05, 0.10), "inconclusive"),
    ((0.10, 0.2), "not held"),          # at or beyond a bound: not equivalent
    ((-0.3, -0.10), "not held"),
    ((-0.2, 0.2), "inconclusive"),
])
def test_equivalence_verdicts_at_the_boundary(interval, verdict):
    reg = load_register()
    spec = reg.spec("equiv.main.ls_vs_uidl.acc@11-18")
    assert (spec.kind, spec.null, spec.margin, spec.stage) == ("equivalent", 0.0, 0.10, "confirmatory")
    assert spec.decide(*interval) == verdict


def test_a_re_test_takes_the_exploratory_test_unchanged():
    reg = load_register()
    base, again = reg.spec("main.ls_vs_uidl.acc"), reg.spec("confirm.main.ls_vs_uidl.acc@2-9")
    assert (again.kind, again.null, again.margin, again.headline) == (base.kind, base.null, base.margin, base.headline)
    assert again.notebook == "14_confirmatory" and again.stage == "confirmatory" and "blocks 2-9" in again.claim
    assert cf.base_id("equiv.main.ls_vs_uidl.acc@2-9") == "main.ls_vs_uidl.acc"
    rows = pd.DataFrame([reg.check("confirm.main.ls_vs_uidl.acc@2-9", 0.01, -0.05, 0.07).__dict__,
                         reg.check("equiv.main.ls_vs_uidl.acc@2-9", 0.01, -0.05, 0.07).__dict__,
                         reg.check("confirm.main.ls.retains_90@2-9", 0.8, 0.7, 0.9).__dict__])
    dec = cf.decided(rows)
    assert list(dec["decided"]) == [True, False]  # inconclusive, but its equivalence held; then inconclusive alone


def test_forest_plot_is_written_and_lists_every_headline_and_confirmatory_claim(tmp_path):
    reg = parse_register([entry("greater", cid="a.one", headline=True), entry("less", value=1, cid="a.two", headline=True),
                          entry("greater", cid="a.three"),
                          entry("equivalent", margin=0.1, cid="equiv.a.one", notebook="14_confirmatory")])
    explo = [reg.check("a.one", 0.03, -0.04, 0.1), reg.check("a.two", 0.8, 0.6, 1.1), reg.check("a.three", 0.2, 0.1, 0.3)]
    conf = [reg.check("confirm.a.one@2-9", 0.01, -0.05, 0.07), reg.check("equiv.a.one@2-9", 0.01, -0.05, 0.07)]
    pd.DataFrame([r.__dict__ for r in explo]).to_csv(tmp_path / "claims_01_main_results.csv", index=False)
    pd.DataFrame([r.__dict__ for r in conf]).to_csv(tmp_path / "claims_14_confirmatory.csv", index=False)
    text = write_claims_page(tmp_path, reg).read_text()
    assert (tmp_path / "fig_claims.png").stat().st_size > 1000
    assert text.split("\n")[2].startswith("![") and "fig_claims.png" in text.split("\n")[2]
    assert "## Confirmatory stage" in text and "1 claims re-tested, 1 decided (100%" in text
    from replaceme_core.experiments.report import forest_plot  # the rows it draws: headline and confirmatory
    drawn = []
    import replaceme_core.experiments.report as report

    orig = report.forest_plot
    report.forest_plot = lambda rows, register, path: drawn.extend(rows["id"]) or orig(rows, register, path)
    try:
        write_claims_page(tmp_path, reg)
    finally:
        report.forest_plot = orig
    assert sorted(drawn) == sorted(["a.one", "a.two", "confirm.a.one@2-9", "equiv.a.one@2-9"])
    assert forest_plot is orig
    assert "`equiv.a.one`" not in text  # an instance was checked: not listed as unchecked
    assert math.isfinite(pd.read_csv(tmp_path / "claims_14_confirmatory.csv")["lo"].iloc[0])


@pytest.mark.parametrize("name", ("smoke", "cpu"))
def test_the_confirmatory_notebook_runs_in_a_lane(name):
    lanes = plan_lanes(load_profile(name).get("lanes"), notebook_names())
    assert "14_confirmatory" in lanes[-1]
