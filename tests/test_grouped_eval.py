"""Variants scored as one group (shared prefix computed once) must get exactly what each gets alone; sameness of the
prefix is checked by content, so a model differing in one weight is never served another's states; every request is
scored once per model (request store); bad evaluation arguments are one clear error before any work."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import ALL_FAMILIES, blocks_of, build_model
from test_shared_context import MAX_LENGTH, TOL, assert_same, lm, loglikelihood_requests, tokenizer  # noqa: F401

from replaceme_core.arch import get_adapter
from replaceme_core.evaluation import prefix, request_store
from replaceme_core.evaluation.perplexity import perplexity_many
from replaceme_core.evaluation.shared_context import GroupedHFLM, SharedContextHFLM
from replaceme_core.merge import Replacement, apply_replacements
from replaceme_core.select import Run

PACKED_FAMILIES = [f for f in ALL_FAMILIES if f != "falcon_alibi"]  # alibi never takes the packed path


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def variants(base, start: int = 3, n: int = 1, seed: int = 0):
    """The unpruned model, UIDL at blocks start..start+n-1 and two fitted-looking T's folded into block start-1."""
    d = get_adapter(base).hidden_size
    gen = torch.Generator().manual_seed(seed)
    out = {"base": base}
    for name, T in [("uidl", None), ("ls", torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=gen,
                                                                                                 dtype=torch.float64)),
                    ("cos", torch.eye(d, dtype=torch.float64) * 1.1)]:
        m = copy.deepcopy(base)
        if T is not None and not get_adapter(m).can_fold_general:  # Gemma 3: only a diagonal T folds
            T = torch.diag(torch.diagonal(T))
        apply_replacements(get_adapter(m), [Replacement(Run(start, n), T)])
        out[name] = m
    return out


def test_block_hashes_see_one_weight():
    """Shared depth follows the content: T folded into block 2 leaves blocks 0-1 shared; one flipped weight in block 0
    (or in the embedding) shares nothing."""
    models = variants(build_model("llama"))
    h = {k: prefix.block_hashes(m) for k, m in models.items()}
    assert prefix.shared_blocks(h["base"], h["uidl"]) == 3  # blocks 0-2 untouched, block 3 deleted
    assert prefix.shared_blocks(h["base"], h["ls"]) == 2 == prefix.shared_blocks(h["uidl"], h["cos"])
    flipped = copy.deepcopy(models["ls"])
    with torch.no_grad():
        get_adapter(flipped).layers[0].mlp.down_proj.weight[0, 0] += 1e-12
    assert prefix.shared_blocks(prefix.block_hashes(flipped), h["ls"]) == 0
    embedded = copy.deepcopy(models["ls"])
    with torch.no_grad():
        embedded.get_input_embeddings().weight[5, 0] += 1e-12
    assert prefix.shared_blocks(prefix.block_hashes(embedded), h["ls"]) == 0
    # remembered per object, yet an in-place edit of a model already hashed is seen
    with torch.no_grad():
        get_adapter(models["ls"]).layers[1].mlp.up_proj.weight[0, 0] += 1e-12
    assert prefix.shared_blocks(prefix.block_hashes(models["ls"]), h["ls"]) == 1


