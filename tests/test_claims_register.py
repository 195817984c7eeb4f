"""The claims register decides verdicts from declared tests; CLAIMS.md counts what the notebooks wrote."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from replaceme_core.experiments.claims import (
    RegisterError,
    load_register,
    parse_register,
    write_claims_page,
)


def entry(kind, value=0.0, margin=None, cid="x.y", notebook="01_main_results", **extra):
    test = {"kind": kind, "value": value} | ({"margin": margin} if margin is not None else {})
    return {"id": cid, "notebook": notebook, "claim": "c", "ref": "Table 2", "statistic": "s", "test": test, **extra}


@pytest.mark.parametrize("kind, value, margin, interval, verdict", [
    ("greater", 0, None, (0.01, 0.2), "held"),
    ("greater", 0, None, (-0.01, 0.2), "inconclusive"),
    ("greater", 0, None, (-0.3, -0.01), "not held"),
    ("less", 1, None, (0.5, 0.9), "held"),
    ("less", 1, None, (0.9, 1.1), "inconclusive"),
    ("less", 1, None, (1.1, 1.4), "not held"),
    ("at_least", 0.85, None, (0.86, 0.95), "held"),
    ("at_least", 0.85, None, (0.70, 0.84), "not held"),
    ("at_most", 2.0, None, (1.0, 1.9), "held"),
    ("non_inferior", 0, 0.01, (-0.009, 0.3), "held"),
    ("non_inferior", 0, 0.01, (-0.02, 0.3), "inconclusive"),
    ("non_inferior", 0, 0.01, (-0.2, -0.02), "not held"),
    ("not_worse_lower", 1, 0.05, (0.9, 1.04), "held"),
    ("not_worse_lower", 1, 0.05, (1.06, 1.2), "not held"),
    ("equivalent", 0, 0.05, (-0.04, 0.04), "held"),
    ("equivalent", 0, 0.05, (0.0, 0.175), "inconclusive"),   # notebook 09's old "held": no margin can pass it now
    ("equivalent", 0, 0.05, (0.06, 0.175), "not held"),
    ("equivalent", 1, 0.05, (0.90, 0.94), "not held"),
    ("greater", 0, None, (float("nan"), 0.2), "inconclusive"),
    # an interval that only touches the claimed side at its edge contains no value that satisfies the claim
    ("less", 0, None, (0.0, 0.0), "not held"),          # two models agreeing on every document: no decrease
    ("greater", 0, None, (-0.1, 0.0), "not held"),
    ("greater", 0, None, (0.0, 0.1), "inconclusive"),   # 0 is in it, and so are increases
    ("non_inferior", 0, 0.03, (-0.2, -0.03), "not held"),
    ("equivalent", 0, 0.05, (0.05, 0.1), "not held"),
    ("equivalent", 0, 0.05, (-0.049, 0.049), "held"),
    ("greater", 0, None, (0.2, 0.2), "held"),                 # a deterministic quantity: lo = hi = estimate
])
def test_declared_tests_decide(kind, value, margin, interval, verdict):
    spec = parse_register([entry(kind, value, margin)]).spec("x.y")
    assert spec.decide(*interval) == verdict
    assert spec.decide(*reversed(interval)) == verdict  # the bounds' order does not matter


def test_check_returns_a_claim_row_with_the_registers_verdict():
    reg = parse_register([entry("greater", cid="a.b", headline=True)])
    row = reg.check("a.b", 0.1, 0.02, 0.2, "diff +0.1", notebook="01_main_results")
    assert (row.id, row.verdict, row.claim, row.ref) == ("a.b", "held", "c", "Table 2")
    assert "95% CI" in row.uncertainty and "> 0" in row.uncertainty
    with pytest.raises(RegisterError, match="not in the register"):
        reg.check("a.c", 0.1, 0.02, 0.2)
    with pytest.raises(RegisterError, match="belongs to notebook"):
        reg.check("a.b", 0.1, 0.02, 0.2, notebook="09_healing")


@pytest.mark.parametrize("bad, message", [
    ([entry("bigger")], "test kind"),
    ([entry("equivalent")], "positive margin"),
    ([entry("greater"), entry("less")], "appears twice"),
    ([{"id": "q", "claim": "c"}], "lacks"),
    ([{**entry("greater"), "test": {"kind": "greater", None: 0}}], "unknown test keys"),  # `null:` in YAML
])
def test_malformed_register_is_refused(bad, message):
    with pytest.raises(RegisterError, match=message):
        parse_register(bad)


def test_a_claim_whose_premise_is_not_held_is_untestable():
    reg = parse_register([entry("greater", cid="p.premise"), {**entry("greater", cid="p.claim"), "requires": "p.premise"}])
    with pytest.raises(RegisterError, match="check that premise first"):
        reg.check("p.claim", 0.5, 0.4, 0.6)
    assert reg.check("p.premise", 0.0, -0.1, 0.1).verdict == "inconclusive"
    row = reg.check("p.claim", 0.5, 0.4, 0.6)  # would be held on its own interval
    assert row.verdict == "untestable" and "`p.premise` is inconclusive" in row.uncertainty
    assert reg.check("p.premise", 0.2, 0.1, 0.3).verdict == "held"
    assert reg.check("p.claim", 0.5, 0.4, 0.6).verdict == "held"
    with pytest.raises(RegisterError, match="not in the register"):
        parse_register([{**entry("greater", cid="q"), "requires": "nowhere"}])
    with pytest.raises(RegisterError, match="another notebook"):
        parse_register([entry("greater", cid="p.premise", notebook="02_compression_sweep"),
                        {**entry("greater", cid="p.claim"), "requires": "p.premise"}])


def test_the_shipped_register_parses_and_covers_the_headline_claims():
    reg = load_register()
    ids = set(reg.claims)
    for must in ("main.ls_vs_uidl.acc", "main.regime.ls_vs_uidl.acc", "main.cosine_vs_ls.ppl"):
        assert must in ids and reg.spec(must).headline
    assert all(s.notebook[:2].isdigit() for s in reg.claims.values())


def test_claims_page_counts_and_lists_unchecked(tmp_path):
    reg = parse_register([entry("greater", cid="a.one", headline=True), entry("less", value=1, cid="a.two"),
                          entry("greater", cid="b.three", notebook="02_compression_sweep")])
    rows = [reg.check("a.one", 0.1, 0.05, 0.2), reg.check("a.two", 1.2, 1.1, 1.3)]
    pd.DataFrame([r.__dict__ for r in rows]).to_csv(tmp_path / "claims_01_main_results.csv", index=False)
    text = write_claims_page(tmp_path, reg).read_text()
    assert "**2 claims checked: 1 held (50%), 1 not held (50%), 0 inconclusive (0%), 0 untestable (0%).**" in text
    assert "## Headline claims" in text and "`b.three` (02_compression_sweep)" in text
    assert "[table](claims_01_main_results.md)" in text
    assert json.dumps(text)  # plain text, no objects leaked


def test_power_matches_a_simulated_paired_test():
    """paired_n documents give about the promised power in a simulation of the paired z-test."""
    import numpy as np

    from replaceme_core.experiments.power import (
        accuracy_diff_sd,
        detectable_effect,
        paired_n,
        per_task_n,
    )

    sd, effect = 1.0, 0.25
    n = paired_n(sd, effect)
    assert n == 126  # (1.95996 + 0.84162)² / 0.25² = 125.6
    rng = np.random.default_rng(0)
    d = rng.normal(effect, sd, size=(4000, n))
    rejected = (d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n)) > 1.959964).mean()
    assert 0.77 < rejected < 0.83
    assert detectable_effect(sd, n) == pytest.approx(effect, rel=0.01)
    assert per_task_n(sd, effect, tasks=4) == 32
    # 0/1 scores disagreeing on 30% of documents with mean difference 0.1: var = 0.3 - 0.01
    assert accuracy_diff_sd(0.3, 0.1) == pytest.approx(0.29 ** 0.5)


def test_family_entries_cover_other_profiles_instances():
    reg = parse_register([entry("greater", cid="sweep.acc.n*"), entry("less", value=1, cid="sweep.acc.n8")])
    assert reg.spec("sweep.acc.n8").kind == "less"  # an instance's own entry wins
    spec = reg.spec("sweep.acc.n16")
    assert (spec.id, spec.kind) == ("sweep.acc.n16", "greater")
    with pytest.raises(RegisterError, match="not in the register"):
        reg.spec("sweep.margin.n16")


# ---- how much more data an inconclusive claim needs (Register.check's data_to_decide, CLAIMS.md) ------------------

def test_data_to_decide_gives_80_percent_power_in_a_simulation():
    """An inconclusive paired mean over n documents; with factor × n documents and the true effect equal to the
    observed one, a simulated 95% interval clears the bound in about 80% of repetitions."""
    import numpy as np

    sd, effect, n = 1.0, 0.1, 100
    half = 1.959964 * sd / np.sqrt(n)  # the interval a run of n documents reports: [effect - half, effect + half]
    spec = parse_register([entry("greater")]).spec("x.y")
    assert spec.decide(effect - half, effect + half) == "inconclusive"
    factor = spec.data_to_decide(effect, effect - half, effect + half)
    m = int(round(factor * n))
    assert m == 785  # (2.80 / 0.1)² = 784.9
    from replaceme_core.experiments.power import paired_n
    assert m == paired_n(sd, effect)  # the same sample size the profiles' power notes use
    d = np.random.default_rng(1).normal(effect, sd, size=(3000, m))
    lower = d.mean(1) - 1.959964 * d.std(1, ddof=1) / np.sqrt(m)
    assert 0.77 < (lower > 0).mean() < 0.83


def test_data_to_decide_reads_ratios_on_the_log_scale_and_margins_at_their_bound():
    import math

    ratio = parse_register([entry("less", value=1)]).spec("x.y")
    log_diff = parse_register([entry("less", value=0)]).spec("x.y")
    est, lo, hi = 1.28, 0.785, 2.17
    assert ratio.data_to_decide(est, lo, hi) == pytest.approx(log_diff.data_to_decide(math.log(est), math.log(lo), math.log(hi)))
    c = (1.959964 + 0.841621) / 1.959964
    # non-inferiority: distance to null − margin, the interval's lower half
    ni = parse_register([entry("non_inferior", value=0, margin=0.01)]).spec("x.y")
    assert ni.data_to_decide(0.018, -0.054, 0.089) == pytest.approx(((0.018 + 0.054) * c / (0.018 + 0.01)) ** 2)
    # equivalence inside the band: held needs both bounds cleared, the harder one decides
    eq = parse_register([entry("equivalent", value=0, margin=0.05)]).spec("x.y")
    near, far = (0.06 * c / 0.04) ** 2, (0.05 * c / 0.06) ** 2
    assert eq.data_to_decide(0.01, -0.04, 0.07) == pytest.approx(max(near, far))
    # outside the band: not held needs the crossed bound cleared
    assert eq.data_to_decide(0.08, 0.0, 0.15) == pytest.approx((0.08 * c / 0.03) ** 2)
    assert math.isinf(parse_register([entry("greater")]).spec("x.y").data_to_decide(0.0, -0.08, 0.08))


def test_only_inconclusive_sampling_claims_are_sized():
    import math

    reg = parse_register([entry("greater", cid="a.one"), entry("greater", cid="a.mc", sampling=False)])
    assert math.isnan(reg.check("a.one", 0.1, 0.05, 0.2).data_to_decide)          # held: nothing to size
    assert reg.check("a.one", 0.03, -0.04, 0.1).data_to_decide > 2
    assert math.isnan(reg.check("a.mc", 0.03, -0.04, 0.1).data_to_decide)          # not a sampling interval
    with pytest.raises(RegisterError, match="sampling must be true or false"):
        parse_register([entry("greater", sampling="no")])


def test_claims_page_says_how_far_the_inconclusive_claims_are(tmp_path):
    reg = parse_register([entry("greater", cid=f"a.{i}") for i in range(4)] + [entry("greater", cid="a.mc", sampling=False)])
    rows = [reg.check("a.0", 0.05, -0.01, 0.11),   # ≈ 2.9×: within 4×
            reg.check("a.1", 0.01, -0.2, 0.22),    # ≈ 900×: beyond 100×
            reg.check("a.2", 0.0, -0.1, 0.1),      # on the bound: no effect seen
            reg.check("a.3", 0.2, 0.1, 0.3),       # held
            reg.check("a.mc", 0.01, -0.2, 0.22)]   # not sized
    pd.DataFrame([r.__dict__ for r in rows]).to_csv(tmp_path / "claims_01_main_results.csv", index=False)
    text = write_claims_page(tmp_path, reg).read_text()
    assert ("How far the 4 inconclusive claims are from a verdict" in text
            and "1 within 4× the data, 0 within 4–10×, 0 within 10–100×, 1 beyond 100×, 1 with no effect seen" in text
            and "1 not sized (no sampling interval to scale)" in text)
    assert "**inconclusive** (≈ 2.9× the data)" in text and "**inconclusive** (no effect seen)" in text
    assert "**held** |" in text  # decided claims carry no sizing
