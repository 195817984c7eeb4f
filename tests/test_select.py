"""Block selection: property tests for choose_runs / merge_touching, explicit starts, Block Influence."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_model, calib_batches
from replaceme_core.prune import PruneConfig, prune
from replaceme_core.select import (
    Run, block_influence, choose_by_block_influence, choose_runs, merge_touching, run_scores, validate_run,
)

FAST = settings(max_examples=150, deadline=None)


def covered(runs):
    return {b for r in runs for b in r.removed}


@st.composite
def scores_problem(draw):
    L = draw(st.integers(3, 24))
    n = draw(st.integers(1, max(1, (L - 1) // 2)))
    starts = range(1, L - n + 1)
    values = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=len(starts), max_size=len(starts)))
    num = draw(st.integers(1, 3))
    separated = draw(st.booleans())
    return L, n, dict(zip(starts, values)), num, separated


@FAST
@given(scores_problem())
def test_choose_runs_properties(problem):
    L, n, scores, num, separated = problem
    try:
        runs = choose_runs(scores, n, num, separated=separated)
    except ValueError as e:
        assert "fit" in str(e)
        # greedy failed: then it really could not place `num` runs the greedy way; at least check num > 1
        assert num > 1
        return
    # runs are valid, pairwise disjoint and do not touch (touching ones were merged)
    for r in runs:
        validate_run(r, L)
    for a in runs:
        for b in runs:
            if a is not b:
                assert not a.overlaps(b) and not a.touches(b)
    assert sum(r.n for r in runs) == n * num  # exactly the asked-for number of blocks
    if separated:
        assert len(runs) == num and all(r.n == n for r in runs)
    assert runs == sorted(runs)
    if num == 1:
        best = min(scores, key=lambda s: (scores[s], s))
        assert runs == [Run(best, n)]


@FAST
@given(scores_problem())
def test_choose_runs_picks_greedy_lowest_scores(problem):
    L, n, scores, num, separated = problem
    try:
        runs = choose_runs(scores, n, num, separated=separated)
    except ValueError:
        return
    # the lowest-scored start is always part of the removed set
    best = min(scores, key=lambda s: (scores[s], s))
    assert set(range(best, best + n)) <= covered(runs)


@FAST
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 5)), min_size=0, max_size=8))
def test_merge_touching_covers_exactly_the_union(pairs):
    runs = [Run(s, n) for s, n in pairs]
    merged = merge_touching(runs)
    assert covered(merged) == covered(runs)
    assert merged == sorted(merged)
    for a, b in zip(merged, merged[1:]):
        assert a.last + 1 < b.start  # neither overlapping nor adjacent
    assert merge_touching(merged) == merged


def test_run_geometry():
    r = Run(3, 2)
    assert (r.kept, r.last, r.removed) == (2, 4, [3, 4])
    assert r.touches(Run(5, 1)) and not r.overlaps(Run(5, 1))
    assert r.overlaps(Run(4, 3)) and not r.touches(Run(6, 1))
    assert merge_touching([Run(5, 1), Run(3, 2)]) == [Run(3, 3)]


def test_run_scores_use_kept_and_last_removed():
    D = torch.arange(36, dtype=torch.float64).reshape(6, 6)
    scores = run_scores(D, 2)
    assert scores == {s: float(D[s - 1, s + 1]) for s in range(1, 5)}


@pytest.mark.parametrize("run, match", [
    (Run(1, 0), "positive"), (Run(1, -1), "positive"), (Run(1, 5), "at most"), (Run(0, 1), "out of range"),
    (Run(5, 1), "out of range"), (Run(4, 2), "out of range"),
])
def test_validate_run_rejects(run, match):
    with pytest.raises(ValueError, match=match):
        validate_run(run, 5)


def test_choose_runs_errors():
    with pytest.raises(ValueError, match="positive"):
        choose_runs({1: 0.0}, 1, 0)
    with pytest.raises(ValueError, match="fit"):
        choose_runs({1: 0.1, 2: 0.2}, 2, 2)  # the two candidates overlap
    assert choose_runs({1: 0.1, 2: 0.2, 3: 0.3}, 2, 2) == [Run(1, 4)]  # touching runs merge
    with pytest.raises(ValueError, match="separated"):
        choose_runs({1: 0.1, 2: 0.2, 3: 0.3}, 2, 2, separated=True)


def test_block_influence_picks_lowest_bi_blocks():
    L = 7
    cos = torch.eye(L, dtype=torch.float64)
    sims = {1: 0.5, 2: 0.9, 3: 0.95, 4: 0.2, 5: 0.99, 6: 0.1}
    for i, c in sims.items():
        cos[i - 1, i] = cos[i, i - 1] = c
    bi = block_influence(cos)
    assert bi == pytest.approx({i: 1 - c for i, c in sims.items()})
    assert choose_by_block_influence(cos, 1) == [Run(5, 1)]
    assert choose_by_block_influence(cos, 3) == [Run(2, 2), Run(5, 1)]  # blocks 5, 3, 2 → runs {2,3}, {5}


def test_prune_with_block_influence_removes_lowest_bi_blocks():
    model = build_model("llama", seed=3)
    batches = calib_batches(seed=1)
    res = prune(model, batches, PruneConfig(num_blocks=2, selection="bi", distance_tokens="all"), progress=False)
    cos = res.distances.matrix("cosine", "all")
    bi = block_influence(cos)
    lowest = sorted(sorted(bi, key=lambda i: (bi[i], i))[:2])
    assert res.record["removed_blocks"] == lowest


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_prune_angular_selection_takes_argmin_distance(tokens):
    model = build_model("qwen3", seed=2)
    batches = calib_batches(seed=2)
    n = 2
    res = prune(model, batches, PruneConfig(num_blocks=n, distance_tokens=tokens), progress=False)
    D = res.distances.matrix("angular", tokens)
    scores = {s: float(D[s - 1, s + n - 1]) for s in range(1, D.shape[0] - n + 1)}
    best = min(scores, key=scores.get)
    assert res.runs == [Run(best, n)]
    assert res.record["removed_blocks"] == [best, best + 1]
    assert res.record["blocks_receiving_T"] == [best - 1]
    assert res.record["runs"][0]["distance"] == pytest.approx(scores[best])


def test_explicit_start_is_used():
    model = build_model("llama")
    res = prune(model, calib_batches(), PruneConfig(num_blocks=2, start=3), progress=False)
    assert res.runs == [Run(3, 2)]
    assert res.record["removed_blocks"] == [3, 4] and res.record["blocks_receiving_T"] == [2]
    assert res.distances is None


def test_explicit_touching_starts_merge_unless_separated():
    model = build_model("llama")
    res = prune(model, calib_batches(), PruneConfig(num_blocks=2, start=[1, 2], num_transforms=2), progress=False)
    assert res.runs == [Run(1, 2)]
    with pytest.raises(ValueError, match="touch"):
        prune(build_model("llama"), calib_batches(), PruneConfig(num_blocks=2, start=[1, 2], num_transforms=2,
                                                                 separated=True), progress=False)
    with pytest.raises(ValueError, match="one start block per transform"):
        prune(build_model("llama"), calib_batches(), PruneConfig(num_blocks=2, start=[1], num_transforms=2),
              progress=False)


# --------------------------------------------------------------------------------------------
# ls-residual: the run whose least-squares fit is best on held-out calibration tokens
# --------------------------------------------------------------------------------------------
def _rows(model, batches, kept, last):
    """M_kept and R = L_last − Y_kept on real tokens (Y = L − M), from conftest's own hooks, pad rows dropped."""
    from conftest import record

    Ms, Rs = [], []
    for b in batches:
        L, M = record(model, "llama", b, blocks=sorted({kept, last}))
        mask = b["attention_mask"].bool()
        Ms.append(M[kept][mask])
        Rs.append(L[last][mask] - (L[kept][mask] - M[kept][mask]))
    return torch.cat(Ms), torch.cat(Rs)


