"""SharedContextHFLM (lm-eval model `replaceme`) must give plain HFLM's numbers while running each distinct context
through the blocks once and the LM head only at scored positions. Every expectation below is computed by plain
HFLM (or counted from HFLM's own tokenisation), never hard-coded."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import ALL_FAMILIES, HIDDEN, VOCAB, blocks_of, build_model
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from replaceme_core.evaluation import shared_context
from replaceme_core.evaluation.shared_context import MODEL_NAME, SharedContextHFLM

MAX_LENGTH = 40  # small, so that the long request below needs HFLM's left truncation
TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
# bf16 sums a request's log-probs in bf16 (as HFLM does): allow 3 % of the value plus 0.05 nats.
BF16_REL, BF16_ABS = 0.03, 0.05

CORPUS = ["the cat sat on the mat and the dog sat on the log",
          "question: what is two plus two? answer: four",
          "a quick brown fox jumps over the lazy dog near the river bank"]
LONG = " ".join(CORPUS * 2)

# context -> continuations (several per context, so contexts are shared)
LOGLIKELIHOOD_CASES = {
    "the cat sat on the": [" mat", " log", " dog near the river", "mat"],
    "question: what is two plus two? answer:": [" four", " two", " four four"],
    "": ["the cat sat", " the dog", "a"],                  # empty context: HFLM's prefix token
    "a quick brown fox ": ["jumps", "sat on the log"],     # trailing whitespace moves into the continuation
    LONG: [" the end", " dog", " over the lazy dog near the river bank"],  # needs left truncation
    "the lazy dog": [" sat"],
}


def word_salad(seed: int, n_words: int) -> str:
    """A long, non-periodic text from CORPUS's words (periodic texts make windows of different texts coincide)."""
    words = " ".join(CORPUS).split()
    gen = torch.Generator().manual_seed(seed)
    return " ".join(words[i] for i in torch.randint(len(words), (n_words,), generator=gen).tolist())


ROLLING_TEXTS = [word_salad(0, 90), "the cat", CORPUS[2], word_salad(1, 50)]


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # HFLM warns about pre-loaded models and truncation on every construction
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def tokenizer():
    """An offline BPE (Metaspace, like SentencePiece) trained on CORPUS, with <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz?:.,"), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert len(fast) <= VOCAB
    return fast


def loglikelihood_requests(cases=LOGLIKELIHOOD_CASES):
    pairs = [(ctx, cont) for ctx, conts in cases.items() for cont in conts]
    pairs += [pairs[0], pairs[5], pairs[0]]  # duplicated requests
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def rolling_requests():
    return [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(ROLLING_TEXTS)]


def lm(cls, model, tokenizer, **kwargs):
    kwargs = {"device": "cpu", "max_length": MAX_LENGTH, "batch_size": 4} | kwargs
    return cls(pretrained=model, tokenizer=tokenizer, **kwargs)


def hflm_tokens(hflm, requests):
    """HFLM's own (context, continuation) token pairs for the requests, captured from its tokenisation."""
    captured = []

    def capture(reqs, **_):
        captured.extend(reqs)
        return [(0.0, False)] * len(reqs)

    hflm._loglikelihood_tokens = capture  # instance attribute: shadows the method for this object only
    hflm.loglikelihood(requests, disable_tqdm=True)
    return [(tuple(ctx), tuple(cont)) for _, ctx, cont in captured]


def assert_same(ref, got, tol):
    assert len(ref) == len(got)
    for i, ((ll_ref, greedy_ref), (ll, greedy)) in enumerate(zip(ref, got)):
        assert abs(ll - ll_ref) <= tol, (i, ll_ref, ll)
        assert greedy == greedy_ref, (i, greedy_ref, greedy)


