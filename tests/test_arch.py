"""Folding T and deleting blocks, checked against an independent hook-based computation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertLMHeadModel

from conftest import (
    ALL_FAMILIES, GENERAL_FOLD_FAMILIES, FAMILIES, blocks_of, build_model, logits, make_batch, reference_logits, rel_err,
)
from replaceme_core.arch import SUPPORTED_MODEL_TYPES, FoldError, UnsupportedModelError, fold_into_linear, get_adapter
from replaceme_core.merge import Replacement, apply_replacements
from replaceme_core.select import Run


def random_T(d, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d, dtype=torch.float64) + scale * torch.randn(d, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", GENERAL_FOLD_FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_fold_and_delete_matches_hooked_original(family, padding):
    model = build_model(family)
    batch = make_batch([7, 4, 6], padding=padding, seed=3)
    k, n = 1, 2
    T = random_T(model.config.hidden_size)
    expected = reference_logits(model, family, batch, [(k, range(k + 1, k + 1 + n), T)])
    pruned = copy.deepcopy(model)
    apply_replacements(get_adapter(pruned), [Replacement(Run(k + 1, n), T)])
    assert len(blocks_of(pruned, family)) == len(blocks_of(model, family)) - n
    got = logits(pruned, batch)
    # not trivially equal: the change is visible in the logits
    assert rel_err(logits(model, batch), expected) > 1e-3
    mask = batch["attention_mask"].bool()
    assert rel_err(got[mask], expected[mask]) <= 1e-5


@pytest.mark.parametrize("family", GENERAL_FOLD_FAMILIES)
def test_fold_into_last_block_run_ends_at_final_block(family):
    model = build_model(family)
    batch = make_batch([6, 5], seed=4)
    L = len(blocks_of(model, family))
    n = 2
    k = L - n - 1
    T = random_T(model.config.hidden_size, seed=2)
    expected = reference_logits(model, family, batch, [(k, range(k + 1, L), T)])
    pruned = copy.deepcopy(model)
    apply_replacements(get_adapter(pruned), [Replacement(Run(k + 1, n), T)])
    assert rel_err(logits(pruned, batch), expected) <= 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_without_deletion_changes_nothing(family):
    model = build_model(family)
    batch = make_batch([6, 3], seed=1)
    before = logits(model, batch)
    adapter = get_adapter(model)
    d = model.config.hidden_size
    for i in range(adapter.num_layers):
        if adapter.can_fold_general:
            adapter.fold(i, torch.eye(d, dtype=torch.float64))
        else:
            adapter.fold_diagonal(i, torch.ones(d, dtype=torch.float64))
    assert rel_err(logits(model, batch), before) <= 1e-12


def test_gemma3_diagonal_folds_exactly():
    family = "gemma3_text"
    model = build_model(family)
    batch = make_batch([7, 4, 6], seed=5)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    t = 1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    k, n = 2, 2
    expected = reference_logits(model, family, batch, [(k, range(k + 1, k + 1 + n), torch.diag(t))])
    pruned = copy.deepcopy(model)
    apply_replacements(get_adapter(pruned), [Replacement(Run(k + 1, n), torch.diag(t))])
    assert rel_err(logits(model, batch), expected) > 1e-3
    assert rel_err(logits(pruned, batch), expected) <= 1e-5


def test_gemma3_general_T_raises_fold_error():
    model = build_model("gemma3_text")
    adapter = get_adapter(model)
    assert not adapter.can_fold_general
    before = copy.deepcopy(model.state_dict())
    T = random_T(model.config.hidden_size)
    with pytest.raises(FoldError) as exc:
        apply_replacements(adapter, [Replacement(Run(2, 1), T)])
    msg = str(exc.value).lower()
    assert "diagonal" in msg and "uidl" in msg
    with pytest.raises(FoldError, match="(?i)diagonal"):
        adapter.fold(1, T)
    # nothing changed: no block deleted, no weight touched
    assert adapter.num_layers == 6
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "falcon_parallel"])
def test_delete_only_equals_skipping_blocks(family):
    """UIDL: plain deletion equals the original with the run skipped (T = I through the hooks)."""
    model = build_model(family)
    batch = make_batch([5, 8], seed=2)
    d = model.config.hidden_size
    expected = reference_logits(model, family, batch, [(0, [1, 2], torch.eye(d, dtype=torch.float64))])
    pruned = copy.deepcopy(model)
    apply_replacements(get_adapter(pruned), [Replacement(Run(1, 2), None)])
    assert rel_err(logits(pruned, batch), expected) <= 1e-10


def test_fold_into_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    T = random_T(6, seed=1)
    x = torch.randn(10, 4, dtype=torch.float64)
    lin = nn.Linear(4, 6).double()
    expected = lin(x) @ T
    fold_into_linear(lin, T)
    assert torch.allclose(lin(x), expected, rtol=1e-12, atol=1e-12)
    conv = Conv1D(6, 4).double()
    torch.nn.init.normal_(conv.bias)
    expected = conv(x) @ T
    fold_into_linear(conv, T)
    assert torch.allclose(conv(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(FoldError, match="shape"):
        fold_into_linear(nn.Linear(4, 6), torch.eye(5))
    with pytest.raises(FoldError):
        fold_into_linear(nn.LayerNorm(6), torch.eye(6))


def test_unsupported_architectures_list_supported_types():
    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=True))
    with pytest.raises(UnsupportedModelError) as exc:
        get_adapter(bert)
    for t in ("llama", "gpt2", "gemma3_text"):
        assert t in str(exc.value)

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "foo"})()

    with pytest.raises(UnsupportedModelError, match="foo") as exc:
        get_adapter(Fake())
    assert all(t in str(exc.value) for t in SUPPORTED_MODEL_TYPES)


def test_known_family_with_wrong_head_is_rejected():
    from transformers import LlamaModel

    base = LlamaModel(FAMILIES["llama"][0]())
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        get_adapter(base)


def test_unprunable_variants_are_rejected():
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                                     num_attention_heads=2, word_embed_proj_dim=16,
                                                     do_layer_norm_before=False))
    with pytest.raises(UnsupportedModelError, match="post-LN"):
        get_adapter(opt)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                                       scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        get_adapter(gpt2)


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "llama"])
def test_delete_blocks_shrinks_config_and_renumbers(family):
    model = build_model(family)
    adapter = get_adapter(model)
    L = adapter.num_layers
    types_before = list(getattr(model.config, "layer_types", None) or [])
    layers_before = list(blocks_of(model, family))
    removed = [1, 3]
    adapter.delete_blocks(removed)
    kept = [i for i in range(L) if i not in removed]
    assert model.config.num_hidden_layers == L - 2
    assert [id(b) for b in blocks_of(model, family)] == [id(layers_before[i]) for i in kept]
    if family in ("qwen2", "gemma3_text"):
        assert len(set(types_before)) == 2  # the fixture really mixes sliding and full attention
        assert model.config.layer_types == [types_before[i] for i in kept]
    for new_idx, block in enumerate(blocks_of(model, family)):
        idxs = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idxs == {new_idx}
    with pytest.raises(ValueError, match="cannot remove blocks"):
        adapter.delete_blocks([99])
    with pytest.raises(ValueError, match="every block"):
        adapter.delete_blocks(range(adapter.num_layers))
