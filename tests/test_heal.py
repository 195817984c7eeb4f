"""Healing (experiments/healing.py) on a tiny random Llama: LT-only trains only T₂ and folds it exactly; LoRA merges exactly;
the loss is the causal-LM cross entropy and goes down; packing, caching and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

from replaceme_core.arch import get_adapter
from replaceme_core.experiments.healing import (HealConfig, blocks_receiving_T, heal, heal_cached, mlp_linear_names, merge_lora,
                                                packed_batches)
from replaceme_core.io.data import load_texts
from replaceme_core.io.models import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_random_model(seed=0)
    texts = load_texts("wiki", tok, 24, seed=3, split="train")
    return model, tok, texts


def pruned_copy(model, seed=1):
    """A 'pruned' tiny model: a random T folded into block 2, blocks 3 and 4 deleted (T₂ goes into block 2)."""
    m = copy.deepcopy(model)
    ad = get_adapter(m)
    g = torch.Generator().manual_seed(seed)
    d = ad.hidden_size
    ad.fold(2, torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64))
    ad.delete_blocks([3, 4])
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_packed_batches_are_the_token_stream_with_eos(tiny):
    _, tok, texts = tiny
    batches, passes = packed_batches(texts[:6], tok, seq_len=16, batch_size=2, steps=3, seed=0)
    assert len(batches) == 3 and all(b.shape == (2, 16) and b.dtype == torch.long for b in batches)
    stream = []
    for t in texts[:6]:
        stream += tok(t)["input_ids"] + [tok.eos_token_id]
    chunks = {tuple(stream[i:i + 16]) for i in range(0, len(stream) - 15, 16)}
    assert all(tuple(row.tolist()) in chunks for b in batches for row in b)
    assert passes == pytest.approx(6 / (len(stream) // 16))
    again, _ = packed_batches(texts[:6], tok, seq_len=16, batch_size=2, steps=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    # more chunks than the texts give: reused, and the passes say so
    _, passes = packed_batches(texts[:2], tok, seq_len=16, batch_size=2, steps=40, seed=0)
    assert passes > 1
    with pytest.raises(ValueError, match="fewer than one batch"):
        packed_batches(["a b"], tok, seq_len=64, batch_size=4, steps=1)


def test_lt_only_trains_only_T_and_folds_exactly(tiny):
    model, tok, texts = tiny
    base = pruned_copy(model)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    healed = copy.deepcopy(base)
    cfg = HealConfig(mode="lt", steps=12, batch_size=2, seq_len=32, lr=1e-2, seed=0)
    res = heal(healed, tok, texts, cfg, blocks=[2], progress=False)
    assert res.model is healed and res.trainable_params == 64 * 64
    (block, T2), = res.transforms
    assert block == 2 and not torch.allclose(T2, torch.eye(64, dtype=T2.dtype))
    target = "model.layers.2.mlp.down_proj.weight"
    for n, p in healed.named_parameters():
        if n == target:
            # the fold, computed by hand: (x Wᵀ) T₂ = x (T₂ᵀ W)ᵀ
            expect = (T2.T @ before[n].to(torch.float64)).to(p.dtype)
            torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(p.detach(), before[n]), f"{n} changed although only T₂ is trained"
        assert p.requires_grad  # restored
    # the folded checkpoint computes what the hooked model computed: M ↦ M·T₂ on block 2's MLP output
    hooked = copy.deepcopy(base)
    h = hooked.model.layers[2].mlp.register_forward_hook(lambda mod, a, out: (out.double() @ T2).float())
    ids = packed_batches(texts, tok, seq_len=24, batch_size=2, steps=1, seed=9)[0][0]
    torch.testing.assert_close(logits(healed, ids), logits(hooked, ids), rtol=1e-4, atol=1e-4)
    h.remove()
    assert not torch.allclose(logits(healed, ids), logits(base, ids), atol=1e-3)


def test_loss_is_causal_lm_cross_entropy_and_decreases(tiny):
    model, tok, texts = tiny
    base = pruned_copy(model)
    texts = texts[:2]  # a few chunks seen several times: T₂ alone can lower the loss of a random model on them
    cfg = HealConfig(mode="lt", steps=25, batch_size=2, seq_len=32, lr=5e-2, seed=0)
    first = packed_batches(texts, tok, cfg.seq_len, cfg.batch_size, cfg.steps, cfg.seed)[0][0]
    lg = logits(base, first)
    manual = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), first[:, 1:].reshape(-1)).item()
    res = heal(copy.deepcopy(base), tok, texts, cfg, blocks=[2], progress=False)
    assert res.losses[0] == pytest.approx(manual, rel=1e-5)  # T₂ = I at step 0
    assert len(res.losses) == 25 and res.tokens == 25 * 2 * 32
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5 - 0.05


def test_full_healing_trains_everything(tiny):
    model, tok, texts = tiny
    base = pruned_copy(model)
    healed = copy.deepcopy(base)
    res = heal(healed, tok, texts, HealConfig(mode="full", steps=6, batch_size=2, seq_len=32, lr=1e-3), progress=False)
    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    assert res.trainable_params == n_params
    changed = [n for (n, p), q in zip(healed.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert res.losses[-1] < res.losses[0]


def test_lora_on_mlps_merges_to_the_same_logits(tiny):
    model, tok, texts = tiny
    base = pruned_copy(model)
    ids = packed_batches(texts, tok, seq_len=24, batch_size=2, steps=1, seed=9)[0][0]
    base_logits = logits(base, ids)
    cfg = HealConfig(mode="lora", steps=8, batch_size=2, seq_len=32, lr=1e-2, lora_r=4, lora_alpha=8)
    res = heal(copy.deepcopy(base), tok, texts, cfg, merge=False, progress=False)
    peft_model = res.model
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert adapted and all(".mlp." in n for n in adapted)
    assert len(adapted) == 3 * get_adapter(base).num_layers  # gate, up, down of every kept block
    assert res.trainable_params == sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                                       if n in set(mlp_linear_names(base)))
    unmerged = logits(peft_model, ids)
    merged_model = merge_lora(peft_model)
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(logits(merged_model, ids), unmerged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)


def test_heal_cached_pays_once(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path))
    model, tok, texts = tiny
    base = pruned_copy(model)
    cfg = {"mode": "lt", "steps": 4, "batch_size": 2, "seq_len": 32, "lr": 1e-2}
    first = heal_cached(copy.deepcopy(base), tok, texts, cfg, blocks=[2], progress=False)
    assert not first.cached and first.cost["energy_kwh"] >= 0 and "cpu:" in first.cost["energy_mode"]
    assert list((tmp_path / "heal").glob("heal-lt-*.pt"))
    moved = copy.deepcopy(tok)
    moved.name_or_path = "/somewhere/else/tokenizer"  # the key is by content: another cache location still hits
    second = heal_cached(copy.deepcopy(base), moved, texts, cfg, blocks=[2], progress=False)
    assert second.cached and second.cost == first.cost and second.losses == first.losses
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    lora = {"mode": "lora", "steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "lora_r": 2}
    a = heal_cached(copy.deepcopy(base), tok, texts, lora, progress=False)
    b = heal_cached(copy.deepcopy(base), tok, texts, lora, progress=False)
    assert b.cached
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


def test_blocks_receiving_T_maps_to_pruned_indices():
    assert blocks_receiving_T({"removed_blocks": [3, 4, 5], "blocks_receiving_T": [2]}) == [2]
    assert blocks_receiving_T({"removed_blocks": [2, 3, 7, 8], "blocks_receiving_T": [1, 6]}) == [1, 4]
    assert blocks_receiving_T({"removed_blocks": [2, 3], "blocks_receiving_T": []}) == []


def test_bad_input(tiny):
    model, tok, texts = tiny
    with pytest.raises(ValueError, match="unknown healing mode"):
        heal(model, tok, texts, {"mode": "adapter"})
    with pytest.raises(ValueError, match="unknown healing options"):
        heal(model, tok, texts, {"mode": "lt", "learning_rate": 1})
    with pytest.raises(ValueError, match="needs `blocks`"):
        heal(model, tok, texts, HealConfig(mode="lt"))
    with pytest.raises(ValueError, match="not in this"):
        heal(model, tok, texts, HealConfig(mode="lt"), blocks=[99])
    with pytest.raises(ValueError, match="steps"):
        heal(model, tok, texts, HealConfig(mode="full", steps=0))


def test_gradient_checkpointing_gives_the_same_training(tiny):
    # Table 15 trains with gradient checkpointing: recomputing activations must not change the updates
    model, tok, texts = tiny
    base = pruned_copy(model)
    runs = []
    for ckpt in (False, True):
        cfg = HealConfig(mode="lt", steps=4, batch_size=2, seq_len=32, lr=1e-2, gradient_checkpointing=ckpt)
        runs.append(heal(copy.deepcopy(base), tok, texts, cfg, blocks=[2], progress=False))
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    torch.testing.assert_close(runs[0].transforms[0][1], runs[1].transforms[0][1], rtol=1e-5, atol=1e-6)
    assert not runs[1].model.is_gradient_checkpointing