def test_requests_cover_the_edge_cases(tokenizer):
    """The shared request list really holds what the comparisons below claim to test."""
    hflm = lm(HFLM, build_model("llama"), tokenizer)
    requests = loglikelihood_requests()
    toks = hflm_tokens(hflm, requests)
    assert any(len(c) + len(x) > MAX_LENGTH + 1 for c, x in toks)  # left truncation
    assert toks[[r.args[0] for r in requests].index("")][0] == (hflm.prefix_token_id,)  # empty context
    assert len({c for c, _ in toks}) < len(set(toks)) < len(toks)  # shared contexts, duplicates
    assert any(len(x) == 1 for _, x in toks) and any(len(x) > 3 for _, x in toks)
    longest = max(len(hflm.tok_encode(t)) for t in ROLLING_TEXTS)
    assert longest > 2 * MAX_LENGTH  # several rolling windows, the last one with a real context


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_loglikelihood_matches_hflm(family, dtype, tokenizer, monkeypatch):
    """Both scoring paths, packed rows (where the family allows them) and prefill + continuations, give HFLM's."""
    model = build_model(family, dtype=dtype)
    requests = loglikelihood_requests()
    ref = lm(HFLM, model, tokenizer, batch_size=8).loglikelihood(requests, disable_tqdm=True)
    ours = lm(SharedContextHFLM, model, tokenizer, batch_size=4)
    paths = {"packed": 0, "two-phase": 0}
    for name, method in [("packed", "_score_packed"), ("two-phase", "_score_chunk")]:
        original = getattr(ours, method)
        monkeypatch.setattr(ours, method, lambda chunk, _f=original, _n=name, **kw: (
            paths.__setitem__(_n, paths[_n] + 1), _f(chunk, **kw))[1])
    assert_same(ref, ours.loglikelihood(requests, disable_tqdm=True), TOL[dtype])
    assert (paths["packed"] > 0) == (family != "falcon_alibi")  # alibi derives its biases from a 2D mask
    ours.packed_model_types = frozenset()
    paths.update({"packed": 0, "two-phase": 0})
    assert_same(ref, ours.loglikelihood(requests, disable_tqdm=True), TOL[dtype])
    assert paths["packed"] == 0 and paths["two-phase"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rolling_matches_hflm(family, dtype, tokenizer):
    model = build_model(family, dtype=dtype)
    requests = rolling_requests()
    ref = lm(HFLM, model, tokenizer, batch_size=8).loglikelihood_rolling(requests, disable_tqdm=True)
    got = lm(SharedContextHFLM, model, tokenizer, batch_size=3).loglikelihood_rolling(requests, disable_tqdm=True)
    assert got == pytest.approx(ref, abs=TOL[dtype], rel=0)  # totals of a few hundred nats


@pytest.mark.parametrize("batch_size", [1, 2, 64, "auto"])
def test_batch_size_is_respected_and_irrelevant(batch_size, tokenizer, monkeypatch):
    monkeypatch.setattr(shared_context, "HEAD_CHUNK", 5)  # several head calls per batch, too
    model = build_model("mistral")  # sliding-window attention: the cache is cut to the window
    requests = loglikelihood_requests()
    ref = lm(HFLM, model, tokenizer).loglikelihood(requests, disable_tqdm=True)
    ours = lm(SharedContextHFLM, model, tokenizer, batch_size=batch_size, max_batch_size=4)
    rows = []
    block = blocks_of(model, "mistral")[0]
    handle = block.register_forward_pre_hook(lambda _m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]),
                                             with_kwargs=True)
    try:
        assert_same(ref, ours.loglikelihood(requests, disable_tqdm=True), TOL[torch.float64])
    finally:
        handle.remove()
    assert max(rows) <= (4 if batch_size == "auto" else batch_size)  # "auto" probes from max_batch_size down


