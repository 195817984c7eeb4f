"""The separate (un-fused) LT of Table 10, and the Workbench's sibling calibrations and shared activation stores."""
from __future__ import annotations

import copy

import pytest
import torch

from replaceme_core.arch import get_adapter
from replaceme_core.capture import collect_block_outputs
from replaceme_core.evaluation.model_ref import hash_state_dict
from replaceme_core.experiments import workbench
from replaceme_core.io.models import tiny_random_model
from replaceme_core.merge import Replacement, save_checkpoint
from replaceme_core.merge import has_separate_transforms
from replaceme_core.prune import Calibration, PruneConfig, calibrate, prune
from replaceme_core.select import Run
from replaceme_core.separate import apply_separate, capture_separate, fit_separate
from replaceme_core.solve import IterativeConfig

from conftest import calib_batches


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_separate_ls_equals_lstsq_on_block_outputs():
    model, _ = tiny_random_model()
    batches = calib_batches(seed=3, n_batches=8)
    run = Run(3, 2)
    (rep,) = fit_separate(model, batches, [run], "ls", progress=False)
    outs = collect_block_outputs(model, batches, [run.kept, run.last], max_tokens=10**6)
    expected = torch.linalg.lstsq(outs[run.kept].double(), outs[run.last].double()).solution
    assert torch.allclose(rep.T, expected, atol=1e-6, rtol=1e-5)


def test_apply_separate_equals_hand_applied_T_after_deletion():
    model, _ = tiny_random_model()
    batch = calib_batches(seed=1, n_batches=1)[0]
    run = Run(2, 3)
    T = torch.eye(model.config.hidden_size, dtype=torch.float64) + 0.05 * torch.randn(model.config.hidden_size, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = apply_separate(copy.deepcopy(model), [Replacement(run, T)])

    by_hand = copy.deepcopy(model)
    adapter = get_adapter(by_hand)
    T32 = T.float()
    adapter.layers[run.kept].register_forward_hook(
        lambda _m, _i, out: (out[0] @ T32, *out[1:]) if isinstance(out, tuple) else out @ T32)
    adapter.delete_blocks(run.removed)

    assert len(get_adapter(ours).layers) == model.config.num_hidden_layers - 3
    assert torch.allclose(_logits(ours, batch), _logits(by_hand, batch), atol=1e-5)
    # T = I is plain deletion (UIDL)
    identity = apply_separate(copy.deepcopy(model), [Replacement(run, torch.eye(model.config.hidden_size, dtype=torch.float64))])
    uidl = copy.deepcopy(model)
    get_adapter(uidl).delete_blocks(run.removed)
    assert torch.allclose(_logits(identity, batch), _logits(uidl, batch), atol=1e-6)


def test_separate_model_is_hashed_apart_and_cannot_be_saved(tmp_path):
    model, tok = tiny_random_model()
    run = Run(2, 2)
    d = model.config.hidden_size
    sep = apply_separate(copy.deepcopy(model), [Replacement(run, 2 * torch.eye(d, dtype=torch.float64))])
    uidl = copy.deepcopy(model)
    get_adapter(uidl).delete_blocks(run.removed)
    assert has_separate_transforms(sep) and not has_separate_transforms(uidl)
    assert hash_state_dict(sep) != hash_state_dict(uidl)
    with pytest.raises(ValueError, match="stock checkpoint"):
        save_checkpoint(sep, tok, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_separate_cosine_fits_and_rejects_touching_runs():
    model, _ = tiny_random_model()
    batches = calib_batches(seed=2, n_batches=4)
    cfg = IterativeConfig(lr=1e-3, epochs=2, batch_tokens=16)
    (rep,) = fit_separate(model, batches, [Run(2, 2)], "cosine", iterative=cfg, progress=False)
    assert rep.T.shape == (model.config.hidden_size,) * 2 and not torch.equal(rep.T, torch.eye(model.config.hidden_size, dtype=torch.float64))
    with pytest.raises(ValueError, match="touch"):
        fit_separate(model, batches, [Run(1, 2), Run(3, 2)], "ls", progress=False)
    sums, stores, tokens = capture_separate(model, batches, [Run(2, 2)], ls=True, progress=False)
    assert stores == {} and sums[Run(2, 2)].tokens == tokens == sum(int(b["attention_mask"].sum()) for b in batches)


def test_prune_uses_borrowed_stores_and_leaves_them_open():
    model, _ = tiny_random_model()
    batches = calib_batches(seed=4, n_batches=3)
    cfg = PruneConfig(num_blocks=2, method="cosine", start=3, lr=1e-3, epochs=1, batch_tokens=16)
    pre = calibrate(model, batches, store_runs=[Run(3, 2)], store_columns=("M", "R", "Y"), progress=False)
    try:
        reused = prune(copy.deepcopy(model), batches, cfg, calibration=Calibration(stores=pre.stores), progress=False)
        fresh = prune(copy.deepcopy(model), batches, cfg, progress=False)
        assert "capture_pass_s" not in reused.record["timings"]
        assert torch.allclose(reused.replacements[0].T, fresh.replacements[0].T, atol=1e-6)
        assert pre.stores[Run(3, 2)].path.exists()  # still the caller's to close
    finally:
        pre.close()


TEXT = "\n\n".join(f"Note {i}: the ferry leaves at {i % 12 + 1} o'clock and returns before the tide turns." for i in range(60))


@pytest.fixture
def bench(tmp_path, monkeypatch):
    model, tok = tiny_random_model()
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))  # fresh statistics cache
    texts = tmp_path / "calib.txt"
    texts.write_text(TEXT)
    monkeypatch.setattr("replaceme_core.io.models.load_model", lambda *a, **k: (model, tok))
    profile = {"name": "test", "model": "tiny-random-llama", "num_blocks": 2,
               "calibration": {"source": str(texts), "samples": 24, "max_length": 40, "batch_size": 8, "seed": 0, "chat": "never"},
               "cosine": {"epochs": 1, "lr": 1e-3, "batch_tokens": 32}}
    return workbench.Workbench(profile, progress=False)


