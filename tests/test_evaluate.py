"""replaceme_core.evaluation: local lm-eval tasks, Avg-acc, per-document scores, perplexity, result cache, CLI.

Everything runs on CPU without network: a tiny random Llama, a tokenizer trained here, and
hand-written JSONL files in the column layout of the real benchmark data (HF column names).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import replaceme_core
from replaceme_core import evaluation as ev
from replaceme_core.evaluation import plan as request_plan
from replaceme_core.evaluation import runner
from replaceme_core.io.cache import cache_dir

# --------------------------------------------------------------------------------------------
# fixtures: data, tokenizer, model, fake assets
# --------------------------------------------------------------------------------------------
ARC = [("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
       ("What melts ice?", ["heat", "cold", "dark", "sound"], "A"),
       ("What is the boiling point of water at sea level?", ["50 C", "75 C", "100 C", "150 C"], "C"),
       ("Which is a mammal?", ["shark", "trout", "eel", "whale"], "D")]
LAMBADA = ["the cat sat on the mat and then it went to sleep on the mat",
           "she opened the door and saw her old friend standing in the rain",
           "he counted one two three four five"]


def _w(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_benchmarks(root: Path) -> dict[str, dict[str, Path]]:
    arc = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"]}, "answerKey": k}
           for i, (q, c, k) in enumerate(ARC)]
    boolq = [{"question": q, "answer": a, "passage": p, "label": int(a)} for q, a, p in [
        ("is the sky blue", True, "The sky appears blue because of scattering."),
        ("is fire cold", False, "Fire is hot and gives off light."),
        ("do fish live in water", True, "Most fish live in water and breathe with gills.")]]
    hellaswag = [{"ind": i, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour in a bowl.", "ctx_b": "she",
                  "ctx": "A woman mixes flour in a bowl. she",
                  "endings": ["puts the dough in the oven.", "flies away [title] now.", "reads a book.", "sings loudly."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(3)]
    piqa = [{"goal": g, "sol1": a, "sol2": b, "label": lab} for g, a, b, lab in [
        ("To open a jar,", "twist the lid.", "hit it with a fish.", 0),
        ("To dry wet hands,", "put them in water.", "use a towel.", 1),
        ("To cool soup,", "let it sit.", "heat it more.", 0)]]
    wino = [{"sentence": f"The trophy {i} did not fit in the suitcase because _ was too big.", "option1": "the trophy",
             "option2": "the suitcase", "answer": "1" if i % 2 == 0 else "2"} for i in range(8)]
    obqa = [{"id": f"o{i}", "question_stem": q, "choices": {"text": c, "label": ["A", "B", "C", "D"]}, "answerKey": k}
            for i, (q, c, k) in enumerate([("The sun is a", ["star", "planet", "moon", "rock"], "A"),
                                           ("Water freezes at", ["100 C", "0 C", "50 C", "20 C"], "B"),
                                           ("Plants need", ["darkness", "plastic", "sunlight", "metal"], "C")])]
    sciq = [{"question": q, "distractor3": "iron", "distractor1": "gold", "distractor2": "lead", "correct_answer": a,
             "support": s} for q, a, s in [("What do lungs take in?", "oxygen", " Lungs take in oxygen from air."),
                                           ("What is H2O?", "water", "Water is H2O."),
                                           ("What gives plants energy?", "sunlight", "")]]

    def mmlu(subj):
        return [{"question": f"{subj} question {i}?", "subject": subj, "choices": ["one", "two", "three", "four"],
                 "answer": i % 4} for i in range(4)]

    files = {
        "arc_easy": {"validation": _w(root / "arc_easy_validation.jsonl", arc)},
        "arc_challenge": {"validation": _w(root / "arc_challenge_validation.jsonl", arc[:3])},
        "boolq": {"validation": _w(root / "boolq_validation.jsonl", boolq)},
        "hellaswag": {"validation": _w(root / "hellaswag_validation.jsonl", hellaswag)},
        "piqa": {"validation": _w(root / "piqa_validation.jsonl", piqa)},
        "winogrande": {"validation": _w(root / "winogrande_validation.jsonl", wino)},
        "openbookqa": {"validation": _w(root / "openbookqa_validation.jsonl", obqa)},
        "sciq": {"validation": _w(root / "sciq_validation.jsonl", sciq)},
        "lambada_openai": {"test": _w(root / "lambada_openai_test.jsonl", [{"text": t} for t in LAMBADA])},
    }
    for subj in ("abstract_algebra", "anatomy"):
        files[f"mmlu_{subj}"] = {s: _w(root / f"mmlu_{subj}_{s}.jsonl", mmlu(subj)) for s in ("test", "dev")}
    return files


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["The quick brown fox jumps over the lazy dog. Question: Answer: yes no A B C D"] + LAMBADA,
                           trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture()
def model(tok):
    return make_model(tok)


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, bench):
    """Fresh result cache per test; assets.benchmark_files -> the fixtures; hub treated as unreachable."""
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))
    try:
        import replaceme_core.assets as assets
    except ImportError:  # the assets module is optional for these tests
        assets = types.ModuleType("replaceme_core.assets")
        monkeypatch.setitem(sys.modules, "replaceme_core.assets", assets)
        monkeypatch.setattr(replaceme_core, "assets", assets, raising=False)
    monkeypatch.setattr(assets, "benchmark_files", lambda *a, **k: bench, raising=False)
    monkeypatch.setattr(assets, "resolve_model", lambda name: str(name), raising=False)
    monkeypatch.setattr(request_plan, "hub_reachable", lambda *a, **k: False)


# tasks with packaged data in these fixtures (BIG-bench tasks: tests/test_bigbench_tasks.py; leaderboard: hub only)
LOCAL = [t for t, s in ev.TASKS.items() if s.yaml is not None and not t.startswith("bigbench_")]


# --------------------------------------------------------------------------------------------
# the paper's definitions
# --------------------------------------------------------------------------------------------
def test_metric_mapping_and_fewshot_follow_the_paper():
    assert {t: ev.TASKS[t].metric for t in ev.PAPER_TASKS} == {
        "race": "acc", "winogrande": "acc", "piqa": "acc_norm", "boolq": "acc", "openbookqa": "acc_norm",
        "sciq": "acc_norm", "lambada_openai": "acc"}
    assert {t: ev.TASKS[t].metric for t in ("arc_easy", "arc_challenge", "hellaswag", "mmlu")} == {
        "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc"}
    assert ev.AVG_ACC_TASKS == ("race", "winogrande", "piqa", "boolq", "openbookqa", "sciq")
    classic = [t for t in ev.TASKS if not t.startswith("leaderboard_")]
    assert {t: ev.resolve_fewshot(t, None) for t in classic} == {t: (5 if t == "winogrande" else 0) for t in classic}
    # Open LLM Leaderboard v2 (paper Fig. 9): the leaderboard's own few-shot counts
    assert {t: ev.resolve_fewshot(t, None) for t in ev.TASKS if t.startswith("leaderboard_")} == {
        "leaderboard_bbh": 3, "leaderboard_gpqa": 0, "leaderboard_math_hard": 4, "leaderboard_musr": 0, "leaderboard_mmlu_pro": 5}
    assert ev.resolve_fewshot("piqa", 3) == 3 and ev.resolve_fewshot("winogrande", 0) == 0
    assert ev.resolve_fewshot("winogrande", {"piqa": 2}) == 5 and ev.resolve_fewshot("piqa", {"piqa": 2}) == 2
    assert ev.parse_tasks("arc_e, lambada,piqa,piqa") == ["arc_easy", "lambada_openai", "piqa"]
    with pytest.raises(ValueError):
        ev.parse_tasks("nonsense")
    # Avg-acc: mean over the six accuracy tasks that are present; other tasks never enter it
    vals = {"race": 0.4, "winogrande": 0.6, "piqa": 0.7, "boolq": 0.8, "openbookqa": 0.3, "sciq": 0.9,
            "lambada_openai": 0.05, "arc_easy": 0.0}
    avg, used = ev.avg_acc(vals)
    assert used == list(ev.AVG_ACC_TASKS) and avg == pytest.approx(3.7 / 6)
    avg, used = ev.avg_acc({k: v for k, v in vals.items() if k != "race"})
    assert used == ["winogrande", "piqa", "boolq", "openbookqa", "sciq"] and avg == pytest.approx(3.3 / 5)
    assert ev.avg_acc({"arc_easy": 0.5}) == (None, [])
    # MTSAIR Llama3.1-6B-ReplaceMe card (paper.md §3.18), baseline row: Avg-acc 0.712 from the six tasks,
    # lambada accuracy (0.732) listed but not averaged
    row = {"race": 0.450, "winogrande": 0.779, "piqa": 0.810, "boolq": 0.842, "openbookqa": 0.430, "sciq": 0.961,
           "lambada_openai": 0.732}
    assert round(ev.avg_acc(row)[0], 3) == 0.712


# --------------------------------------------------------------------------------------------
# local tasks = lm-eval's tasks on local data
# --------------------------------------------------------------------------------------------
UPSTREAM = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
            "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
            "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
            "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
            "lambada_openai": "lambada/lambada_openai.yaml",
            "mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml"}


def _upstream_task(rel: str, data_files: dict[str, Path], splits: dict[str, str | None]):
    """lm-eval's own task from its own YAML (own loader: includes and !function resolved), data pointed at our JSONL."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(ev.lm_eval_tasks_dir() / rel)
    cfg.update(dataset_path="json", dataset_name=None, tag=[],
               dataset_kwargs={"data_files": {s: str(p) for s, p in data_files.items()}}, **splits)
    loaded = TaskManager(include_defaults=False).load([cfg])["tasks"]
    return loaded[cfg["task"]]


