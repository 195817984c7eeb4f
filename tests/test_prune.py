"""prune(): the whole method, its baselines and its errors. Bad input → clear error, model untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertLMHeadModel

from conftest import build_model, calib_batches, logits, make_batch, reference_logits, rel_err
from replaceme_core.arch import SUPPORTED_MODEL_TYPES, FoldError, UnsupportedModelError
from replaceme_core.capture import CalibrationError
from replaceme_core.prune import PruneConfig, calibrate, prune
from replaceme_core.select import Run


def unchanged(model, snapshot):
    sd = model.state_dict()
    return set(sd) == set(snapshot) and all(
        torch.allclose(sd[k], snapshot[k], rtol=0, atol=0, equal_nan=True) for k in sd)


def assert_raises_untouched(model, batches, cfg, exc, match):
    snapshot = copy.deepcopy(model.state_dict())
    layers = model.config.num_hidden_layers
    with pytest.raises(exc, match=match) as info:
        prune(model, batches, cfg, progress=False)
    assert model.config.num_hidden_layers == layers
    assert unchanged(model, snapshot)
    return info


@pytest.mark.parametrize("cfg, match", [
    (PruneConfig(num_blocks=0), "positive"),
    (PruneConfig(num_blocks=-2), "positive"),
    (PruneConfig(num_blocks=5), "at most 4"),
    (PruneConfig(num_blocks=9, start=1), "at most 4"),
    (PruneConfig(num_blocks=1, start=0), "out of range"),
    (PruneConfig(num_blocks=1, start=5), "out of range"),
    (PruneConfig(num_blocks=2, start=4), "out of range"),
    (PruneConfig(num_blocks=1, start=-1), "out of range"),
    (PruneConfig(num_blocks=1, method="magic"), "unknown method 'magic'"),
    (PruneConfig(num_blocks=1, structure="banded"), "unknown structure"),
    (PruneConfig(num_blocks=1, selection="random"), "unknown selection"),
    (PruneConfig(num_blocks=3, num_transforms=2), "multiple"),
    (PruneConfig(num_blocks=1, method="cosine", structure="orthonormal"), "orthonormal"),
    (PruneConfig(num_blocks=1, method="mse", optimizer="sgd"), "optimizer"),
    (PruneConfig(num_blocks=1, ridge=-1.0, start=2), "ridge"),
    (PruneConfig(num_blocks=2, num_transforms=2, start=[2, 2]), "overlap"),
    (PruneConfig(num_blocks=4, num_transforms=2, start=[1, 2]), "overlap"),
])
def test_bad_config_is_rejected(cfg, match):
    model = build_model("llama")
    assert_raises_untouched(model, calib_batches(), cfg, ValueError, match)


def test_empty_calibration_is_rejected():
    model = build_model("llama")
    assert_raises_untouched(model, [], PruneConfig(num_blocks=1, start=2), CalibrationError, "no tokens")
    empty = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}
    assert_raises_untouched(model, [empty], PruneConfig(num_blocks=1), CalibrationError, "no tokens")


def test_too_few_tokens_for_least_squares_without_ridge():
    model = build_model("llama")
    few = [make_batch([5, 3], seed=1)]  # 8 real tokens < hidden size 32
    info = assert_raises_untouched(model, few, PruneConfig(num_blocks=1, start=2), CalibrationError, "ridge")
    assert "8 real tokens" in str(info.value) and "32" in str(info.value)
    res = prune(model, few, PruneConfig(num_blocks=1, start=2, ridge=1e-3), progress=False)
    assert torch.isfinite(res.replacements[0].T).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_non_finite_activations_are_rejected(bad, family):
    model = build_model(family)
    with torch.no_grad():
        weight = model.transformer.h[1].mlp.c_fc.weight if family == "gpt2" else model.model.layers[1].mlp.up_proj.weight
        weight[0, 0] = bad
    assert_raises_untouched(model, calib_batches(), PruneConfig(num_blocks=1, start=3), CalibrationError, "non-finite")
    assert_raises_untouched(model, calib_batches(), PruneConfig(num_blocks=1), CalibrationError, "non-finite")


def test_unsupported_architectures_are_rejected():
    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError) as exc:
        prune(bert, calib_batches(), PruneConfig(num_blocks=1), progress=False)
    assert "bert" in str(exc.value) and "llama" in str(exc.value)

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "foo"})()
            self.emb = nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(UnsupportedModelError) as exc:
        prune(Fake(), calib_batches(), PruneConfig(num_blocks=1), progress=False)
    assert "'foo'" in str(exc.value) and all(t in str(exc.value) for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("cfg", [
    PruneConfig(num_blocks=2),
    PruneConfig(num_blocks=2, start=2, method="cosine"),
    PruneConfig(num_blocks=2, start=2, structure="orthonormal"),
])
def test_gemma3_general_T_is_refused_before_any_work(cfg):
    model = build_model("gemma3_text")
    info = assert_raises_untouched(model, calib_batches(), cfg, FoldError, "diagonal")
    assert "UIDL" in str(info.value)


def test_uidl_removes_closest_blocks_without_transform():
    original = build_model("llama", seed=4)
    model = copy.deepcopy(original)
    res = prune(model, calib_batches(seed=2), PruneConfig(num_blocks=2, method="uidl"), progress=False)
    (run,) = res.runs
    D = res.distances.matrix("angular", "last")
    scores = {s: float(D[s - 1, s + 1]) for s in range(1, 4)}
    assert run.start == min(scores, key=scores.get)
    assert res.replacements[0].T is None and res.record["blocks_receiving_T"] == []
    batch = make_batch([6, 4], seed=5)
    expected = reference_logits(original, "llama", batch, [(run.kept, run.removed, torch.eye(32, dtype=torch.float64))])
    mask = batch["attention_mask"].bool()
    assert rel_err(logits(model, batch)[mask], expected[mask]) <= 1e-10


@pytest.mark.parametrize("method", ["mse", "cosine", "cosine-exact"])
def test_iterative_methods_through_prune(method):
    original = build_model("llama", seed=1)
    model = copy.deepcopy(original)
    res = prune(model, calib_batches(seed=4), PruneConfig(num_blocks=1, start=2, method=method, lr=1e-2, epochs=5,
                                                          batch_tokens=32), progress=False)
    info = res.record["runs"][0]
    assert len(info["loss_per_epoch"]) == 5 and info["loss_per_epoch"][-1] < info["loss_per_epoch"][0]
    T = res.replacements[0].T
    assert T.dtype == torch.float64 and not torch.allclose(T, torch.eye(32, dtype=torch.float64))
    batch = make_batch([5, 7], seed=3)
    expected = reference_logits(original, "llama", batch, [(1, [2], T)])
    mask = batch["attention_mask"].bool()
    assert rel_err(logits(model, batch)[mask], expected[mask]) <= 1e-5


def test_ls_beats_identity_and_plain_deletion():
    original = build_model("qwen3", seed=2)
    batches = calib_batches(seed=7)
    res = prune(copy.deepcopy(original), batches, PruneConfig(num_blocks=2, start=2), progress=False)
    info = res.record["runs"][0]
    assert info["relative_residual"] < info["identity_relative_residual"]
    assert info["removed_blocks"] == [2, 3] and info["kept_block"] == 1


def test_one_pass_selection_reuses_ls_sums_and_matches_two_pass():
    """With no start, the selection pass also accumulates the LS sums; the result equals an explicit start."""
    family = "gpt2"
    batches = calib_batches(seed=9)
    one = prune(build_model(family), batches, PruneConfig(num_blocks=2), progress=False)
    assert "capture_pass_s" not in one.record["timings"]
    explicit = prune(build_model(family), batches, PruneConfig(num_blocks=2, start=one.runs[0].start), progress=False)
    assert rel_err(one.replacements[0].T, explicit.replacements[0].T) <= 1e-12
    two = prune(build_model(family), batches, PruneConfig(num_blocks=2, one_pass_budget_gb=0.0), progress=False)
    assert "capture_pass_s" in two.record["timings"]
    assert rel_err(two.replacements[0].T, one.replacements[0].T) <= 1e-12


def test_calibrate_rejects_bad_runs_and_empty_requests():
    model = build_model("llama")
    with pytest.raises(ValueError, match="nothing"):
        calibrate(model, calib_batches(), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        calibrate(model, calib_batches(), ls_runs=[Run(0, 1)], progress=False)
