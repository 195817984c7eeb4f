"""The depth-pruning methods of replaceme_core/methods (Block Influence, SLEB, Shortened-PPL, Shortened-Taylor+) against
independent recomputations: brute-force deletion with plain transformers forwards, autograd by hand, hidden states."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import blocks_of, build_model, calib_batches, make_batch
from replaceme_core.arch import UnsupportedModelError, get_adapter
from replaceme_core.methods import REGISTRY, get_method, parse_option, resolve_options
from replaceme_core.methods.apply import run_method
from replaceme_core.methods.block_influence import block_influence_scores
from replaceme_core.methods.common import PARTIAL_FORWARD_TYPES, PartialForward, drop_one_nll
from replaceme_core.methods.shortened_llama import ppl_scores, taylor_scores

PARTIAL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def deep_llama(layers=8, seed=0, dtype=torch.float64):
    """A tiny random Llama with more blocks than the shared fixtures (room for barriers and several phases)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():  # large perturbations: blocks differ clearly, so no near-ties
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def hf_total_nll(model, batches) -> float:
    """Σ over batches of transformers' own mean loss × the number of predicted tokens (right padding: pads ignored).
    transformers computes its loss in float32 even for a float64 model, so comparisons with it hold to ~1e-7."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            total += float(loss) * int((labels[:, 1:] != -100).sum())
    return total


def predicted(batches) -> int:
    return sum(int((b["attention_mask"][:, 1:] == 1).sum()) for b in batches)


def without(model, blocks):
    m = copy.deepcopy(model)
    get_adapter(m).delete_blocks(list(blocks))
    return m


# ---------------------------------------------------------------------------------------------------------------
# the cached partial forward


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("family", PARTIAL_FAMILIES)
def test_partial_forward_reproduces_the_full_forward(family, dtype, tol):
    model = build_model(family, dtype=dtype)
    pf = PartialForward(model)
    L = pf.num_layers
    for padding in ("right", "left"):
        batch = make_batch([12, 7, 10, 4], padding=padding, seed=3)
        mask = batch["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            ref = model(**batch, position_ids=position_ids).logits
        state = pf.start(batch)
        # from the embeddings, and from a cached hidden state in the middle (blocks 0..j-1, then j..L-1)
        for j in (0, 2, L - 1):
            h = pf.run(state, state.hidden, range(j))
            logits = pf.logits(pf.run(state, h, range(j, L)))
            err = (logits - ref)[mask.bool()].abs().max().item()
            assert err <= tol * max(1.0, ref.abs().max().item()), (family, padding, j, err)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_the_sliding_window_mask_is_used(family):
    """Sequences of 12 tokens under a window of 6: a plain causal mask would give other logits."""
    from transformers.masking_utils import create_causal_mask

    model = build_model(family)
    pf = PartialForward(model)
    batch = make_batch([12, 12], seed=4)
    state = pf.start(batch)
    good = pf.logits(pf.run(state, state.hidden, range(pf.num_layers)))
    causal = create_causal_mask(config=model.config, inputs_embeds=state.hidden, attention_mask=batch["attention_mask"],
                                cache=None, position_ids=state.position_ids)
    state.masks = [causal] * pf.num_layers
    wrong = pf.logits(pf.run(state, state.hidden, range(pf.num_layers)))
    assert (good - wrong).abs().max() > 1e-6


def test_drop_one_nll_equals_one_full_pass_per_candidate():
    model = deep_llama(6)
    batches = calib_batches(seed=1)
    pf = PartialForward(model)
    alive = [0, 1, 3, 4, 5]  # block 2 already removed
    nll = drop_one_nll(pf, batches, alive, [1, 3, 5])
    for c in (1, 3, 5):
        expected = hf_total_nll(without(model, [2, c]), batches)
        assert nll[c] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# SLEB


def brute_force_sleb(model, batches, n, early=1, latter=1):
    alive, removed, phase_nll = list(range(get_adapter(model).num_layers)), [], []
    for _ in range(n):
        cands = alive[early: len(alive) - latter]
        scores = {c: hf_total_nll(without(model, removed + [c]), batches) for c in cands}
        best = min(cands, key=lambda c: scores[c])
        removed.append(best)
        alive.remove(best)
        phase_nll.append(scores)
    return removed, phase_nll


@pytest.mark.parametrize("n,early,latter", [(3, 1, 1), (2, 0, 0)])
def test_sleb_greedy_pick_equals_brute_force(n, early, latter):
    model = deep_llama(8)
    batches = calib_batches(seed=2)
    order, phase_nll = brute_force_sleb(model, batches, n, early, latter)
    reference = without(model, order)
    result = run_method(model, batches, "sleb", n, options={"early_barrier": early, "latter_barrier": latter},
                        progress=False)
    rec = result.record["method_record"]
    assert rec["removal_order"] == order
    assert result.record["removed_blocks"] == sorted(order)
    for phase, scores in zip(rec["phases"], phase_nll):
        assert {int(k): v for k, v in phase["nll"].items()} == pytest.approx(scores, rel=1e-6)
    assert rec["candidate_evaluations"] == sum(len(s) for s in phase_nll)
    batch = batches[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-10)
    assert result.record["options"] == {"early_barrier": early, "latter_barrier": latter}
    assert result.record["num_layers_after"] == 8 - n and model.config.num_hidden_layers == 8 - n


def test_sleb_cannot_remove_what_its_barriers_protect():
    model = build_model("llama")  # 5 blocks: barriers (1, 1) allow at most 3
    with pytest.raises(ValueError, match=r"at most 3 of 5 blocks, not 4") as err:
        run_method(model, calib_batches(), "sleb", 4, progress=False)
    assert "\n" not in str(err.value)
    assert get_adapter(model).num_layers == 5


@pytest.mark.parametrize("name", ["sleb", "shortened-ppl"])
def test_methods_that_run_blocks_refuse_other_families(name):
    model = build_model("gpt2")
    with pytest.raises(UnsupportedModelError) as err:
        run_method(model, calib_batches(), name, 1, options={"plus_heuristic": False} if name != "sleb" else None,
                   progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "'gpt2'" in msg and all(t in msg for t in PARTIAL_FORWARD_TYPES)
    assert get_adapter(model).num_layers == 5


# ---------------------------------------------------------------------------------------------------------------
# Shortened LLaMA


def test_ppl_criterion_equals_brute_force():
    model = deep_llama(8)
    batches = calib_batches(seed=5)
    count = predicted(batches)
    expected = {b: math.exp(hf_total_nll(without(model, [b]), batches) / count) for b in range(8)}
    scores, n_tokens = ppl_scores(model, batches)
    assert n_tokens == count
    assert scores == pytest.approx(expected, rel=1e-6)
    order = sorted(expected, key=expected.get)
    plain = run_method(copy.deepcopy(model), batches, "shortened-ppl", 3, options={"plus_heuristic": False}, progress=False)
    assert plain.record["removed_blocks"] == sorted(order[:3])
    plus = run_method(copy.deepcopy(model), batches, "shortened-ppl", 3, options={"keep_first": 2, "keep_last": 1},
                      progress=False)
    allowed = [b for b in order if 2 <= b <= 6]
    assert plus.record["removed_blocks"] == sorted(allowed[:3])


def hand_taylor(model, batches, family):
    """Σ_W Σ |Σ_batches W ⊙ ∂ℒ/∂W| per block, ℒ = the batch's mean next-token cross-entropy written out by hand."""
    blocks = blocks_of(model, family)
    params = {b: [p for name, p in blocks[b].named_parameters() if "weight" in name] for b in range(len(blocks))}
    flat = [p for b in params for p in params[b]]
    sal = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        valid = mask[:, 1:].bool()
        loss = -(logp[valid]).sum() / valid.sum()
        grads = torch.autograd.grad(loss, flat)
        for s, p, g in zip(sal, flat, grads):
            s += (p.detach() * g).double()
    out, k = {}, 0
    for b in params:
        out[b] = sum(float(sal[k + i].abs().sum()) for i in range(len(params[b])))
        k += len(params[b])
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_taylor_scores_equal_autograd_by_hand(family):
    model = build_model(family)
    batches = calib_batches(seed=6)
    expected = hand_taylor(model, batches, family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = taylor_scores(model, batches)
    assert scores == pytest.approx(expected, rel=1e-9)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_taylor_plus_rule_picks_from_the_ascending_order():
    model = deep_llama(8)
    batches = calib_batches(seed=7)
    scores = taylor_scores(model, batches)
    order = sorted(scores, key=scores.get)
    res = run_method(copy.deepcopy(model), batches, "shortened-taylor", 2, options={"keep_first": 3, "keep_last": 2},
                     progress=False)
    assert res.record["removed_blocks"] == sorted([b for b in order if 3 <= b <= 5][:2])
    plain = run_method(copy.deepcopy(model), batches, "shortened-taylor", 2, options={"plus_heuristic": False},
                       progress=False)
    assert plain.record["removed_blocks"] == sorted(order[:2])


def test_plus_rule_that_leaves_too_few_blocks_is_one_line():
    model = build_model("llama")  # 5 blocks, the paper's '+' keeps 0-3 and 3-4: nothing left
    with pytest.raises(ValueError, match="can remove at most 0 of 5") as err:
        run_method(model, calib_batches(), "shortened-taylor", 1, progress=False)
    assert "\n" not in str(err.value) and get_adapter(model).num_layers == 5


# ---------------------------------------------------------------------------------------------------------------
# ShortGPT Block Influence


def test_block_influence_equals_hidden_states_by_hand():
    model = build_model("llama")
    batches = calib_batches(seed=8)
    L = 5
    last_out = []
    handle = blocks_of(model, "llama")[L - 1].register_forward_hook(lambda m, i, o: last_out.append(o[0] if isinstance(o, tuple) else o))
    sums, rows = torch.zeros(L, dtype=torch.float64), 0
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states  # hs[L] is after the final norm
            mask = b["attention_mask"].bool()
            outs = list(hs[1:L]) + [last_out.pop()]
            assert not torch.allclose(outs[-1], hs[L])  # the pitfall is real: hs[L] is not block L-1's output
            prev = hs[0]
            for i in range(L):
                cos = torch.nn.functional.cosine_similarity(prev[mask], outs[i][mask], dim=-1)
                sums[i] += (1 - cos).sum()
                prev = outs[i]
            rows += int(mask.sum())
    handle.remove()
    expected = {i: float(sums[i]) / rows for i in range(L)}
    bi, n = block_influence_scores(model, batches)
    assert n == rows and bi == pytest.approx(expected, rel=1e-10)
    res = run_method(model, batches, "block-influence", 2, progress=False)
    lowest = sorted(sorted(expected, key=expected.get)[:2])
    assert res.record["removed_blocks"] == lowest and res.record["blocks_receiving_T"] == []
    assert res.record["method_record"]["block_influence"] == pytest.approx({str(k): v for k, v in expected.items()}, rel=1e-10)


def test_block_influence_works_beyond_llama_like_families():
    model = build_model("gpt2")
    res = run_method(model, calib_batches(), "block-influence", 2, options={"tokens": "last"}, progress=False)
    assert len(res.record["removed_blocks"]) == 2 and get_adapter(model).num_layers == 3


def test_replaceme_bi_selection_uses_the_moved_function():
    from replaceme_core import prune, select
    from replaceme_core.methods import block_influence as module

    assert select.choose_by_block_influence is module.choose_by_block_influence
    assert prune.choose_by_block_influence is module.choose_by_block_influence


# ---------------------------------------------------------------------------------------------------------------
# registry and options


def test_registry_has_these_methods_with_their_defaults():
    for name in ("block-influence", "sleb", "shortened-ppl", "shortened-taylor"):
        assert get_method(name).paper
    assert REGISTRY["sleb"].defaults == {"early_barrier": 1, "latter_barrier": 1}
    assert REGISTRY["shortened-taylor"].defaults == {"plus_heuristic": True, "keep_first": 4, "keep_last": 2}
    assert REGISTRY["shortened-ppl"].data == {"samples": 10, "max_length": 128, "batch_size": 10}


def test_unknown_method_and_option_are_one_line_and_change_nothing():
    model = build_model("llama")
    with pytest.raises(ValueError, match="unknown depth-pruning method 'nope'") as err:
        run_method(model, calib_batches(), "nope", 1, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="takes no option barrier; its options: early_barrier, latter_barrier") as err:
        run_method(model, calib_batches(), "sleb", 1, options={"barrier": 2}, progress=False)
    assert "\n" not in str(err.value) and get_adapter(model).num_layers == 5


def test_options_are_typed_by_their_default():
    m = get_method("shortened-taylor")
    assert parse_option(m, "keep_first=2") == ("keep_first", 2)
    assert parse_option(m, "plus-heuristic=false") == ("plus_heuristic", False)
    assert parse_option(get_method("block-influence"), "tokens=last") == ("tokens", "last")
    for bad, msg in (("keep_first=two", "takes a int"), ("plus_heuristic=maybe", "takes a bool"), ("keep_first", "KEY=VALUE"),
                     ("depth=3", "takes no option depth")):
        with pytest.raises(ValueError, match=msg):
            parse_option(m, bad)
    assert resolve_options(m, {"keep_last": 0}) == {"plus_heuristic": True, "keep_first": 4, "keep_last": 0}
