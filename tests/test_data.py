"""Calibration data: sources, sampling, chat rendering, batching. No network: hub paths are monkeypatched."""
from __future__ import annotations

import json

import pytest
import torch

from replaceme_core import assets
from replaceme_core.io import data


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tokenizer_path("smollm2-135m-instruct"))


@pytest.fixture()
def plain_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_packaged_sampling_deterministic(tok):
    a = data.load_texts("wiki", tok, 20, seed=0)
    assert a == data.load_texts("wiki", tok, 20, seed=0)
    b = data.load_texts("wiki", tok, 20, seed=1)
    assert a != b and len(a) == len(b) == 20
    assert data.load_texts("wiki", tok, 5, seed=0) == a[:5]  # prefix-stable in N
    train = {r["text"] for r in assets.corpus("wiki", "train")}
    assert set(a) <= train
    held = data.heldout_texts("wiki", 30, seed=0)
    assert len(held) == 30 and not (set(held) & train)


def test_instruction_corpus_uses_chat_template(tok):
    texts = data.load_texts("olmo-instructions", tok, 4, seed=3)
    recs = {r["prompt"]: r["response"] for r in assets.corpus("olmo-instructions", "train")}
    for t in texts:
        assert t.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in t
    # what the template makes for [user, assistant], without the default system turn it inserts on its own
    prompt = next(p for p in recs if p in texts[0])
    want = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": recs[prompt]}], tokenize=False)
    default_turn = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert want.startswith(default_turn) and texts[0] == want[len(default_turn):]
    kept = data.load_texts("olmo-instructions", tok, 4, seed=3, chat="keep-system")
    assert kept[0] == want