def test_prefix_groups_pick_the_largest_saving():
    a = ["e", "b0", "b1", "b2", "b3"]
    b = ["e", "b0", "b1", "x2"]
    c = ["e", "b0", "b1", "b2", "y3"]
    d = ["f", "b0"]
    groups = prefix.prefix_groups([a, b, c, d])
    assert groups == [([0, 1, 2], 2), ([3], 0)]  # 2 blocks for 2 others (4) beats 3 blocks for 1 (3)
    assert prefix.prefix_groups([a, c]) == [([0, 1], 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", PACKED_FAMILIES)
def test_grouped_answers_equal_each_model_alone(family, dtype, tokenizer):  # noqa: F811
    models = variants(build_model(family, dtype=dtype))
    requests = loglikelihood_requests()
    alone = {k: lm(SharedContextHFLM, m, tokenizer).loglikelihood(requests, disable_tqdm=True) for k, m in models.items()}
    names = list(models)
    shared = min(prefix.shared_blocks(prefix.block_hashes(models[names[0]]), prefix.block_hashes(models[k])) for k in names)
    assert shared == 2
    stores = {k: request_store.RequestStore(f"test-{k}") for k in names[1:]}
    grouped = lm(GroupedHFLM, models[names[0]], tokenizer)
    grouped.set_group([(models[k], stores[k]) for k in names[1:]], shared)
    # windowed families send their long groups two-phase: shared as well
    score_group_and_check(grouped, models, stores, alone, requests, family, shared, dtype)


def score_group_and_check(grouped, models, stores, alone, requests, family, shared, dtype):
    """Score `requests` with the grouped scorer of models[first]: its answers are what it gets alone, the shared blocks
    of the other members never run (their answers come from the first member's prefix), and each other member's store
    holds its own alone answer to every request."""
    names = list(models)
    calls = []
    hooks = [blocks_of(models[k], family)[i].register_forward_pre_hook(lambda *_: calls.append(1))
             for k in names[1:] for i in range(shared)]
    try:
        assert_same(alone[names[0]], grouped.loglikelihood(requests, disable_tqdm=True), TOL[dtype])
    finally:
        for h in hooks:
            h.remove()
    assert not calls
    hashes = [request_store.hash_args("loglikelihood", r.args) for r in requests]
    for k in names[1:]:
        assert all(h in stores[k] for h in hashes)
        assert_same(alone[k], [stores[k][h] for h in hashes], 1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_grouped_two_phase_answers_equal_each_model_alone(family, dtype, tokenizer):  # noqa: F811
    """The KV-cache path shares the prefix too: every member's answer to every request is what it gets alone, with
    two continuation rows per forward so that a context's cache serves several continuation batches (copied for all
    but the last), and the other members' shared blocks never run."""
    models = variants(build_model(family, dtype=dtype))
    requests = loglikelihood_requests()
    names = list(models)

    def two_phase(scorer):
        scorer.packed_model_types = frozenset()  # instance attribute: every group takes the two-phase path
        return scorer

    alone = {k: two_phase(lm(SharedContextHFLM, m, tokenizer, batch_size=2)).loglikelihood(requests, disable_tqdm=True)
             for k, m in models.items()}
    shared = min(prefix.shared_blocks(prefix.block_hashes(models[names[0]]), prefix.block_hashes(models[k])) for k in names)
    assert shared == 2
    stores = {k: request_store.RequestStore(f"test-{k}") for k in names[1:]}
    grouped = two_phase(lm(GroupedHFLM, models[names[0]], tokenizer, batch_size=2))
    grouped.set_group([(models[k], stores[k]) for k in names[1:]], shared)
    paths, batches = {"packed": 0}, {}
    original_packed, original_continuations = grouped._score_packed, grouped._score_continuations

    def count_packed(*args, **kwargs):
        paths["packed"] += 1
        return original_packed(*args, **kwargs)

    def count_continuations(chunk, batch, cache, prefix_mask, model=None):
        key = (id(chunk), id(model))
        batches[key] = batches.get(key, 0) + 1
        return original_continuations(chunk, batch, cache, prefix_mask, model=model)

    grouped._score_packed, grouped._score_continuations = count_packed, count_continuations
    score_group_and_check(grouped, models, stores, alone, requests, family, shared, dtype)
    assert paths["packed"] == 0
    # some context's continuations took several batches, for the leader and for every other member alike
    assert max(batches.values()) > 1
    assert len({chunk for chunk, _ in batches}) * len(names) == len(batches)


def test_perplexity_many_equals_each_alone():
    from test_evaluate import _deep_model, make_tokenizer  # a tiny 5-block model with a real tokenizer

    tok = make_tokenizer()
    models = variants(_deep_model(tok), start=2)
    texts = ["the cat sat on the mat", "a dog", "question what is two plus two answer four four", "x"]
    grouped = perplexity_many(list(models.values()), tok, texts, max_length=16, batch_size=2, progress=False)
    alone = [perplexity_many([m], tok, texts, max_length=16, batch_size=3, progress=False, use_cache=False)[0]
             for m in models.values()]
    for g, a in zip(grouped, alone):
        assert g["doc_tokens"] == a["doc_tokens"]
        assert g["doc_nll"] == pytest.approx(a["doc_nll"], abs=1e-4)
    assert len({round(g["ppl"], 6) for g in grouped}) == len(grouped)  # the variants really differ


def test_request_store_answers_once_and_survives_corruption(tokenizer, tmp_path):  # noqa: F811
    model = build_model("llama")
    requests = loglikelihood_requests()
    store = request_store.RequestStore("k", directory=tmp_path)
    ours = lm(SharedContextHFLM, model, tokenizer)
    ours.request_store = store
    scored = []
    original = ours._loglikelihood_tokens
    ours._loglikelihood_tokens = lambda reqs, **kw: (scored.append(len(reqs)), original(reqs, **kw))[1]
    first = ours.loglikelihood(requests, disable_tqdm=True)
    again = ours.loglikelihood(requests[:5], disable_tqdm=True)  # a later suite asking a subset: nothing to score
    assert len(scored) == 1 and again == first[:5]
    reloaded = request_store.RequestStore("k", directory=tmp_path)
    assert len(reloaded) == len({r.args for r in requests}) and isinstance(reloaded[next(iter(reloaded._entries))], tuple)
    store.path.write_text("{not json")  # a corrupted file reads as empty: everything is scored again
    ours.request_store = request_store.RequestStore("k", directory=tmp_path)
    assert_same(first, ours.loglikelihood(requests, disable_tqdm=True), 0.0)
    assert len(scored) == 2
    fresh = request_store.RequestStore("k", directory=tmp_path, fresh=True)
    assert not any(h in fresh for h in fresh._entries)


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit must be a positive"),
    ({"limit": -3}, "limit must be a positive"),
    ({"limit": 2.5}, "whole number"),
    ({"batch_size": 0}, "batch_size must be a positive"),
    ({"docs": (5, 5)}, "docs must be"),
    ({"limit": 4, "docs": (0, 4)}, "either limit"),
])
def test_bad_arguments_fail_before_any_work(kwargs, message, monkeypatch):
    from replaceme_core.evaluation import runner

    monkeypatch.setattr(runner, "_ModelRef", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        runner.evaluate("no-such-model", **kwargs)


def test_request_stores_of_two_lanes_merge(tmp_path):
    """Two processes (make paper's lanes) holding one model's store: each commit keeps what the other wrote."""
    a = request_store.RequestStore("m", directory=tmp_path)
    b = request_store.RequestStore("m", directory=tmp_path)
    a["loglikelihood", ("ctx", " a")] = (-1.0, True)
    b["loglikelihood", ("ctx", " b")] = (-2.0, False)
    a.commit()
    b.commit()
    merged = request_store.RequestStore("m", directory=tmp_path)
    assert merged[request_store.hash_args("loglikelihood", ("ctx", " a"))] == (-1.0, True)
    assert merged[request_store.hash_args("loglikelihood", ("ctx", " b"))] == (-2.0, False)
