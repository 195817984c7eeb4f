"""Notebook 13's helpers (replaceme_core/experiments/methods_table.py): held-out KL to the unpruned model against a
hand computation, the method-result cache (hit, miss, bit-identical rebuild, separate layers, tied embeddings), and
Prune&Comp on given blocks against the registry method where both remove the same blocks."""
from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import _llama_like, calib_batches, model_from_config
from replaceme_core.evaluation.model_ref import hash_state_dict
from replaceme_core.experiments import methods_table as mt

TEXTS = ["The quick brown fox jumps over the lazy dog.", "yes no", "a",
         "Question: what jumps over the dog? Answer: the quick brown fox, again and again and again.",
         "A B C D the lazy dog"]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama(vocab=128, layers=5, tie=False, seed=0):
    config = _llama_like(transformers.LlamaConfig, vocab_size=vocab, num_hidden_layers=layers,
                         tie_word_embeddings=tie, max_position_embeddings=128)
    return model_from_config(config, seed)


def bench(model, batches=None):
    return SimpleNamespace(model=model, batches=batches or calib_batches(), weights_hash=hash_state_dict(model),
                           progress=False)


# ---- KL divergence to the unpruned model ------------------------------------------------------------------------

def hand_kl(ref, model, tok, texts, max_length):
    """Per text, unpadded and alone: Σ_t Σ_v p_ref(v) (log p_ref(v) − log p(v)) over positions t with a next token."""
    out = []
    for t in texts:
        ids = torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]])
        if ids.shape[1] < 2:
            out.append((0.0, 0))
            continue
        with torch.no_grad():
            p = F.softmax(ref(input_ids=ids).logits[0, :-1].double(), -1)
            q = F.softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        out.append((float((p * (p.log() - q.log())).sum()), ids.shape[1] - 1))
    return out


def test_heldout_kl_equals_a_hand_computation_and_pairs_per_text(tok):
    from replaceme_core.evaluation.perplexity import perplexity

    ref = llama(vocab=len(tok), seed=0)
    other = llama(vocab=len(tok), seed=3)
    res = mt.heldout_kl({"ref": ref, "other": other}, ref, tok, TEXTS, max_length=16, batch_size=2)
    hand = hand_kl(ref, other, tok, TEXTS, 16)
    for got, (kl, n) in zip(res["other"]["doc_kl"], hand):
        assert got == pytest.approx(kl, rel=1e-6, abs=1e-9)
    assert res["other"]["doc_tokens"] == [n for _, n in hand]
    assert res["other"]["kl"] == pytest.approx(sum(k for k, _ in hand) / sum(n for _, n in hand), rel=1e-6)
    assert res["other"]["kl"] > 0 and res["ref"]["kl"] == pytest.approx(0.0, abs=1e-9)
    # the perplexity fields are evaluation.perplexity's, text by text
    ppl = perplexity(other, tok, TEXTS, max_length=16, batch_size=3, use_cache=False, progress=False)
    assert res["other"]["doc_tokens"] == ppl["doc_tokens"]
    assert res["other"]["doc_nll"] == pytest.approx(ppl["doc_nll"], rel=1e-6)
    assert res["other"]["ppl"] == pytest.approx(ppl["ppl"], rel=1e-6)
    # paired difference and one model's interval
    d, lo, hi = mt.kl_difference(res["other"], res["ref"])
    assert d == pytest.approx(res["other"]["kl"]) and lo <= d <= hi
    k, lo, hi = mt.kl_interval(res["other"])
    assert k == pytest.approx(res["other"]["kl"]) and lo <= k <= hi
    p, lo, hi = mt.ppl_interval(res["other"])
    assert p == pytest.approx(res["other"]["ppl"]) and lo <= p <= hi


