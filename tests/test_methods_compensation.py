"""LaCo, LinearPatch and Prune&Comp (replaceme_core/methods/{laco,linearpatch,prune_comp}.py), each checked against an
independent computation on tiny random Llama models: weights from the formulas, statistics from our own hooks and
transformers' own `hidden_states`, logits from the unpruned model with hand-written forward hooks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import _llama_like, blocks_of, build_model, calib_batches, logits, make_batch, model_from_config, unpad
from replaceme_core.merge import save_checkpoint
from replaceme_core.methods._compensation import hadamard
from replaceme_core.methods.apply import run_method

NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")  # Llama's per-block norm parameters


def llama(layers=5, hidden=32, tie=False, eps=1e-6, seed=0):
    """A tiny seeded random Llama (float64, eval), perturbed like conftest.build_model."""
    heads = 4
    config = _llama_like(transformers.LlamaConfig, num_hidden_layers=layers, hidden_size=hidden,
                         num_attention_heads=heads, head_dim=hidden // heads, tie_word_embeddings=tie, rms_norm_eps=eps)
    return model_from_config(config, seed)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, num_layers):
    assert model.config.num_hidden_layers == num_layers == len(model.model.layers)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def one_line_error(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def rel(a, b):
    return float((a - b).norm() / b.norm())


def forward_records(model, batches, blocks):
    """Per batch: (mask, {i: input of block i}, {i: output of block i}) from our own hooks on a plain forward."""
    out = []
    layers = model.model.layers
    for batch in batches:
        ins, outs, handles = {}, {}, []
        for i in blocks:
            handles.append(layers[i].register_forward_pre_hook(
                lambda _m, args, kw, i=i: ins.__setitem__(i, (args[0] if args else kw["hidden_states"]).clone()),
                with_kwargs=True))
            handles.append(layers[i].register_forward_hook(
                lambda _m, _a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
        try:
            logits(model, batch)
        finally:
            for h in handles:
                h.remove()
        out.append((batch["attention_mask"].bool(), ins, outs))
    return out


def per_sequence_channel_means(mask, x):
    """[sequences, d]: mean over each sequence's real tokens of |x| (loops, not the library's einsum)."""
    return torch.stack([x[r][mask[r]].abs().mean(dim=0) for r in range(x.shape[0])])


# --- LaCo ----------------------------------------------------------------------------------------------------------

def expected_merge(params, base, window, variant):
    """θ* of block `base` merging blocks `window` from dicts name → tensor per block (norms stay base's)."""
    out = {}
    for name, theta in params[base].items():
        if name in NORMS:
            out[name] = theta
        elif variant == "laco":
            out[name] = theta + sum(params[k][name] - theta for k in window)
        else:
            out[name] = params[window[-1]][name]
    return out


def block_params(model):
    return [{n: p.detach().clone() for n, p in b.named_parameters()} for b in model.model.layers]


@pytest.mark.parametrize("variant", ["laco", "laco-code"])
def test_laco_single_merge_equals_formula(variant):
    model = llama(layers=5)
    orig = block_params(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    # H = 4, C = 3: the loop starts at l = 1 and merges blocks 2, 3 into 1; T = −1 accepts any merge
    res = run_method(model, calib_batches(), variant, 2, progress=False,
                     options={"merge_layers": 3, "threshold": -1.0, "highest_layer": 4})
    assert res.record["removed_blocks"] == [2, 3]
    assert res.record["method_record"]["merged_into"] == [1]
    got = block_params(model)
    assert len(got) == 3 and model.config.num_hidden_layers == 3
    want = [orig[0], expected_merge(orig, 1, [2, 3], variant), orig[4]]
    for j in range(3):
        assert set(got[j]) == set(want[j])
        for name in want[j]:
            assert torch.allclose(got[j][name], want[j][name], rtol=0, atol=1e-12), (j, name)
    if variant == "laco":  # Eq. 1 is not the code's result: the two variants really differ
        assert not torch.allclose(got[1]["mlp.down_proj.weight"], orig[3]["mlp.down_proj.weight"])
    assert torch.equal(model.model.embed_tokens.weight, embed)


@pytest.mark.parametrize("variant", ["laco", "laco-code"])
def test_laco_nested_merges_follow_the_loop(variant):
    model = llama(layers=7)
    orig = block_params(model)
    # H = 6, C = 3, I = 1: l = 3 merges 4, 5 into 3; then l = 2 merges the current 3 (= 3*) and 4 (= original 6)
    res = run_method(model, calib_batches(), variant, 4, progress=False,
                     options={"merge_layers": 3, "threshold": -1.0, "interval": 1})
    assert res.record["removed_blocks"] == [3, 4, 5, 6]
    ev = res.record["method_record"]["evaluations"]
    assert [(e["layer"], e["kept_block"], e["merged_blocks"]) for e in ev] == [(3, 3, [4, 5]), (2, 2, [3, 6])]
    theta3 = expected_merge(orig, 3, [4, 5], variant)
    tmp = orig[:3] + [theta3, orig[6]]
    theta2 = expected_merge(tmp, 2, [3, 4], variant)
    got = block_params(model)
    for j, want in enumerate([orig[0], orig[1], theta2]):
        for name in want:
            assert torch.allclose(got[j][name], want[name], rtol=0, atol=1e-12), (j, name)


def hf_similarity(original, candidate, batches):
    """LaCo's similarity from transformers' own hidden_states[-1] (post final norm), one unpadded sequence at a time."""
    sims = []
    for batch in batches:
        for seq in unpad(batch):
            with torch.no_grad():
                a = original(**seq, output_hidden_states=True).hidden_states[-1].flatten()
                b = candidate(**seq, output_hidden_states=True).hidden_states[-1].flatten()
            sims.append(float(a @ b / (a.norm() * b.norm())))
    return sum(sims) / len(sims)


def hand_candidate(model, base, window, variant):
    cand = copy.deepcopy(model)
    params = block_params(model)
    merged = expected_merge(params, base, window, variant)
    with torch.no_grad():
        for name, p in cand.model.layers[base].named_parameters():
            p.copy_(merged[name])
    keep = [i for i in range(len(cand.model.layers)) if i not in window]
    cand.model.layers = torch.nn.ModuleList([cand.model.layers[i] for i in keep])
    for i, layer in enumerate(cand.model.layers):
        layer.self_attn.layer_idx = i
    cand.config.num_hidden_layers = len(keep)
    return cand


def test_laco_similarity_and_threshold_decide():
    model = llama(layers=5)
    batches = calib_batches()
    s1 = hf_similarity(model, hand_candidate(model, 1, [2, 3], "laco-code"), batches)  # first candidate: 2, 3 → 1
    s2 = hf_similarity(model, hand_candidate(model, 0, [1, 2], "laco-code"), batches)  # next one if s1 fails: 1, 2 → 0
    opts = {"merge_layers": 3, "highest_layer": 4}
    m = copy.deepcopy(model)
    res = run_method(m, batches, "laco-code", 2, options={**opts, "threshold": s1 - 1e-9}, progress=False)
    ev = res.record["method_record"]["evaluations"]
    assert len(ev) == 1 and ev[0]["accepted"] and abs(ev[0]["similarity"] - s1) < 1e-9
    assert res.record["removed_blocks"] == [2, 3]
    m = copy.deepcopy(model)
    thr = s1 + 1e-9
    if s2 > thr:
        res = run_method(m, batches, "laco-code", 2, options={**opts, "threshold": thr}, progress=False)
        ev = res.record["method_record"]["evaluations"]
        assert [e["accepted"] for e in ev] == [False, True] and abs(ev[1]["similarity"] - s2) < 1e-9
        assert res.record["removed_blocks"] == [1, 2]
    else:
        with pytest.raises(ValueError):
            run_method(m, batches, "laco-code", 2, options={**opts, "threshold": thr}, progress=False)


@pytest.mark.parametrize("variant", ["laco", "laco-code"])
def test_laco_threshold_that_removes_nothing_is_one_line_and_writes_nothing(variant):
    model = llama(layers=5)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        run_method(model, calib_batches(), variant, 2, options={"threshold": 1.0}, progress=False)
    assert "removed no block" in one_line_error(e)
    assert_unchanged(model, before, 5)


def test_laco_threshold_short_of_num_blocks():
    model = llama(layers=5)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:  # C = 2, H = 4, L_low = 3: one candidate only (block 3 into 2)
        run_method(model, calib_batches(), "laco", 2, progress=False,
                   options={"threshold": -1.0, "merge_layers": 2, "lowest_layer": 2})
    assert "only 1 of the 2 blocks" in one_line_error(e)
    assert_unchanged(model, before, 5)


def test_laco_default_hyperparameters_scale_with_depth():
    from replaceme_core.methods.laco import resolve

    from replaceme_core.methods import get_method

    opts = get_method("laco").defaults
    hp = resolve(opts, 30)  # SmolLM2's depth
    assert (hp["merge_layers"], hp["highest_layer"], hp["threshold"], hp["interval"], hp["lowest_layer"]) == (5, 29, 0.45, 1, 0)
    assert resolve(opts, 40)["merge_layers"] == 7 and resolve(opts, 40)["highest_layer"] == 39  # the notebook's values


# --- LinearPatch -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 4, 12, 20, 24, 28, 32, 36, 48, 60, 108, 576])
def test_hadamard_is_a_normalised_hadamard_matrix(d):
    H, construction = hadamard(d)
    assert H.shape == (d, d) and construction.startswith("hadamard")
    assert torch.allclose(H @ H.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full((d, d), 1 / math.sqrt(d), dtype=torch.float64), atol=1e-15)


def test_hadamard_power_of_two_is_sylvester_and_other_sizes_fall_back_to_blocks():
    d = 32
    bits = torch.tensor([[bin(i & j).count("1") % 2 for j in range(d)] for i in range(d)], dtype=torch.float64)
    assert torch.equal(hadamard(d)[0], (1 - 2 * bits) / math.sqrt(d))
    for d in (6, 52):  # no Hadamard construction here: orthogonal block-diagonal, and said so
        H, construction = hadamard(d)
        assert construction.startswith("block-diagonal")
        assert torch.allclose(H.T @ H, torch.eye(d, dtype=torch.float64), atol=1e-12)


def hand_linearpatch(model, batches, n, rotated):
    """(start, P) computed by hand: LinearPatch's window and patch from our own hooks."""
    L = len(model.model.layers)
    d = model.config.hidden_size
    recs = forward_records(model, batches, range(L))
    sims = {}
    for s in range(1, L - n):  # windows s … s+n−1 with s ≥ 1 and s+n ≤ L−1
        cos = [torch.nn.functional.cosine_similarity(outs[s - 1][mask], outs[s + n - 1][mask], dim=-1)
               for mask, _, outs in recs]
        sims[s] = float(torch.cat(cos).mean())
    start = max(sims, key=lambda s: (sims[s], -s))
    if rotated:
        H = hadamard(d)[0]
        if d == 32:  # independent of the library: Sylvester from the bit formula
            bits = torch.tensor([[bin(i & j).count("1") % 2 for j in range(d)] for i in range(d)], dtype=torch.float64)
            H = (1 - 2 * bits) / math.sqrt(d)
    else:
        H = torch.eye(d, dtype=torch.float64)
    ratios = [per_sequence_channel_means(mask, outs[start + n - 1] @ H) / per_sequence_channel_means(mask, outs[start - 1] @ H)
              for mask, _, outs in recs]
    delta = torch.cat(ratios).mean(dim=0)
    return start, H @ torch.diag(delta) @ H.T


def patched_reference_logits(model, batch, start, n, P):
    """The unpruned model with blocks start … start+n−1 skipped (output := input) and h ↦ h·P on block start−1."""
    ref = copy.deepcopy(model)
    layers = ref.model.layers
    handles = [layers[start - 1].register_forward_hook(lambda _m, _a, o: (o[0] @ P,) + tuple(o[1:]) if isinstance(o, tuple) else o @ P)]
    for b in range(start, start + n):
        handles.append(layers[b].register_forward_hook(
            lambda _m, args, kw, o: (args[0] if args else kw["hidden_states"]) if not isinstance(o, tuple)
            else ((args[0] if args else kw["hidden_states"]),) + tuple(o[1:]), with_kwargs=True))
    try:
        return logits(ref, batch)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method,rotated", [("linearpatch", True), ("linearpatch-diag", False)])
@pytest.mark.parametrize("hidden", [32, 24])
def test_linearpatch_matrix_and_logits(method, rotated, hidden):
    model = llama(layers=6, hidden=hidden)
    batches = calib_batches()
    start, P = hand_linearpatch(model, batches, 2, rotated)
    original = copy.deepcopy(model)
    res = run_method(model, batches, method, 2, progress=False)
    assert res.record["removed_blocks"] == [start, start + 1]
    assert res.record["standard_checkpoint"] is False
    (rep,) = res.replacements
    assert rep.run.start == start and rep.run.kept == start - 1
    assert torch.allclose(rep.T, P, rtol=0, atol=1e-10)
    if rotated:
        assert torch.allclose(P, P.T, atol=1e-12) and not torch.allclose(P, torch.diag(torch.diagonal(P)))
    assert len(model.model.layers) == 4
    test_batch = make_batch([9, 5, 7], padding="left", seed=11)
    assert rel(logits(model, test_batch), patched_reference_logits(original, test_batch, start, 2, P)) < 1e-10


def test_linearpatch_given_start_and_no_stock_checkpoint(tmp_path):
    model = llama(layers=6)
    res = run_method(model, calib_batches(), "linearpatch", 2, options={"start": 3}, progress=False)
    assert res.record["removed_blocks"] == [3, 4]
    with pytest.raises(ValueError):
        save_checkpoint(model, None, tmp_path / "out", res.record)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_blocks,options,fragment", [
    (4, {}, "at most 3 blocks"),  # 5 blocks: block 0 and the last stay
    (2, {"start": 3}, "must be in 1..2"),  # window 3, 4 would remove the last block
])
def test_linearpatch_bad_input_is_one_line(num_blocks, options, fragment):
    model = llama(layers=5)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        run_method(model, calib_batches(), "linearpatch", num_blocks, options=options, progress=False)
    assert fragment in one_line_error(e)
    assert_unchanged(model, before, 5)


