"""Reported numbers, intervals and claim verdicts: checked against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from replaceme_core.experiments import report


def _result(acc_by_task: dict[str, list[float]], lambada_ll: list[float] | None = None) -> dict:
    tasks = {t: {"metric": "acc", "value": float(np.mean(v)), "n": len(v),
                 "per_doc": {"doc_id": list(range(len(v))), "acc": v}} for t, v in acc_by_task.items()}
    if lambada_ll is not None:
        tasks["lambada_openai"] = {"metric": "acc", "value": 0.0, "n": len(lambada_ll),
                                   "per_doc": {"doc_id": list(range(len(lambada_ll))), "acc": [0.0] * len(lambada_ll),
                                               "loglikelihood": lambada_ll}}
    return {"tasks": tasks, "avg_acc": None, "lambada_ppl": None}


def test_wilson_interval_matches_the_formula_and_contains_p():
    lo, hi = report.wilson_interval(30, 40)
    p, n, z = 0.75, 40, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert lo < p < hi
    assert report.wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_accuracy_difference_is_the_mean_of_per_task_differences():
    rng = np.random.default_rng(0)
    a = {t: rng.integers(0, 2, 50).astype(float).tolist() for t in ("x", "y")}
    b = {t: rng.integers(0, 2, 50).astype(float).tolist() for t in ("x", "y")}
    d, lo, hi = report.accuracy_difference(_result(a), _result(b), ["x", "y"])
    expected = np.mean([np.mean(a[t]) - np.mean(b[t]) for t in ("x", "y")])
    assert d == pytest.approx(expected)
    assert lo <= d <= hi and hi - lo > 0


def test_identical_results_give_a_zero_width_interval_and_inconclusive_verdict():
    a = _result({"x": [1.0, 0.0, 1.0, 1.0]})
    d, lo, hi = report.accuracy_difference(a, a, ["x"])
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    assert report.verdict_from_interval(lo, hi) == "inconclusive"


def test_clear_difference_is_held():
    better = _result({"x": [1.0] * 60})
    worse = _result({"x": [0.0] * 30 + [1.0] * 30})
    _, lo, hi = report.accuracy_difference(better, worse, ["x"])
    assert report.verdict_from_interval(lo, hi) == "held"
    assert report.verdict_from_interval(-hi, -lo) == "not held"


def test_log_perplexity_ratio_uses_lambada_log_likelihoods():
    ll_a = [-2.0, -3.0, -1.0, -4.0]
    ll_b = [-1.0, -1.5, -0.5, -2.0]
    r, lo, hi = report.log_perplexity_ratio(_result({}, ll_a), _result({}, ll_b))
    ppl_a, ppl_b = math.exp(-np.mean(ll_a)), math.exp(-np.mean(ll_b))
    assert r == pytest.approx(math.log(ppl_a / ppl_b))
    assert lo <= r <= hi


def test_paper_tables_hold_the_printed_numbers():
    t2 = report.paper_table("table2")
    assert t2.attrs["ref"] == "Table 2"
    assert t2.set_index("method").loc["ReplaceMe cosine", "lambada_ppl"] == pytest.approx(15.88)
    t16 = report.paper_table("table16")
    llama = t16[t16.model == "Llama-3-8B-Instruct"]
    six = llama[["race", "winogrande", "piqa", "boolq", "openbookqa", "sciq"]].mean(axis=1)
    assert np.allclose(six.values, llama.avg_acc.values, atol=6e-4)  # Avg-acc is the 6-task mean
    with pytest.raises(KeyError, match="known"):
        report.paper_table("table99")


def test_write_table_writes_markdown_and_csv(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"variant": ["a", "b"], "value": [0.5, float("nan")]})
    paths = report.write_table(df, "t", tmp_path, caption="cap")
    md = paths["md"].read_text()
    assert md.startswith("**cap**") and "| a | 0.5 |" in md and "| b |  |" in md
    assert pd.read_csv(paths["csv"]).shape == (2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]


def test_group_tasks_pair_documents_by_subtask_and_id():
    """MMLU numbers documents within each subject: (subject, id) pairs, not the bare id, identify a document."""
    def group(values):
        return {"tasks": {"mmlu": {"metric": "acc", "value": float(np.mean(values)), "n": 4,
                                   "per_doc": {"doc_id": [0, 1, 0, 1], "subtask": ["s1", "s1", "s2", "s2"], "acc": values}}}}

    a, b = group([1.0, 1.0, 0.0, 0.0]), group([1.0, 1.0, 1.0, 1.0])
    d, lo, hi = report.accuracy_difference(a, b, ["mmlu"])
    assert d == pytest.approx(-0.5)  # paired on the bare id, only 2 of the 4 documents would be compared
    ids, _ = report.per_doc_scores(a, "mmlu")
    assert len(set(ids)) == 4


def _heldout(doc_nll, doc_tokens):
    return {"ppl": math.exp(sum(doc_nll) / sum(doc_tokens)), "doc_nll": doc_nll, "doc_tokens": doc_tokens}


def test_heldout_log_ratio_is_the_token_weighted_perplexity_ratio_paired_over_texts():
    tokens = [10, 40, 25, 5]
    a = _heldout([25.0, 90.0, 60.0, 14.0], tokens)
    b = _heldout([20.0, 80.0, 50.0, 10.0], tokens)
    r, lo, hi = report.heldout_log_ratio(a, b)
    assert r == pytest.approx(math.log(a["ppl"] / b["ppl"]))
    assert lo <= r <= hi and lo > 0  # a is worse on every text: the paired interval excludes 0
    with pytest.raises(ValueError, match="cannot be paired"):
        report.heldout_log_ratio(a, _heldout([1.0, 2.0, 3.0, 4.0], [10, 40, 25, 6]))


def test_perplexity_claim_is_decided_on_the_held_out_texts_and_shows_lambada():
    from replaceme_core.experiments.claims import ClaimSpec, Register

    reg = Register({"x.ppl": ClaimSpec("x.ppl", "nb", "a has lower perplexity", "Table", "ratio", "less", null=1.0)})
    tokens = [30, 30, 30, 30]
    heldout = {"a": _heldout([60.0, 61.0, 59.0, 62.0], tokens), "b": _heldout([90.0, 91.0, 89.0, 92.0], tokens)}
    results = {"a": _result({}, [-1.0, -9.0, -0.5, -8.0]), "b": _result({}, [-9.0, -1.0, -8.0, -0.5])}
    c = report.perplexity_claim(reg, "x.ppl", "a", "b", heldout, results)
    assert c.verdict == "held"  # LAMBADA alone (4 noisy words, mean difference 0) could not decide it
    assert "LAMBADA ratio 1 " in c.evidence or "LAMBADA ratio 1 [" in c.evidence


def test_perplexity_claim_on_lambada_decides_on_lambada_and_shows_the_held_out_ratio():
    from replaceme_core.experiments.claims import ClaimSpec, Register

    reg = Register({"x.ppl": ClaimSpec("x.ppl", "nb", "a has lower perplexity", "Table", "ratio", "less", null=1.0)})
    tokens = [30, 30, 30, 30]
    heldout = {"a": _heldout([60.0, 61.0, 59.0, 62.0], tokens), "b": _heldout([90.0, 91.0, 89.0, 92.0], tokens)}
    results = {"a": _result({}, [-1.0, -1.1, -0.9, -1.0]), "b": _result({}, [-1.0, -1.1, -0.9, -1.0])}
    c = report.perplexity_claim(reg, "x.ppl", "a", "b", heldout, results, on="lambada")
    assert c.verdict == "not held"  # identical LAMBADA log-likelihoods: ratio 1 exactly, whatever the held-out texts say
    held = math.exp((242.0 - 362.0) / 120)  # Σ NLL difference over Σ tokens
    assert c.evidence.startswith("LAMBADA ppl ratio a / b = 1;") and f"held-out ppl ratio a / b = {held:.3g}" in c.evidence
    with pytest.raises(ValueError, match="LAMBADA results"):
        report.perplexity_claim(reg, "x.ppl", "a", "b", heldout, None, on="lambada")
