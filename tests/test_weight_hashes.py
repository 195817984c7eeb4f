"""The evaluation cache's weight hash (`model_ref.hash_state_dict`) and the grouping's block hashes
(`prefix.block_hashes`) are both made from one remembered table of per-tensor digests, so each tensor's bytes are
hashed once for both; they still see a single changed weight, follow content (not identity), keep tied tensors'
treatment, and do not depend on where a block sits."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from conftest import _llama_like, build_model, model_from_config

from replaceme_core.arch import get_adapter
from replaceme_core.evaluation import model_ref, prefix


def _ident(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


@pytest.fixture
def digest_calls(monkeypatch):
    """Every tensor handed to the byte digest, by storage view."""
    calls: Counter = Counter()
    real = model_ref.tensor_digest

    def counting(t):
        calls[_ident(t)] += 1
        return real(t)

    monkeypatch.setattr(model_ref, "tensor_digest", counting)
    return calls


def _tied():
    return model_from_config(_llama_like(transformers.LlamaConfig, tie_word_embeddings=True), 0, torch.float64)


@pytest.mark.parametrize("make", [lambda: build_model("llama"), _tied], ids=["untied", "tied"])
@pytest.mark.parametrize("order", ["state_first", "blocks_first"])
def test_each_tensor_is_digested_once_for_both_hashes(digest_calls, make, order):
    m = make()
    views = {_ident(t) for t in m.state_dict().values()}
    calls = [lambda: model_ref.hash_state_dict(m), lambda: prefix.block_hashes(m)]
    for f in calls if order == "state_first" else calls[::-1]:
        f()
    assert set(digest_calls) == views and set(digest_calls.values()) == {1}
    model_ref.hash_state_dict(m), prefix.block_hashes(m)  # remembered: no bytes hashed again
    assert set(digest_calls.values()) == {1}


def test_tied_model_is_tied():  # the tied case above really has an alias
    m = _tied()
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    assert model_ref.tensor_digests(m).alias == {"model.embed_tokens.weight": "lm_head.weight"}


@pytest.mark.parametrize("where", ["embedding", "block", "head"])
def test_weight_hash_sees_one_weight_and_follows_content(where):
    base = build_model("llama")
    h0, b0 = model_ref.hash_state_dict(base), prefix.block_hashes(base)
    twin = copy.deepcopy(base)
    assert model_ref.hash_state_dict(twin) == h0 and prefix.block_hashes(twin) == b0  # content, not identity
    assert model_ref.hash_state_dict(build_model("llama")) == h0
    with torch.no_grad():
        w = {"embedding": lambda: twin.get_input_embeddings().weight,
             "block": lambda: get_adapter(twin).layers[3].self_attn.k_proj.weight,
             "head": lambda: twin.lm_head.weight}[where]()
        w[1, 1] += 1e-12
    assert model_ref.hash_state_dict(twin) != h0
    changed = [i for i, (x, y) in enumerate(zip(prefix.block_hashes(twin), b0)) if x != y]
    assert changed == ([4] if where == "block" else [0])
    assert model_ref.hash_state_dict(twin) == model_ref._hash_state_dict(twin)  # remembered == afresh
    assert prefix.block_hashes(twin) == prefix._block_hashes(twin)


def test_data_writes_are_seen_by_the_fresh_hashes():
    m = build_model("llama")
    h0, b0 = model_ref.hash_state_dict(m), prefix.block_hashes(m)
    get_adapter(m).layers[0].mlp.up_proj.weight.data[0, 0] += 1e-12  # bypasses the version counter
    assert model_ref._hash_state_dict(m) != h0
    assert prefix._block_hashes(m)[1] != b0[1] and prefix._block_hashes(m)[2:] == b0[2:]


def test_block_hash_does_not_depend_on_position():
    base = build_model("llama")
    pruned = copy.deepcopy(base)
    layers = get_adapter(pruned).layers
    del layers[1]
    pruned.config.num_hidden_layers -= 1
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = pruned.config.layer_types[:1] + pruned.config.layer_types[2:]
    a, b = prefix.block_hashes(base), prefix.block_hashes(pruned)
    assert b[0] == a[0] and b[1] == a[1] and b[2:] == a[3:]  # block 2 → position 1 keeps its hash
    assert prefix.shared_blocks(a, b) == 1
    assert model_ref.hash_state_dict(pruned) != model_ref.hash_state_dict(base)


def test_tied_tensors_keep_their_treatment():
    """hash_state_dict marks a tie (an untied copy of the same values is another model); block_hashes counts the head by
    content (both share every entry)."""
    tied = _tied()
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    assert model_ref.hash_state_dict(untied) != model_ref.hash_state_dict(tied)
    assert prefix.block_hashes(untied) == prefix.block_hashes(tied)


def test_hashes_are_the_same_in_another_process():
    m = build_model("llama")
    here = [model_ref.hash_state_dict(m), prefix.block_hashes(m)]
    code = ("import json, sys; sys.path.insert(0, '.'); from conftest import build_model; "
            "from replaceme_core.evaluation import model_ref, prefix; m = build_model('llama'); "
            "print(json.dumps([model_ref.hash_state_dict(m), prefix.block_hashes(m)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