def test_local_tasks_render_exactly_like_upstream(bench):
    from lm_eval.tasks import TaskManager

    loc = ev.render_local_tasks(bench)
    assert loc.include_path.is_dir() and str(loc.include_path).startswith(str(cache_dir("tasks")))
    assert loc.names == {**{b: f"{b}_local" for b in LOCAL if b != "mmlu"}, "mmlu": "mmlu_local"}
    tm = TaskManager(include_path=str(loc.include_path), include_defaults=False)
    loaded = tm.load([f"{b}_local" for b in LOCAL if b != "mmlu"] + ["mmlu_local"])
    assert set(loaded["tasks"]) == {f"{b}_local" for b in LOCAL if b != "mmlu"} | {
        "mmlu_abstract_algebra_local", "mmlu_anatomy_local"}
    # split rule: upstream names kept where the local data has the split, null elsewhere
    arc = loaded["tasks"]["arc_easy_local"].config
    assert (arc.training_split, arc.validation_split, arc.test_split) == (None, "validation", None)
    mm = loaded["tasks"]["mmlu_anatomy_local"].config
    assert (mm.test_split, mm.fewshot_split) == ("test", "dev")
    assert mm.description.startswith("The following are multiple choice questions (with answers) about anatomy")
    assert loaded["tasks"]["lambada_openai_local"].config.test_split == "test"

    for bench_name, rel in UPSTREAM.items():
        local = loaded["tasks"][f"{bench_name}_local"]
        data = bench[bench_name]
        splits = {k: getattr(local.config, k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
        up = _upstream_task(rel, data, splits)
        a, b = local.config.to_dict(), up.config.to_dict()
        for d in (a, b):
            d.pop("task"), d["metadata"].pop("config_source", None)
        assert a == b, bench_name  # every prompt/metric/processing field identical
        docs_l, docs_u = list(local.eval_docs), list(up.eval_docs)
        assert len(docs_l) == len(docs_u) > 0
        for dl, du in zip(docs_l, docs_u):
            assert local.doc_to_text(dl) == up.doc_to_text(du)
            assert local.doc_to_target(dl) == up.doc_to_target(du)
            if local.OUTPUT_TYPE == "multiple_choice":
                assert local.doc_to_choice(dl) == up.doc_to_choice(du)

    # and independently of lm-eval: the prompts the paper's harness shows the model
    t = loaded["tasks"]
    d = list(t["arc_easy_local"].eval_docs)[0]
    assert t["arc_easy_local"].doc_to_text(d) == "Question: Which gas do plants take in?\nAnswer:"
    assert t["arc_easy_local"].doc_to_choice(d) == ARC[0][1] and t["arc_easy_local"].doc_to_target(d) == 1
    d = list(t["piqa_local"].eval_docs)[1]
    assert t["piqa_local"].doc_to_text(d) == "Question: To dry wet hands,\nAnswer:"
    assert t["piqa_local"].doc_to_choice(d) == ["put them in water.", "use a towel."] and t["piqa_local"].doc_to_target(d) == 1
    d = list(t["boolq_local"].eval_docs)[1]
    assert t["boolq_local"].doc_to_text(d) == "Fire is hot and gives off light.\nQuestion: is fire cold?\nAnswer:"
    assert t["boolq_local"].doc_to_choice(d) == ["no", "yes"] and t["boolq_local"].doc_to_target(d) == 0
    d = list(t["sciq_local"].eval_docs)[0]
    assert t["sciq_local"].doc_to_text(d) == "Lungs take in oxygen from air.\nQuestion: What do lungs take in?\nAnswer:"
    assert t["sciq_local"].doc_to_choice(d) == ["gold", "lead", "iron", "oxygen"] and t["sciq_local"].doc_to_target(d) == 3
    d = list(t["openbookqa_local"].eval_docs)[1]
    assert t["openbookqa_local"].doc_to_text(d) == "Water freezes at" and t["openbookqa_local"].doc_to_target(d) == 1
    d = list(t["hellaswag_local"].eval_docs)[0]  # lm-eval's process_docs ran on our rows
    assert t["hellaswag_local"].doc_to_text(d) == "Baking cookies: A woman mixes flour in a bowl. She"
    assert t["hellaswag_local"].doc_to_choice(d)[1] == "flies away. now."
    d = list(t["winogrande_local"].eval_docs)[1]  # partial scoring: choices are contexts, target the continuation
    assert t["winogrande_local"].doc_to_text(d) == 1
    assert t["winogrande_local"].doc_to_choice(d) == ["The trophy 1 did not fit in the suitcase because the trophy",
                                                      "The trophy 1 did not fit in the suitcase because the suitcase"]
    assert t["winogrande_local"].doc_to_target(d) == "was too big."
    d = list(t["lambada_openai_local"].eval_docs)[2]
    assert t["lambada_openai_local"].doc_to_text(d) == "he counted one two three four"
    assert t["lambada_openai_local"].doc_to_target(d) == " five"
    d = list(t["mmlu_anatomy_local"].eval_docs)[2]
    assert t["mmlu_anatomy_local"].doc_to_text(d) == "anatomy question 2?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
    assert t["mmlu_anatomy_local"].doc_to_choice(d) == ["A", "B", "C", "D"] and t["mmlu_anatomy_local"].doc_to_target(d) == 2


def test_evaluate_all_local_tasks(model, tok):
    res = ev.evaluate(model, tok, tasks=LOCAL, limit=3, source="local", batch_size=4, progress=False)
    assert list(res["tasks"]) == LOCAL
    for b, r in res["tasks"].items():
        assert r["source"] == "local" and r["task"] == ("mmlu_local" if b == "mmlu" else f"{b}_local")
        assert r["metric"] == ev.TASKS[b].metric and r["value"] == r["metrics"][r["metric"]]
        assert 0.0 <= r["value"] <= 1.0 and r["stderr"] is not None
        assert r["num_fewshot"] == (5 if b == "winogrande" else 0)
        n_expected = 6 if b == "mmlu" else 3  # limit is per (sub)task; mmlu has 2 subjects in the fixture
        assert r["n"] == n_expected and len(r["per_doc"]["doc_id"]) == n_expected
        # per-document 0/1 scores reproduce lm-eval's aggregate (what a bootstrap needs)
        for m in ("acc", "acc_norm"):
            if m in r["metrics"]:
                assert set(r["per_doc"][m]) <= {0.0, 1.0}
                assert sum(r["per_doc"][m]) / n_expected == pytest.approx(r["metrics"][m])
        assert r["cached"] is False
    assert res["tasks"]["mmlu"]["per_doc"]["subtask"] == ["mmlu_abstract_algebra_local"] * 3 + ["mmlu_anatomy_local"] * 3
    # Avg-acc over the 5 paper accuracy tasks available offline; arc/hellaswag/mmlu/lambada not in it
    five = ["winogrande", "piqa", "boolq", "openbookqa", "sciq"]
    assert res["avg_acc_tasks"] == five and res["avg_acc_missing"] == ["race"]
    assert res["avg_acc"] == pytest.approx(sum(res["tasks"][t]["value"] for t in five) / 5)
    # LAMBADA perplexity = exp(-mean per-document target log-likelihood)
    lam = res["tasks"]["lambada_openai"]
    assert res["lambada_ppl"] == lam["metrics"]["perplexity"]
    assert res["lambada_ppl"] == pytest.approx(math.exp(-sum(lam["per_doc"]["loglikelihood"]) / 3), rel=1e-6)
    assert res["lambada_ppl"] > 1 and res["lambada_acc"] == lam["metrics"]["acc"]
    table = ev.summary_table(res)
    assert "| piqa | local | 0 | acc_norm |" in table and "Avg-acc" in table and "LAMBADA ppl" in table
    assert "missing race" in table and "not the paper's Avg-acc" in table
    piqa = next(line for line in table.splitlines() if line.startswith("| piqa |")).split("|")
    m = res["tasks"]["piqa"]["metrics"]
    assert float(piqa[7]) == pytest.approx(m["acc"], abs=5e-5) and float(piqa[8]) == pytest.approx(m["acc_norm"], abs=5e-5)
    full = ev.summary_table({**res, "avg_acc_missing": [], "avg_acc_tasks": list(ev.AVG_ACC_TASKS)})
    assert "the paper's 6 tasks" in full and "not the paper's" not in full
    json.dumps(res)  # the whole result is JSON-serialisable


def test_race_offline_is_skipped_with_note_or_error(model, tok, capsys):
    res = ev.evaluate(model, tok, tasks=["race", "piqa"], limit=2)
    assert list(res["tasks"]) == ["piqa"] and "race" in res["skipped"]
    assert res["avg_acc_tasks"] == ["piqa"] and "race" in res["avg_acc_missing"]
    assert "skipping race" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="race"):
        ev.evaluate(model, tok, tasks=["race"], limit=2)
    with pytest.raises(ValueError, match="race"):
        ev.evaluate(model, tok, tasks=["race", "piqa"], limit=2, source="local")


def test_auto_uses_hub_task_when_no_local_data(model, tok, monkeypatch, bench):
    import replaceme_core.assets as assets

    monkeypatch.setattr(assets, "benchmark_files", lambda *a, **k: {k: v for k, v in bench.items() if k != "piqa"})
    monkeypatch.setattr(request_plan, "hub_reachable", lambda *a, **k: True)
    seen = {}

    def fake(**kw):
        seen.update(kw)
        raise RuntimeError("stop before any download")

    from replaceme_core.evaluation import task_manager as managers

    indexed = {}
    monkeypatch.setattr("lm_eval.simple_evaluate", fake)
    monkeypatch.setattr(managers, "_MANAGERS", {})
    monkeypatch.setattr(managers.TaskManager, "__init__", lambda self, **kw: indexed.update(kw))
    with pytest.raises(RuntimeError, match="stop"):
        ev.evaluate(model, tok, tasks=["piqa", "arc_easy"], limit=2, progress=False)
    assert sorted(seen["tasks"]) == ["arc_easy_local", "piqa"]
    assert isinstance(seen["task_manager"], managers.BuiltOnceTaskManager)
    assert indexed["include_defaults"] is True  # lm-eval's own tasks are indexed for hub tasks


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def test_cache_hit_miss_and_invalidation(model, tok, monkeypatch):
    import lm_eval

    real = lm_eval.simple_evaluate
    calls = []

    def counting(**kw):
        calls.append(kw["limit"])
        return real(**kw)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    tasks = ["arc_easy", "piqa"]
    first = ev.evaluate(model, tok, tasks=tasks, limit=2, progress=False)
    assert len(calls) == 1 and not any(r["cached"] for r in first["tasks"].values())
    for r in first["tasks"].values():
        assert (cache_dir("eval") / f"{r['cache_key']}.json").is_file()

    # hit: lm-eval must not run at all; batch size and device are not part of the key
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("cache miss"))
    again = ev.evaluate(model, tok, tasks=tasks, limit=2, batch_size=1, device="cpu", progress=False)
    assert all(r["cached"] for r in again["tasks"].values())
    for t in tasks:
        assert again["tasks"][t]["value"] == first["tasks"][t]["value"]
        assert again["tasks"][t]["per_doc"] == first["tasks"][t]["per_doc"]
    # a subset is served from the same per-task entries
    assert ev.evaluate(model, tok, tasks=["piqa"], limit=2, progress=False)["tasks"]["piqa"]["cached"]

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    # miss: different limit, different few-shot count, different seed
    ev.evaluate(model, tok, tasks=tasks, limit=3, progress=False)
    ev.evaluate(model, tok, tasks=["piqa"], limit=2, num_fewshot=1, progress=False)
    ev.evaluate(model, tok, tasks=["piqa"], limit=2, seed=1, progress=False)
    assert calls == [2, 3, 2, 2]
    # use_cache=False recomputes (and rewrites)
    ev.evaluate(model, tok, tasks=["piqa"], limit=2, use_cache=False, progress=False)
    assert len(calls) == 5
    # invalidation: perturb one weight
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    changed = ev.evaluate(model, tok, tasks=tasks, limit=2, progress=False)
    assert len(calls) == 6 and not any(r["cached"] for r in changed["tasks"].values())
    assert changed["model"]["weights"] != first["model"]["weights"]
    # data change invalidates too (content hash of the JSONL, not its name)
    import replaceme_core.assets as assets

    data = assets.benchmark_files()
    p = data["piqa"]["validation"]
    rows = p.read_text().splitlines()
    p.write_text("\n".join(reversed(rows)) + "\n")
    try:
        ev.evaluate(model, tok, tasks=["piqa"], limit=2, progress=False)
        assert len(calls) == 7
    finally:
        p.write_text("\n".join(rows) + "\n")