def _heldout_residual_by_hand(model, batches, run):
    """Fit T by lstsq on batches 0, 2, … and score it on batches 1, 3, … (HOLDOUT_EVERY = 2)."""
    from replaceme_core.prune import HOLDOUT_EVERY

    assert HOLDOUT_EVERY == 2
    M_fit, R_fit = _rows(model, batches[0::2], run.kept, run.last)
    M_held, R_held = _rows(model, batches[1::2], run.kept, run.last)
    T = torch.linalg.lstsq(M_fit, R_fit).solution
    return float(((M_held @ T - R_held) ** 2).sum() / (R_held ** 2).sum())


def test_ls_residual_scores_equal_a_hand_fit_scored_on_held_out_batches():
    from replaceme_core.prune import calibrate
    from replaceme_core.select import ls_residual_scores

    model, batches = build_model("llama"), calib_batches(seed=3, n_batches=4)
    runs = [Run(s, 2) for s in range(1, 4)]  # every candidate of the 5-block model
    cal = calibrate(model, batches, ls_runs=runs, heldout_runs=runs, progress=False)
    plain = calibrate(model, batches, ls_runs=runs, progress=False)
    for run in runs:  # `ls` still covers every token
        assert cal.ls[run].tokens == plain.ls[run].tokens
        assert torch.allclose(cal.ls[run].MtM, plain.ls[run].MtM, rtol=1e-10, atol=1e-10)
        assert torch.allclose(cal.ls[run].MtR, plain.ls[run].MtR, rtol=1e-10, atol=1e-10)
    assert cal.ls_heldout[runs[0]].tokens == sum(int(b["attention_mask"].sum()) for b in batches[1::2])
    scores = ls_residual_scores(cal.ls, cal.ls_heldout)
    for run in runs:
        assert scores[run.start] == pytest.approx(_heldout_residual_by_hand(model, batches, run), rel=1e-6)
    assert len(set(round(v, 6) for v in scores.values())) == len(runs)  # the rule can tell the runs apart here