def test_each_context_once_and_head_only_where_scored(tokenizer):
    """Count tokens through the first block and rows through the head against HFLM's tokenised requests."""
    cases = {k: v for k, v in LOGLIKELIHOOD_CASES.items() if k != LONG}  # no truncation: contexts are as tokenised
    requests = loglikelihood_requests(cases)
    model = build_model("llama")
    pairs = set(hflm_tokens(lm(HFLM, model, tokenizer), requests))
    contexts = {c for c, _ in pairs}
    # two-phase: each context but its last token once, then [context[-1]] + continuation[:-1] per continuation
    two_phase = (sum(len(c) - 1 for c in contexts) + sum(len(x) for _, x in pairs), sum(len(x) for _, x in pairs))
    # packed: each context once, then continuation[:-1]; the context's last position is read by all its continuations
    packed = (sum(len(c) for c in contexts) + sum(len(x) - 1 for _, x in pairs),
              len(contexts) + sum(len(x) - 1 for _, x in pairs))

    def count(cls, batch_size, **attrs):
        block, head = [0], [0]

        def on_block(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            block[0] += h.shape[0] * h.shape[1]

        def on_head(_m, args):
            head[0] += args[0].numel() // HIDDEN

        handles = [blocks_of(model, "llama")[0].register_forward_pre_hook(on_block, with_kwargs=True),
                   model.get_output_embeddings().register_forward_pre_hook(on_head)]
        try:
            scorer = lm(cls, model, tokenizer, batch_size=batch_size)
            for name, value in attrs.items():
                setattr(scorer, name, value)
            scorer.loglikelihood(requests, disable_tqdm=True)
        finally:
            for h in handles:
                h.remove()
        return block[0], head[0]

    assert count(SharedContextHFLM, batch_size=1) == packed  # batch 1: no padding, so counts are exact
    assert count(SharedContextHFLM, batch_size=8)[1] == packed[1]  # gathered: padding never reaches the head
    assert count(SharedContextHFLM, batch_size=1, packed_model_types=frozenset()) == two_phase
    assert count(SharedContextHFLM, batch_size=8, packed_model_types=frozenset())[1] == two_phase[1]
    hf_block, hf_head = count(HFLM, batch_size=1)
    assert packed[0] < two_phase[0] < hf_block and packed[1] < two_phase[1] < hf_head


def test_colliding_requests_match_unbatched_hflm(tokenizer):
    """Requests whose `context + continuation[:-1]` coincide but whose continuations differ in length: here
    ("", "the cat") and ("the", " cat"), or the rolling windows of periodic texts. HFLM 0.4.13's one-token logits
    cache (`logits_cache=True`, its default) scores the shorter one at the wrong positions (it gathers from the front
    of the longer one's logits), so the reference is HFLM scoring each request alone, and HFLM without that cache."""
    model = build_model("llama")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate([("", "the cat"), ("the", " cat")])]
    toks = hflm_tokens(lm(HFLM, model, tokenizer), requests)
    assert toks[0][0] + toks[0][1][:-1] == toks[1][0] + toks[1][1][:-1]
    hflm, uncached = lm(HFLM, model, tokenizer), lm(HFLM, model, tokenizer, logits_cache=False)
    ours = lm(SharedContextHFLM, model, tokenizer)
    got = ours.loglikelihood(requests, disable_tqdm=True)
    assert_same([hflm.loglikelihood([r], disable_tqdm=True)[0] for r in requests], got, TOL[torch.float64])
    assert_same(uncached.loglikelihood(requests, disable_tqdm=True), got, TOL[torch.float64])

    periodic = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([LONG + " " + LONG, LONG])]
    got = ours.loglikelihood_rolling(periodic, disable_tqdm=True)
    alone = [hflm.loglikelihood_rolling([r], disable_tqdm=True)[0] for r in periodic]
    assert got == pytest.approx(alone, abs=TOL[torch.float64])
    assert got == pytest.approx(uncached.loglikelihood_rolling(periodic, disable_tqdm=True), abs=TOL[torch.float64])


