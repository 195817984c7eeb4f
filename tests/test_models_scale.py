"""Notebook 10/12 support: the tiny random Gemma 3 of the smoke profile, and the profile sections' consistency."""
from __future__ import annotations

import pytest
import torch

from replaceme_core import evaluation as ev
from replaceme_core.arch import get_adapter
from replaceme_core.experiments.workbench import load_profile
from replaceme_core.io.models import load_model

BLOCKS = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18, "tiny-random-llama": 8, "tiny-random-gemma3": 6}


def test_tiny_gemma3_is_a_gemma3_that_folds_only_a_diagonal():
    model, tok = load_model("tiny-random-gemma3")
    adapter = get_adapter(model)
    assert type(model).__name__ == "Gemma3ForCausalLM" and adapter.num_layers == 6
    assert adapter.fold_path is None and adapter.diagonal_fold_path == "post_feedforward_layernorm"
    assert "full_attention" in model.config.layer_types and "sliding_attention" in model.config.layer_types
    # deterministic: the same seed gives the same weights
    again, _ = load_model("tiny-random-gemma3")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_diagonal_fold_into_gemma_norm_equals_scaling_its_output():
    """Folding t into post_feedforward_layernorm = multiplying that norm's output by t (checked with a hook)."""
    model, tok = load_model("tiny-random-gemma3")
    adapter = get_adapter(model)
    ids = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    t = 1.0 + 0.3 * torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    norm = model.model.layers[2].post_feedforward_layernorm
    handle = norm.register_forward_hook(lambda mod, inp, out: out * t)
    with torch.no_grad():
        expected = model(**ids).logits
    handle.remove()
    adapter._fold_diagonal_into_norm(norm, t)
    with torch.no_grad():
        got = model(**ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu", "paper"])
def test_profile_sections_are_consistent(name):
    p = load_profile(name)
    s10 = p["10_models_and_scale"]
    assert s10["suite"] in p["eval"] and s10["method"] in ("ls", "cosine", "cosine-exact", "mse")
    assert s10["models"][0]["model"] == p["model"] or name == "paper"
    for m in s10["models"]:
        assert m["table_blocks"] and m["sweep_blocks"]
        if m["model"] in BLOCKS:
            assert max(m["sweep_blocks"] + m["table_blocks"]) < BLOCKS[m["model"]]
    s12 = p["12_other_benchmarks"]
    assert set(s12["variants"]) <= {"uidl", "ls", "cosine", "cosine-exact", "mse"}
    for spec in s12["suites"].values():
        assert all(t in ev.TASKS for t in spec["tasks"])
        if name != "paper":  # offline profiles: every task has packaged data
            assert all(ev.TASKS[t].yaml is not None for t in spec["tasks"])