def test_weights_hash_is_content_not_name(model, tok, tmp_path):
    import shutil

    model.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ha, hb = ev.hash_model_dir(tmp_path / "a"), ev.hash_model_dir(tmp_path / "b")
    assert ha == hb and ha is not None
    other = make_model(tok, seed=1)
    other.save_pretrained(tmp_path / "c")
    assert ev.hash_model_dir(tmp_path / "c") != ha
    assert ev.hash_state_dict(model) == ev.hash_state_dict(make_model(tok, seed=0))
    assert ev.hash_state_dict(model) != ev.hash_state_dict(other)


def test_remembered_weights_hash_follows_every_in_place_write_and_replacement(tok):
    from replaceme_core.evaluation import model_ref

    m = make_model(tok, seed=0)
    fresh = lambda: model_ref._hash_state_dict(m)  # noqa: E731
    h0 = model_ref.hash_state_dict(m)
    assert m in model_ref._STATE_HASHES and model_ref.hash_state_dict(m) == h0 == fresh()
    with torch.no_grad():
        m.lm_head.weight[3, 2] += 0.25  # in place: the version counter moves
    assert model_ref.hash_state_dict(m) == fresh() != h0
    w = m.model.layers[0].mlp.down_proj.weight
    m.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(w.detach().clone() * 2)  # a new tensor
    assert model_ref.hash_state_dict(m) == fresh()
    del m.model.layers[1]  # a block deleted: other names
    m.config.num_hidden_layers -= 1
    assert model_ref.hash_state_dict(m) == fresh()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # a training step
    assert model_ref.hash_state_dict(m) == fresh()