def test_gemma3_final_logit_softcapping(tokenizer):
    model = build_model("gemma3_text")
    requests = loglikelihood_requests()
    plain = lm(HFLM, model, tokenizer).loglikelihood(requests, disable_tqdm=True)
    model.config.final_logit_softcapping = 0.3  # the tiny random model's logits are small: cap hard enough to matter
    ref = lm(HFLM, model, tokenizer).loglikelihood(requests, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(plain, ref)) > 0.1
    assert_same(ref, lm(SharedContextHFLM, model, tokenizer).loglikelihood(requests, disable_tqdm=True),
                TOL[torch.float64])


def test_unknown_family_falls_back_to_full_logits(tokenizer):
    model = build_model("qwen2")
    requests = loglikelihood_requests()
    ref = lm(HFLM, model, tokenizer).loglikelihood(requests, disable_tqdm=True)
    ours = lm(SharedContextHFLM, model, tokenizer)
    ours.head_only_model_types = frozenset()  # as if qwen2 were not known to be `head(base(x))`
    assert ours._split_head() is None
    assert_same(ref, ours.loglikelihood(requests, disable_tqdm=True), TOL[torch.float64])
    rolling = rolling_requests()
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        lm(HFLM, model, tokenizer).loglikelihood_rolling(rolling, disable_tqdm=True), abs=TOL[torch.float64])


def test_bf16_from_arguments(tmp_path, tokenizer, monkeypatch):
    """Loaded from a directory with dtype="bfloat16": the head really runs in bf16, and the scores agree with HFLM
    in bf16 (and with HFLM in float32) within BF16_REL * |value| + BF16_ABS."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_model("llama", dtype=torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    requests, rolling = loglikelihood_requests(), rolling_requests()

    def run(cls, dtype):
        model = cls(pretrained=str(tmp_path), device="cpu", dtype=dtype, batch_size=4, max_length=MAX_LENGTH)
        seen = []
        handle = model.model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
        try:
            return model.loglikelihood(requests, disable_tqdm=True), model.loglikelihood_rolling(
                rolling, disable_tqdm=True), set(seen)
        finally:
            handle.remove()

    ours, ours_rolling, ours_dtypes = run(SharedContextHFLM, "bfloat16")
    assert ours_dtypes == {torch.bfloat16}
    for cls, dtype in [(HFLM, "bfloat16"), (HFLM, "float32")]:
        ref, ref_rolling, _ = run(cls, dtype)
        for (a, _), (b, _) in zip(ref, ours):
            assert abs(a - b) <= BF16_REL * abs(a) + BF16_ABS, (dtype, a, b)
        for a, b in zip(ref_rolling, ours_rolling):
            assert abs(a - b) <= BF16_REL * abs(a) + BF16_ABS, (dtype, a, b)
    f32, _, _ = run(SharedContextHFLM, "float32")
    assert [a for a, _ in f32] != [b for b, _ in ours]  # bf16 is not float32 in disguise


def test_registered_in_lm_eval():
    assert MODEL_NAME == "replaceme"
    assert get_model("replaceme") is SharedContextHFLM
    assert get_model("hf") is HFLM  # lm-eval's own models are still found
    assert SharedContextHFLM.generate_until is HFLM.generate_until


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_alibi", "gemma3_text"])
def test_cuda_matches_hflm(family, dtype, tokenizer):
    model = build_model(family, dtype=dtype).to("cuda")
    requests, rolling = loglikelihood_requests(), rolling_requests()
    ref, ours = lm(HFLM, model, tokenizer, device="cuda"), lm(SharedContextHFLM, model, tokenizer, device="cuda")
    got = ours.loglikelihood(requests, disable_tqdm=True)
    if dtype == torch.float32:
        assert_same(ref.loglikelihood(requests, disable_tqdm=True), got, TOL[dtype])
    else:
        for (a, _), (b, _) in zip(ref.loglikelihood(requests, disable_tqdm=True), got):
            assert abs(a - b) <= BF16_REL * abs(a) + BF16_ABS
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        ref.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-5 if dtype == torch.float32 else BF16_REL)