def test_heldout_kl_is_cached_by_content(tok, monkeypatch):
    ref = llama(vocab=len(tok), seed=0)
    other = llama(vocab=len(tok), seed=3)
    first = mt.heldout_kl({"other": other}, ref, tok, TEXTS, max_length=16)
    monkeypatch.setattr(mt, "token_kl", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert mt.heldout_kl({"again": other}, ref, tok, TEXTS, max_length=16)["again"] == first["other"]
    with pytest.raises(AssertionError, match="recomputed"):  # other texts: a miss
        mt.heldout_kl({"other": other}, ref, tok, TEXTS[:3], max_length=16)


def test_token_kl_is_the_definition():
    a, b = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    p, q = F.softmax(a, -1), F.softmax(b, -1)
    assert torch.allclose(mt.token_kl(a, b), (p * (p / q).log()).sum(-1))
    assert torch.allclose(mt.token_kl(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)


# ---- the method-result cache ------------------------------------------------------------------------------------

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cached_method_hits_rebuild_the_same_model_and_misses_on_any_key_part(monkeypatch):
    from replaceme_core.methods import apply

    wb = bench(llama())
    cold = mt.cached_method(wb, "block-influence", 2)
    assert not cold.cached and cold.cost["calibration_tokens"] == sum(int(b["attention_mask"].sum()) for b in wb.batches)
    assert cold.cost["passes"] == 1 and cold.cost["wall_s"] >= 0 and cold.cost["peak_host_mb"] >= 0
    assert same_weights(wb.model, llama())  # the Workbench's model is untouched
    calls = []
    real = apply.run_method
    monkeypatch.setattr(apply, "run_method", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    warm = mt.cached_method(wb, "block-influence", 2)
    assert warm.cached and not calls and warm.removed == cold.removed and warm.cost == cold.cost
    assert warm.model.config.num_hidden_layers == 3 and same_weights(warm.model, cold.model)
    mt.cached_method(wb, "block-influence", 1)  # another number of blocks
    mt.cached_method(wb, "block-influence", 2, options={"tokens": "last"})  # another option
    mt.cached_method(wb, "block-influence", 2, batches=wb.batches[:2])  # other calibration batches
    mt.cached_method(bench(llama(seed=5), wb.batches), "block-influence", 2)  # another model
    assert calls == ["block-influence"] * 4


def test_cache_keeps_edited_weights_and_tied_embeddings(monkeypatch):
    """Prune&Comp edits embeddings (tied to the head), norms and earlier projections: the rebuilt model is identical."""
    wb = bench(llama(tie=True))
    cold = mt.cached_method(wb, "prune-comp", 2)
    warm = mt.cached_method(wb, "prune-comp", 2)
    assert warm.cached and same_weights(warm.model, cold.model)
    emb, head = warm.model.get_input_embeddings().weight, warm.model.get_output_embeddings().weight
    assert emb is head or torch.equal(emb, head)
    ids = wb.batches[0]
    with torch.no_grad():
        assert torch.equal(warm.model(**ids).logits, cold.model(**ids).logits)


def test_cache_rebuilds_a_separate_layer_result():
    wb = bench(llama(layers=6))
    cold = mt.cached_method(wb, "linearpatch", 2, options={"start": 2})
    warm = mt.cached_method(wb, "linearpatch", 2, options={"start": 2})
    assert warm.cached and warm.removed == [2, 3]
    ids = wb.batches[1]
    with torch.no_grad():
        assert torch.equal(warm.model(**ids).logits, cold.model(**ids).logits)
        assert not torch.equal(warm.model(**ids).logits, mt.cached_method(wb, "linearpatch-diag", 2,
                                                                           options={"start": 2}).model(**ids).logits)


# ---- Prune&Comp on given blocks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_prune_comp_at_the_blocks_it_would_pick_equals_the_registry_method(tie):
    """Given the registry method's own blocks (here: the whole pool, one sequence set for BI and alpha), the
    restricted rounds choose the same order and fuse the same scales."""
    wb = bench(llama(tie=tie, layers=6))
    opts = {"bi_samples": None, "scale_samples": None}
    own = mt.cached_method(wb, "prune-comp", 2, options=opts)
    blocks = own.removed
    order = [r["removed_block"] for r in own.record["method_record"]["rounds"]]
    at = mt.cached_method(wb, "prune-comp-at", 2, fn=mt.prune_comp_at, fn_options={"blocks": blocks})
    assert at.removed == blocks
    assert [r["removed_block"] for r in at.record["method_record"]["rounds"]] == order
    for a, b in zip(at.record["method_record"]["rounds"], own.record["method_record"]["rounds"]):
        assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-9)
    ids = wb.batches[0]
    with torch.no_grad():
        assert torch.allclose(at.model(**ids).logits, own.model(**ids).logits, atol=1e-9)


def test_prune_comp_at_refuses_a_wrong_block_count():
    wb = bench(llama())
    with pytest.raises(ValueError, match="give 2 distinct blocks"):
        mt.prune_comp_at(copy.deepcopy(wb.model), wb.batches, 2, blocks=[1, 1])


def test_paper_columns_name_the_star_rows():
    df = mt.paper_columns(["streamline", "sleb", "ls"])
    assert df.loc[0, "paper method"] == "LLM-Streamline*" and df.loc[0, "paper README: avg"] == 0.614
    assert df.loc[1, "paper method"] is None or (isinstance(df.loc[1, "paper method"], float) and math.isnan(df.loc[1, "paper method"]))
    assert df.loc[2, "paper T1: RP %"] == 89.9


def _interleaved_heap_pages_freed() -> list:
    """300 MB of 256 KB tensors freed between small pinned ones: the pages stay in the C heap, resident but free."""
    big = [torch.ones(65536) for _ in range(1200)]
    pins = [torch.ones(16) for _ in range(1200)]
    del big
    return pins


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc/self/statm and glibc's malloc_trim")
def test_peak_memory_counts_a_block_that_reuses_pages_freed_before_it():
    """Measured on the real chunks: without handing free heap pages back first, about 134 of these 300 MB were seen."""
    pins = _interleaved_heap_pages_freed()
    with mt.PeakMemory() as mem:
        held = [torch.ones(65536) for _ in range(1200)]
    assert mem.peak_host >= 0.9 * 1200 * 65536 * 4, mem.peak_host / 2 ** 20
    assert mem.peak_device is None
    del held, pins