def test_remembered_tokenizer_hash_follows_added_tokens(tok):
    import copy

    from replaceme_core.evaluation import model_ref

    t = copy.deepcopy(tok)
    h0 = model_ref.hash_tokenizer(t)
    assert model_ref.hash_tokenizer(t) == h0 == model_ref._hash_tokenizer(t)
    t.add_tokens(["<brand-new-token>"])
    h1 = model_ref.hash_tokenizer(t)
    assert h1 == model_ref._hash_tokenizer(t) != h0
    t.add_eos_token = not bool(getattr(t, "add_eos_token", False))  # rewrites the post-processor only
    assert model_ref.hash_tokenizer(t) == model_ref._hash_tokenizer(t) != h1


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------
def _manual_ppl(model, tok, texts, max_length):
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, truncation=True, max_length=max_length)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0]
            nll += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return math.exp(nll / n), nll / n, n


def test_perplexity_token_weighted_and_batch_invariant(model, tok):
    texts = LAMBADA + ["a", "Question: what is the answer to the quick brown fox? Answer: the lazy dog " * 3, "yes no"]
    ppl, nll, n = _manual_ppl(model, tok, texts, max_length=24)
    assert n == sum(max(min(len(tok(t)["input_ids"]), 24) - 1, 0) for t in texts)
    scored = [t for t in texts if len(tok(t)["input_ids"]) > 1]
    per_text_mean = sum(_manual_ppl(model, tok, [t], 24)[0] for t in scored) / len(scored)
    for bs in (1, 3, 8):
        out = ev.perplexity(model, tok, texts, max_length=24, batch_size=bs, use_cache=False, progress=False)
        assert out["tokens"] == n and out["texts"] == len(texts)
        assert out["nll"] == pytest.approx(nll, rel=1e-5)
        assert out["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert out["ppl"] != pytest.approx(per_text_mean, rel=1e-3)  # not a mean of per-text ppl
    assert len(scored) < len(texts)  # the one-token text contributes nothing (and does not crash)


def test_perplexity_per_text_sums_match_each_text_alone(model, tok):
    texts = ["a", *LAMBADA, "yes no"]
    out = ev.perplexity(model, tok, texts, max_length=24, batch_size=3, use_cache=False, progress=False)
    assert len(out["doc_nll"]) == len(out["doc_tokens"]) == len(texts)  # in the order given, batches sorted by length
    for t, nll, n in zip(texts, out["doc_nll"], out["doc_tokens"]):
        _, mean, alone = _manual_ppl(model, tok, [t], max_length=24) if len(tok(t)["input_ids"]) > 1 else (0, 0.0, 0)
        assert n == alone
        assert nll == pytest.approx(mean * alone, rel=1e-5, abs=1e-9)
    assert sum(out["doc_tokens"]) == out["tokens"]
    assert sum(out["doc_nll"]) / out["tokens"] == pytest.approx(out["nll"], rel=1e-12)


def test_perplexity_cache_by_content(model, tok, monkeypatch):
    texts = LAMBADA
    a = ev.perplexity(model, tok, texts, max_length=32, progress=False)
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("cache miss"))
    assert ev.perplexity(model, tok, texts, max_length=32, batch_size=2, progress=False) == a
    monkeypatch.undo()
    with torch.no_grad():
        model.lm_head.weight[5] += 0.5
    b = ev.perplexity(model, tok, texts, max_length=32, progress=False)
    assert b["ppl"] != a["ppl"] and b["tokens"] == a["tokens"]
    assert ev.perplexity(model, tok, texts, max_length=8, progress=False)["tokens"] < a["tokens"]