# --- Prune&Comp ------------------------------------------------------------------------------------------------------

class HandPruned:
    """The unpruned model where each removed block c is replaced by h ↦ α_c·h: the stream at the cut scaled by hand."""

    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.alphas: dict[int, float] = {}
        self.handles = []

    def remove(self, c, alpha):
        self.alphas[c] = alpha

        def hook(_m, args, kw, o):
            x = (args[0] if args else kw["hidden_states"]) * alpha
            return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

        self.handles.append(self.model.model.layers[c].register_forward_hook(hook, with_kwargs=True))

    def round(self, batches):
        """Prune&Comp's next cut on this model, by hand: (block, α)."""
        alive = [i for i in range(len(self.model.model.layers)) if i not in self.alphas]
        recs = forward_records(self.model, batches, alive)
        bi = {}
        for i in alive:
            cos = torch.cat([torch.nn.functional.cosine_similarity(ins[i][mask], outs[i][mask], dim=-1)
                             for mask, ins, outs in recs])
            bi[i] = float((1 - cos).mean())
        c = min(bi, key=lambda i: (bi[i], i))
        ratios = torch.cat([per_sequence_channel_means(mask, outs[c]) / per_sequence_channel_means(mask, ins[c])
                            for mask, ins, outs in recs])
        return c, float(ratios.mean(dim=0).mean())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_prune_comp_equals_hand_scaled_residual_stream(tie, n, tmp_path):
    # ε ≈ 0 so that RMSNorm is scale-invariant: the fused model must equal the hooked one up to rounding, which is
    # float32's (LlamaRMSNorm normalises in float32 even in a float64 model): 1e-6, where a missed writer costs O(1)
    model = llama(layers=6, tie=tie, eps=1e-12, seed=3)
    batches = calib_batches(seed=5)
    hand = HandPruned(model)
    for _ in range(n):
        hand.remove(*hand.round(batches))
    norm_before = model.model.norm.weight.detach().clone()
    embed_before = model.model.embed_tokens.weight.detach().clone()
    res = run_method(model, batches, "prune-comp", n, progress=False)
    rounds = res.record["method_record"]["rounds"]
    assert [r["removed_block"] for r in rounds] == list(hand.alphas)
    for r, alpha in zip(rounds, hand.alphas.values()):
        assert abs(r["alpha"] - alpha) < 1e-6 * abs(alpha)  # round 2 runs on the float32-normed, fused model
    assert res.record["removed_blocks"] == sorted(hand.alphas)
    test_batch = make_batch([9, 5, 7], padding="right", seed=11)
    want = logits(hand.model, test_batch)
    assert rel(logits(model, test_batch), want) < 1e-6
    E = res.record["method_record"]["embed_factor"]
    assert abs(E - math.prod(hand.alphas.values())) < 1e-6 * E
    assert abs(E - 1) > 1e-3  # the compensation is not a no-op on this model
    assert torch.allclose(model.model.embed_tokens.weight, embed_before * E, rtol=1e-12, atol=0)
    if tie:  # the head shares the scaled embeddings; the final norm takes 1/E so logits are unchanged
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.allclose(model.model.norm.weight, norm_before / E, rtol=1e-12, atol=0)
    else:
        assert torch.equal(model.model.norm.weight, norm_before)
    out = save_checkpoint(model, None, tmp_path / "pc", res.record)  # a stock checkpoint: reloads to the same logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float64).eval()
    assert reloaded.config.num_hidden_layers == 6 - n
    assert rel(logits(reloaded, test_batch), want) < 1e-6


def test_prune_comp_default_eps_is_close():
    """With the usual ε the fusion is exact only up to the norm's ε: still close on a tiny model."""
    model = llama(layers=5, tie=True, seed=1)
    batches = calib_batches()
    hand = HandPruned(model)
    hand.remove(*hand.round(batches))
    run_method(model, batches, "prune-comp", 1, progress=False)
    test_batch = make_batch([8, 6], seed=2)
    assert rel(logits(model, test_batch), logits(hand.model, test_batch)) < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_prune_comp_refuses_families_it_cannot_fold_into(family):
    model = build_model(family)
    blocks = blocks_of(model, family)
    before = snapshot(model)
    n_before = len(blocks)
    with pytest.raises(ValueError) as e:
        run_method(model, calib_batches(), "prune-comp", 1, progress=False)
    assert "cannot fold into" in one_line_error(e)
    after = model.state_dict()
    assert len(blocks_of(model, family)) == n_before
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", ["prune-comp", "laco", "linearpatch"])
def test_too_many_blocks_is_one_line(method):
    model = llama(layers=5)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        run_method(model, calib_batches(), method, 5, progress=False)
    one_line_error(e)
    assert_unchanged(model, before, 5)