def test_prune_with_ls_residual_picks_the_best_held_out_fit_and_fits_on_every_token():
    model, batches = build_model("llama"), calib_batches(seed=3, n_batches=4)
    by_hand = {s: _heldout_residual_by_hand(model, batches, Run(s, 2)) for s in range(1, 4)}
    res = prune(build_model("llama"), batches, PruneConfig(num_blocks=2, selection="ls-residual"), progress=False)
    best = min(by_hand, key=by_hand.get)
    assert res.runs == [Run(best, 2)]
    assert res.record["runs"][0]["heldout_relative_residual"] == pytest.approx(by_hand[best], rel=1e-6)
    explicit = prune(build_model("llama"), batches, PruneConfig(num_blocks=2, start=best), progress=False)
    # the final T is fitted on every token (the sums are added in another order: equal to rounding)
    assert torch.allclose(res.replacements[0].T, explicit.replacements[0].T, rtol=1e-9, atol=1e-9)


def test_ls_residual_needs_a_fitted_map_and_one_process():
    with pytest.raises(ValueError, match="UIDL fits none"):
        prune(build_model("llama"), calib_batches(), PruneConfig(num_blocks=2, method="uidl", selection="ls-residual"),
              progress=False)
    from replaceme_core.distributed import prune_distributed

    with pytest.raises(ValueError, match="select in one process"):
        prune_distributed(build_model("llama"), calib_batches(), PruneConfig(num_blocks=2, selection="ls-residual"))


# ---- stability of the pick under resampling of the calibration sequences (notebook 03) ----------------------------

@pytest.mark.parametrize("padding", ["right", "left"])
def test_run_score_samples_average_to_the_last_token_distance_matrix(padding):
    """Per-sequence terms (own last-token collection + own angle) average to DistanceStats' last-token run scores."""
    from replaceme_core.capture import collect_block_outputs
    from replaceme_core.prune import calibrate
    from replaceme_core.select import run_score_samples

    model, batches = build_model("llama", seed=4), calib_batches(seed=4, padding=padding)
    L, n = len(model.model.layers), 2
    last = collect_block_outputs(model, batches, range(L), tokens="last")
    assert all(x.shape[0] == sum(b["input_ids"].shape[0] for b in batches) for x in last.values())
    samples = run_score_samples(last, n)
    expected = run_scores(calibrate(model, batches, distances=True, progress=False).distances.matrix("angular", "last"), n)
    assert sorted(samples) == sorted(expected)
    for s, v in samples.items():
        assert float(v.mean()) == pytest.approx(expected[s], rel=1e-6, abs=1e-9)


def test_last_token_collection_reads_each_sequence_at_its_last_real_token():
    """Against the model's own hidden states (block i's output = hidden_states[i + 1] below the final norm)."""
    from replaceme_core.capture import collect_block_outputs

    model, batches = build_model("llama", seed=5), calib_batches(seed=5, n_batches=1, padding="left")
    last = collect_block_outputs(model, batches, [0, 1], tokens="last")
    with torch.no_grad():
        hidden = model(**batches[0], output_hidden_states=True).hidden_states
    # left padding: every sequence's last real token is at the last position
    for i in (0, 1):
        assert torch.allclose(last[i], hidden[i + 1][:, -1].float(), atol=1e-6)
    with pytest.raises(ValueError, match="'all' or 'last'"):
        collect_block_outputs(model, batches, [0], tokens="first")


def test_bootstrap_support_matches_the_resampling_distribution():
    """Start 1 scores 0 or 1 on two sequences, start 2 a constant 0.6: a resample of 2 sequences has mean 0, 0.5 or 1
    with probabilities 1/4, 1/2, 1/4, so start 1 wins with probability 3/4."""
    from replaceme_core.select import bootstrap_picks

    samples = {1: torch.tensor([0.0, 1.0]), 2: torch.tensor([0.6, 0.6])}
    boot = bootstrap_picks(samples, reps=20000, seed=1)
    support = boot.support()
    assert support[1] == pytest.approx(0.75, abs=0.015) and support[1] + support[2] == pytest.approx(1.0)
    assert boot.interval()[2] == pytest.approx((0.6, 0.6))
    assert boot.interval()[1] == pytest.approx((0.0, 1.0))
    again = bootstrap_picks(samples, reps=20000, seed=1)
    assert torch.equal(again.means, boot.means)  # the seed is the only randomness


def test_bootstrap_support_is_one_for_a_run_lowest_on_every_sequence_and_ties_go_to_the_lowest_start():
    from replaceme_core.select import bootstrap_picks

    g = torch.Generator().manual_seed(0)
    base = torch.rand(30, generator=g)
    boot = bootstrap_picks({1: base + 1, 2: base, 3: base + 0.5}, reps=500, seed=0)
    assert boot.support() == {1: 0.0, 2: 1.0, 3: 0.0}
    assert bootstrap_picks({4: base, 7: base.clone()}, reps=50).support() == {4: 1.0, 7: 0.0}
    with pytest.raises(ValueError, match="positive"):
        bootstrap_picks({1: base}, reps=0)