# --------------------------------------------------------------------------------------------
# CLI (model from a directory)
# --------------------------------------------------------------------------------------------
def test_cli_eval_from_directory(model, tok, tmp_path, capsys, monkeypatch):
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser(prog="replaceme")
    sub = parser.add_subparsers(dest="cmd")
    ev.register_cli(sub)
    assert "Avg-acc" in sub.choices["eval"].format_help() and "--num-fewshot" in sub.choices["eval"].format_help()
    out = tmp_path / "res.json"
    args = parser.parse_args(["eval", str(tmp_path / "ckpt"), "--tasks", "piqa,boolq", "--limit", "2",
                              "--batch-size", "2", "--output", str(out), "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| piqa | local | 0 | acc_norm |" in printed and "| boolq | local | 0 | acc |" in printed
    saved = json.loads(out.read_text())
    assert saved["tasks"]["piqa"]["n"] == 2 and saved["avg_acc_tasks"] == ["piqa", "boolq"]
    # same weights under another directory name: served from the cache
    import shutil

    import lm_eval

    shutil.copytree(tmp_path / "ckpt", tmp_path / "renamed")
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("cache miss"))
    args = parser.parse_args(["eval", str(tmp_path / "renamed"), "--tasks", "piqa,boolq", "--limit", "2", "--quiet"])
    assert args.func(args) == 0
    # errors are an exit code, not a traceback
    args = parser.parse_args(["eval", str(tmp_path / "ckpt"), "--tasks", "race", "--quiet"])
    assert args.func(args) == 2


def test_hub_names_exist_and_local_tasks_stay_out_of_lm_eval_groups(bench):
    """Hub mode names lm-eval's own tasks; indexing our tasks next to lm-eval's must not change lm-eval's groups."""
    from lm_eval.tasks import TaskManager

    loc = ev.render_local_tasks(bench)
    tm = TaskManager(include_path=str(loc.include_path))
    for b, spec in ev.TASKS.items():
        assert spec.hub in tm.all_tasks, b
    assert "mmlu" in tm.all_groups and "mmlu_local" in tm.all_groups
    assert {"arc_easy_local", "mmlu_anatomy_local", "winogrande_local"} <= set(tm.all_subtasks)
    local_entries = [e for n, e in tm.task_index.items() if n.endswith("_local")]
    assert len(local_entries) == len(loc.names) + 2  # 9 tasks + the mmlu_local group + its 2 subjects
    for e in local_entries:
        assert not e.tags, (e.name, e.tags)  # upstream tags (ai2_arc, mmlu_*_tasks, lambada, ...) cleared
    upstream_tagged = [n for n, e in tm.task_index.items() if e.tags and "mmlu_anatomy" == n]
    assert upstream_tagged == ["mmlu_anatomy"]  # lm-eval's own subject still carries its tag


# --------------------------------------------------------------------------------------------
# backends and per-sample logs
# --------------------------------------------------------------------------------------------
def test_backend_is_part_of_the_cache_key(model, tok):
    hf = ev.evaluate(model, tok, tasks=["piqa"], limit=2, progress=False, backend="hf")
    ours = ev.evaluate(model, tok, tasks=["piqa"], limit=2, progress=False, backend="replaceme")
    assert not ours["tasks"]["piqa"]["cached"] and ours["tasks"]["piqa"]["cache_key"] != hf["tasks"]["piqa"]["cache_key"]
    assert ours["config"]["backend"] == "replaceme" and hf["config"]["backend"] == "hf"
    a, b = ours["tasks"]["piqa"]["per_doc"], hf["tasks"]["piqa"]["per_doc"]
    assert {k: v for k, v in a.items() if k != "margin"} == {k: v for k, v in b.items() if k != "margin"}
    assert a["margin"] == pytest.approx(b["margin"], abs=1e-3)  # log-likelihoods agree to float rounding
    with pytest.raises(ValueError, match="unknown evaluation backend"):
        ev.evaluate(model, tok, tasks=["piqa"], limit=2, progress=False, backend="vllm")


def test_log_samples_writes_lm_evals_records_also_from_the_cache(model, tok, tmp_path, monkeypatch):
    import lm_eval

    ev.evaluate(model, tok, tasks=["piqa"], limit=3, progress=False, backend="hf")  # cached without records
    first = ev.evaluate(model, tok, tasks=["piqa", "mmlu"], limit=3, progress=False, backend="hf", log_samples=tmp_path / "a")
    assert not first["tasks"]["piqa"]["cached"]  # re-scored: the earlier entry kept no records
    piqa = [json.loads(line) for line in (tmp_path / "a" / "samples_piqa_local.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in piqa] == [0, 1, 2] and all({"doc", "target", "resps", "acc"} <= set(r) for r in piqa)
    assert [r["acc"] for r in piqa] == first["tasks"]["piqa"]["per_doc"]["acc"]
    mmlu = sorted(p.name for p in (tmp_path / "a").glob("samples_mmlu_*.jsonl"))
    assert mmlu and all(n.endswith("_local.jsonl") for n in mmlu)  # one file per subject task, as lm-eval writes them
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("cache miss"))
    again = ev.evaluate(model, tok, tasks=["piqa", "mmlu"], limit=3, progress=False, backend="hf", log_samples=tmp_path / "b")
    assert all(r["cached"] for r in again["tasks"].values())
    for f in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes()


def test_gold_margins_are_recorded_and_agree_with_accuracy(model, tok, tmp_path, monkeypatch):
    import lm_eval

    res = ev.evaluate(model, tok, tasks=["piqa", "arc_easy", "lambada_openai"], limit=3, progress=False,
                      log_samples=tmp_path)
    for task, name in (("piqa", "piqa_local"), ("arc_easy", "arc_easy_local")):
        per_doc = res["tasks"][task]["per_doc"]
        records = [json.loads(line) for line in (tmp_path / f"samples_{name}.jsonl").read_text().splitlines()]
        for rec, margin, acc in zip(sorted(records, key=lambda r: r["doc_id"]), per_doc["margin"], per_doc["acc"]):
            lls = [float(r[0]) for r in rec["filtered_resps"]]
            gold = int(rec["target"])
            assert margin == pytest.approx(lls[gold] - max(x for j, x in enumerate(lls) if j != gold), abs=1e-12)
            assert (margin > 0) == (acc == 1.0)
    assert "margin" not in res["tasks"]["lambada_openai"]["per_doc"]  # one continuation: no distractor
    # an entry without a field the caller needs is scored again; with it, served from the cache
    def miss(**kw):
        raise LookupError("cache miss")

    monkeypatch.setattr(lm_eval, "simple_evaluate", miss)
    assert ev.evaluate(model, tok, tasks=["piqa"], limit=3, progress=False, per_doc_fields=["margin"])["tasks"]["piqa"]["cached"]
    # LAMBADA has no margin, and its entry says it was derived where possible: served from the cache too
    assert ev.evaluate(model, tok, tasks=["lambada_openai"], limit=3, progress=False,
                       per_doc_fields=["margin"])["tasks"]["lambada_openai"]["cached"]
    # an entry written before margins were derived (no margin, no derived_fields) is scored again
    from replaceme_core.io.cache import cache_dir

    for path in cache_dir("eval").glob("*.json"):
        entry = json.loads(path.read_text())
        if entry.get("task", "").startswith("piqa"):
            entry.pop("derived_fields")
            entry["per_doc"].pop("margin")
            path.write_text(json.dumps(entry))
    assert ev.evaluate(model, tok, tasks=["piqa"], limit=3, progress=False)["tasks"]["piqa"]["cached"]
    with pytest.raises(LookupError, match="cache miss"):
        ev.evaluate(model, tok, tasks=["piqa"], limit=3, progress=False, per_doc_fields=["margin"])


# --------------------------------------------------------------------------------------------
# several models at once: shared prefixes, document ranges
# --------------------------------------------------------------------------------------------
def _deep_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_evaluate_many_groups_variants_and_keeps_their_numbers(tok, monkeypatch, tmp_path):
    """Through lm-eval: the variants of one run and the unpruned model form one group, a model differing in one
    prefix weight is scored alone, and every per-document number equals scoring each model by itself."""
    import copy

    from test_grouped_eval import variants

    from replaceme_core.arch import get_adapter
    from replaceme_core.evaluation.shared_context import GroupedHFLM

    models = variants(_deep_model(tok))
    flipped = copy.deepcopy(models["ls"])
    with torch.no_grad():
        get_adapter(flipped).layers[0].mlp.down_proj.weight[0, 0] += 0.5
    models["flipped"] = flipped
    seen = []
    original = GroupedHFLM.set_group
    monkeypatch.setattr(GroupedHFLM, "set_group", lambda self, others, k: (seen.append((len(others), k)),
                                                                           original(self, others, k))[1])
    tasks = ["arc_easy", "lambada_openai"]
    grouped = ev.evaluate_many(list(models.values()), tok, tasks=tasks, limit=3, progress=False)
    # base, uidl, ls, cos share blocks 0-1 (T folded into block 2): each member serves the ones after it; flipped alone
    assert seen == [(3, 2), (2, 2), (1, 2), (0, 2)]
    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "other-cache"))
    for g, m in zip(grouped, models.values()):
        alone = ev.evaluate(m, tok, tasks=tasks, limit=3, progress=False)
        for t in tasks:
            assert set(g["tasks"][t]["per_doc"]) == set(alone["tasks"][t]["per_doc"])
            for field, values in alone["tasks"][t]["per_doc"].items():
                assert g["tasks"][t]["per_doc"][field] == pytest.approx(values, abs=1e-4), (t, field)
    ll = [g["tasks"]["lambada_openai"]["per_doc"]["loglikelihood"] for g in grouped]
    assert ll[2] != pytest.approx(ll[4], abs=1e-3)  # the flipped weight shows