def test_with_texts_is_a_separately_cached_sibling(bench):
    twin = bench.with_texts(["a short text about boats and rivers " * 4] * 12, "repeated")
    assert twin.model is bench.model and twin.key != bench.key and twin.stats_dir != bench.stats_dir
    assert twin.calibration_info["source"] == "repeated" and twin.calibration_info["samples"] == 12
    assert bench.with_texts(twin.texts, "again").key == twin.key  # content-addressed


def test_iterative_variants_share_one_capture(bench, monkeypatch):
    calls = []
    real = workbench.calibrate
    monkeypatch.setattr(workbench, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    a = bench.prune("cosine", seed=0)
    b = bench.prune("cosine", seed=1)
    c = bench.prune("cosine-exact")
    stores = [k for k in calls if k.get("store_runs")]
    assert len(stores) == 1
    assert a.record["removed_blocks"] == b.record["removed_blocks"] == c.record["removed_blocks"]
    sep = bench.prune_separate("ls")
    assert has_separate_transforms(sep.model) and sep.record["removed_blocks"] == a.record["removed_blocks"]


def test_store_pass_also_caches_the_ls_sums(bench, monkeypatch):
    """An LS variant made after an iterative one on the same data needs no pass, and its T is the lstsq solution."""
    run = bench.chosen_runs(bench.config("ls"))[0]
    calls = []
    real = workbench.calibrate
    monkeypatch.setattr(workbench, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    bench.prune("cosine", start=run.start)
    assert [k.get("ls_runs") for k in calls] == [[run]]  # one pass: the store, with the LS sums of the same run
    ls = bench.prune("ls", start=run.start)
    assert len(calls) == 1  # served from the statistics cache the store pass wrote

    # independent: stack the real-token activations and solve with torch.linalg.lstsq
    Ms, Rs = [], []

    def consume(acts):
        M = acts.real(acts.mlp_out[run.kept]).double()
        Y = acts.real(acts.block_out[run.kept]).double() - M
        Ms.append(M)
        Rs.append(acts.real(acts.block_out[run.last]).double() - Y)

    from replaceme_core.capture import run_capture

    run_capture(bench.model, get_adapter(bench.model), bench.batches, consume, block_outputs=[run.kept, run.last],
                mlp_outputs=[run.kept], progress=False)
    T = torch.linalg.lstsq(torch.cat(Ms), torch.cat(Rs)).solution
    assert torch.allclose(ls.replacements[0].T.double(), T, atol=1e-6, rtol=1e-5)


def test_activation_store_is_kept_for_the_next_workbench(bench, monkeypatch):
    """One capture per (model, data, run): a second Workbench on the same cache reads the kept rows, which are exactly
    the rows a fresh capture produces."""
    run = bench.chosen_runs(bench.config("ls"))[0]
    first = bench.prune("cosine", seed=3)
    again = workbench.Workbench(bench.profile, progress=False)
    calls = []
    real = workbench.calibrate
    monkeypatch.setattr(workbench, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    kept = again.activation_stores([run])[run]
    second = again.prune("cosine", seed=4)  # a new fit on the kept rows
    assert calls == [] and second.record["removed_blocks"] == first.record["removed_blocks"]
    fresh = real(again.model, again.batches, store_runs=[run], store_columns=("M", "R", "Y"), progress=False)
    try:
        a, b = kept.all_rows(), fresh.stores[run].all_rows()
        assert all(torch.equal(a[c], b[c]) for c in ("M", "R", "Y"))
    finally:
        fresh.close()


def test_fit_cache_is_keyed_by_the_runs_not_how_they_were_chosen(bench, monkeypatch):
    """The selection rule and an explicit start that name the same run share one fitted transform."""
    run = bench.chosen_runs(bench.config("ls"))[0]
    chosen = bench.prune("cosine", seed=2)
    fits = []
    real = workbench.prune
    monkeypatch.setattr(workbench, "prune", lambda *a, **k: fits.append(1) or real(*a, **k))
    explicit = bench.prune("cosine", seed=2, start=run.start)
    assert fits == [] and torch.equal(explicit.replacements[0].T, chosen.replacements[0].T)
    bench.prune("cosine", seed=2, start=run.start + 1)  # another run: a new fit
    assert fits == [1]


def test_ls_residual_selection_on_the_workbench_matches_prune_and_is_cached(bench, monkeypatch):
    """The workbench picks the run prune() picks with ls-residual, from ONE pass whose held-out sums are cached."""
    direct = prune(copy.deepcopy(bench.model), bench.batches, bench.config("ls", selection="ls-residual"), progress=False)
    calls = []
    real = workbench.calibrate
    monkeypatch.setattr(workbench, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    v = bench.prune("ls", selection="ls-residual")
    assert v.record["removed_blocks"] == direct.record["removed_blocks"]
    assert torch.allclose(v.replacements[0].T, direct.replacements[0].T, rtol=1e-9, atol=1e-9)
    assert len(calls) == 1 and calls[0]["heldout_runs"]  # one pass, held-out sums included
    cfg = bench.config("ls", selection="ls-residual")
    assert bench.chosen_runs(cfg) == direct.runs and len(calls) == 1  # now from the cache: no second pass


def test_ls_initialised_cosine_starts_from_the_cached_ls_fit_without_another_pass(bench, monkeypatch):
    ls = bench.prune("ls")
    calls = []
    real = workbench.calibrate
    monkeypatch.setattr(workbench, "calibrate", lambda *a, **k: calls.append(k) or real(*a, **k))
    v = bench.prune("cosine", init="ls", lr=1e-9, epochs=1)  # a vanishing step: T stays at the LS start
    assert len(calls) <= 1 and all(k.get("store_runs") for k in calls)  # at most the store capture, no LS pass of its own
    assert v.record["removed_blocks"] == ls.record["removed_blocks"]
    assert torch.allclose(v.replacements[0].T, ls.replacements[0].T, rtol=1e-4, atol=1e-5)
    assert v.record["runs"][0]["ls_init_relative_residual"] == pytest.approx(ls.record["runs"][0]["relative_residual"])