# Jinja templates in the styles of real ones: ChatML with an inserted default (SmolLM2, Qwen2.5), a BOS plus a
# header-style inserted system turn (Llama-3.1), and one that inserts nothing (Llama-3).
CHATML_DEFAULT = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault helper.<|im_end|>\n{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
HEADER_DEFAULT = ("<|begin_of_text|>{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>"
                  "\n\nCutting Knowledge Date: 2023<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>"
                  "{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
HEADER_PLAIN = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}")


@pytest.mark.parametrize("template, expected", [
    (CHATML_DEFAULT, "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"),
    (HEADER_DEFAULT, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"),
    (HEADER_PLAIN, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"),
])
def test_inserted_default_system_turn_is_dropped(tok, template, expected):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    assert data.render_pair("Q?", "A.", t) == expected
    kept = data.render_pair("Q?", "A.", t, chat="keep-system")
    assert kept == t.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                                         tokenize=False)
    # an explicit system message is the user's: never removed
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert data.render_messages(with_system, t) == t.apply_chat_template(with_system, tokenize=False)


def test_plain_fallback_and_chat_never(tok, plain_tok):
    with pytest.warns(UserWarning, match="no chat template"):
        data._warned.discard("no-template")
        t = data.load_texts("olmo-instructions", plain_tok, 2, seed=3)
    assert t[0].startswith("### Instruction:\n") and "\n\n### Response:\n" in t[0]
    assert data.load_texts("olmo-instructions", tok, 2, seed=3, chat="never") == t
    with pytest.raises(data.DataSourceError, match="no chat template"):
        data.load_texts("olmo-instructions", plain_tok, 2, chat="always")


def test_mix_is_half_half(tok):
    t = data.load_texts("wiki+olmo-instructions", tok, 7, seed=0)
    n_instr = sum("<|im_start|>user" in x for x in t)
    assert len(t) == 7 and n_instr == 3
    assert t[3:] == data.load_texts("wiki", tok, 4, seed=0)


def test_local_files(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("first para\nstill first\n\nsecond\n\n\nthird\n")
    assert data.load_texts(str(p), tok, 3) == ["first para\nstill first", "second", "third"]
    q = tmp_path / "lines.txt"
    q.write_text("a line\nanother line\nthird line\n")
    assert data.load_texts(str(q), tok, 2) == ["a line", "another line"]
    j = tmp_path / "c.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in [
        {"text": "plain text"},
        {"prompt": "What is 2+2?", "response": "4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]) + "\n")
    out = data.load_texts(str(j), tok, 3)
    assert out[0] == "plain text"
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in out[1] and "<|im_start|>assistant\n4<|im_end|>" in out[1]
    assert "<|im_start|>assistant\nHello" in out[2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(data.DataSourceError, match="none of the fields"):
        data.load_texts(str(bad), tok, 1)


def test_bad_inputs_raise_clear_errors(tmp_path, tok):
    with pytest.raises(data.DataSourceError, match="not found"):
        data.load_texts(str(tmp_path / "missing.txt"), tok, 1)
    with pytest.raises(data.DataSourceError, match="unknown calibration source 'no-such-source'"):
        data.load_texts("no-such-source", tok, 1)
    for n in (0, -3):
        with pytest.raises(data.DataSourceError, match="empty calibration"):
            data.load_texts("wiki", tok, n)
    with pytest.raises(data.DataSourceError, match="has only .* but 100000 were requested"):
        data.load_texts("wiki", tok, 100000)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(data.DataSourceError, match="empty calibration"):
        data.load_texts(str(empty), tok, 1)
    with pytest.raises(data.DataSourceError, match="split"):
        data.load_texts("wiki", tok, 1, split="test")


ORCA_ROWS = [
    {"conversations": [{"from": "system", "value": "You are an AI assistant."},
                       {"from": "human", "value": "Translate 'chat' to English."},
                       {"from": "gpt", "value": "Cat."}]},
    {"conversations": [{"from": "human", "value": "Is the sky blue?"}, {"from": "gpt", "value": "Yes."},
                       {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Rayleigh scattering."}]},
    {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Third?"},
                       {"from": "gpt", "value": "Third."}]},
]


def test_hub_slimorca_formatting(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split))
        return iter(ORCA_ROWS if "Orca" in path else [{"text": f"web page {i}"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    t = data.load_texts("Open-Orca/SlimOrca", tok, 2, seed=123)
    assert calls[0] == ("Open-Orca/SlimOrca", None, "train")
    assert t[0] == "<|im_start|>user\nTranslate 'chat' to English.<|im_end|>\n<|im_start|>assistant\nCat.<|im_end|>\n"
    assert "You are an AI assistant." not in t[0]  # dataset system prompt dropped (and the template's default)
    assert "Is the sky blue?" in t[1] and "Yes." in t[1] and "Rayleigh" not in t[1]  # first pair only
    assert t == data.load_texts("slimorca", tok, 2, seed=999)  # first N, no shuffling
    mix = data.load_texts("fineweb_and_orca", tok, 4)
    assert "Translate" in mix[0] and mix[2:] == ["web page 0", "web page 1"]
    assert ("HuggingFaceFW/fineweb", "sample-10BT", "train") in calls


def test_hub_unreachable_is_one_line(monkeypatch, tok):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'Open-Orca/SlimOrca' on the Hub (LocalEntryNotFoundError)\nlong trace")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(data.DataSourceError) as e:
        data.load_texts("Open-Orca/SlimOrca", tok, 4)
    msg = str(e.value)
    assert "hub is unreachable" in msg and "'wiki'" in msg and "olmo-instructions" in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__
    # the fast probe fails before datasets is even called
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(data.DataSourceError, match="unreachable from this machine"):
        data.load_texts("allenai/c4", tok, 4)


def test_token_batches_padding_and_mask(tok):
    texts = ["short", "", "a much longer text that has quite a few more tokens in it", "mid length text"]
    for side in ("right", "left"):
        tok.padding_side = side
        batches = list(data.token_batches(texts, tok, batch_size=2, max_length=8))
        assert [b["input_ids"].shape[0] for b in batches] == [2, 1]  # empty text dropped
        b = batches[0]
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape == (2, 8)  # longest truncated to max_length
        n_short = len(tok("short")["input_ids"])
        mask = b["attention_mask"][0]
        assert int(mask.sum()) == n_short and int(b["attention_mask"][1].sum()) == 8
        pad_pos = (mask == 0).nonzero().flatten()
        assert all(b["input_ids"][0, pad_pos] == tok.pad_token_id)
        if side == "right":
            assert mask[:n_short].all() and not mask[n_short:].any()
        else:
            assert mask[-n_short:].all() and not mask[:-n_short].any()
        assert batches[1]["input_ids"].shape == (1, len(tok("mid length text")["input_ids"]))
    tok.padding_side = "right"
    assert data.count_tokens(texts, tok) == sum(len(tok(t)["input_ids"]) for t in texts if t)
    assert data.count_tokens(texts, tok, max_length=8) == n_short + 8 + len(tok("mid length text")["input_ids"])


def test_pad_token_set_when_missing(tok):
    import copy

    t = copy.deepcopy(tok)
    t.pad_token = None
    b = next(data.token_batches(["one", "two three four"], t, 2, 16))
    assert t.pad_token == t.eos_token and b["input_ids"][0, -1] == t.eos_token_id