def test_document_range_scores_those_documents(model, tok):
    """docs=(1, 3) scores documents 1 and 2: the same per-document numbers as the first three, less the first."""
    first = ev.evaluate(model, tok, tasks=["arc_easy"], limit=3, progress=False)["tasks"]["arc_easy"]
    part = ev.evaluate(model, tok, tasks=["arc_easy"], docs=(1, 3), progress=False)["tasks"]["arc_easy"]
    assert part["doc_offset"] == 1 and part["n"] == 2
    assert part["per_doc"]["acc"] == first["per_doc"]["acc"][1:]
    assert part["per_doc"]["margin"] == pytest.approx(first["per_doc"]["margin"][1:], abs=1e-5)
    with pytest.raises(ValueError, match="none in the range"):
        ev.evaluate(model, tok, tasks=["arc_easy"], docs=(10, 12), progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit must be a positive"),
    (["--limit", "-3"], "--limit must be a positive"),
    (["--limit", "2.5"], "--limit must be a whole number"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
])
def test_cli_eval_refuses_bad_arguments_in_one_line(argv, message, capsys, monkeypatch):
    """Before any model loads or request is built: one line naming the argument and what it allows."""
    from replaceme_core.evaluation import cli as eval_cli

    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    parser = argparse.ArgumentParser(prog="replaceme")
    ev.register_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["eval", "smollm2-135m-instruct", "--tasks", "arc_easy", *argv])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_tasks_are_built_once_per_fewshot_count(model, tok, monkeypatch):
    """Each task is built once per few-shot count and process, and reused for that count only: 0-, 1-, 0- and 1-shot
    again give what freshly built tasks give (lm-eval never overwrites a 0 it finds in a task's config)."""
    from replaceme_core.evaluation import task_manager as managers

    kw = dict(tasks=["winogrande", "arc_easy"], limit=4, progress=False, use_cache=False, per_doc_fields=("margin",))

    def scored(k):
        out = ev.evaluate(model, tok, num_fewshot=k, **kw)["tasks"]
        return {t: (out[t]["value"], out[t]["per_doc"]) for t in out}

    expected = {}
    for k in (0, 1):
        managers._MANAGERS.clear()
        expected[k] = scored(k)
    margins = [expected[k]["arc_easy"][1]["margin"] for k in (0, 1)]
    assert margins[0] != pytest.approx(margins[1], abs=1e-3)  # the few-shot count shows in the numbers
    managers._MANAGERS.clear()
    built, build = [], managers.TaskManager._load_spec
    monkeypatch.setattr(managers.TaskManager, "_load_spec", lambda self, spec: built.append(spec) or build(self, spec))
    for k in (0, 1, 0, 1):
        got = scored(k)
        for t, (value, per_doc) in expected[k].items():
            assert got[t][0] == value and set(got[t][1]) == set(per_doc), (k, t)
            for field, values in per_doc.items():
                assert got[t][1][field] == pytest.approx(values, abs=1e-6), (k, t, field)
    assert sorted(built) == sorted(["winogrande_local", "arc_easy_local"] * 2)


def test_equal_models_in_one_call_are_scored_once(tok, monkeypatch):
    """Two equal models (a deep copy: the same content) in one `evaluate_many` or `perplexity_many` call are scored
    once; the copy gets the same numbers, marked cached, and a different model in the same call is still scored."""
    import copy

    from replaceme_core.evaluation.perplexity import perplexity_many

    base = _deep_model(tok)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    models = [base, copy.deepcopy(base), other]
    turns, score = [], runner._score
    monkeypatch.setattr(runner, "_score",
                        lambda plan, todo, lm, **kw: turns.append(plan.ref.model) or score(plan, todo, lm, **kw))
    out = ev.evaluate_many(models, tok, tasks=["arc_easy"], limit=3, progress=False)
    assert len(turns) == 2 and turns[0] is base and turns[1] is other
    assert out[1]["tasks"]["arc_easy"]["cached"] and not out[0]["tasks"]["arc_easy"]["cached"]
    assert out[1]["tasks"]["arc_easy"]["per_doc"] == out[0]["tasks"]["arc_easy"]["per_doc"]
    assert out[2]["tasks"]["arc_easy"]["per_doc"] != out[0]["tasks"]["arc_easy"]["per_doc"]
    forwards = {id(m): 0 for m in models}
    hooks = [m.register_forward_pre_hook(lambda mod, *_: forwards.__setitem__(id(mod), forwards[id(mod)] + 1))
             for m in models]
    try:
        ppl = perplexity_many(models, tok, ["the cat sat on the mat", "a dog ran"], max_length=16, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert forwards[id(models[1])] == 0 and forwards[id(models[0])] > 0 and forwards[id(models[2])] > 0
    assert ppl[1] == ppl[0] and ppl[1] is not ppl[0] and ppl[2]["ppl"] != ppl[0]["ppl"]
