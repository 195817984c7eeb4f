"""BIG-bench multiple-choice tasks (the Fig. 9 analogue): conversion of task.json, the rendered lm-eval tasks,
and a run on a tiny model whose scores are checked against log-likelihoods computed here by hand.

Every test uses hand-written task files: the bigbench 1.0.0 sdist, where the real ones lie, is no longer served by
the package index, so the converter is exercised on a source tree of the same layout written here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from replaceme_core import assets
from replaceme_core import evaluation as ev
from replaceme_core.assets import packages
from replaceme_core.io.cache import cache_dir

TOY = {
    "name": "toy",
    "task_prefix": "Answer the question.\n",
    "examples": [
        {"input": "Is ice cold?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Pick the even number.", "target_scores": {"3": 0, "7": 0, "4": 1, "9": 0}},
        {"input": "no choices here", "target": "free text"},  # generative example: skipped
        {"input": "Two right answers.", "target_scores": {"x": 0, "y": 1, "z": 1}},
    ],
}


def test_rows_choices_answer_and_prompt():
    rows = assets.bigbench_rows({**TOY, "append_choices_to_input": False})
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert rows[0]["multiple_choice_targets"] == ["Yes", "No"] and rows[0]["targets"] == ["Yes"]
    assert rows[1]["multiple_choice_targets"] == ["3", "7", "4", "9"] and rows[1]["targets"] == ["4"]
    # ties: the first highest-scoring key in file order (BIG-bench's rule)
    assert rows[2]["targets"] == ["y"] and rows[2]["multiple_choice_scores"] == [0.0, 1.0, 1.0]
    # BIG-bench's default prefixes; the trailing space of "\nA: " is dropped (lm-eval adds one before the choice)
    assert rows[0]["inputs"] == "Answer the question.\n\nQ: Is ice cold?\nA:"
    # what lm-eval's template does with a row: choices = multiple_choice_targets, gold = index of targets[0]
    for r in rows:
        gold = r["multiple_choice_targets"].index(r["targets"][0])
        assert gold == int(np.argmax(r["multiple_choice_scores"]))


def test_rows_append_choices_and_custom_prefixes():
    task = {**TOY, "example_input_prefix": "\nSentence: ", "example_output_prefix": "\nAnswer? ", "choice_prefix": "\n - "}
    rows = assets.bigbench_rows(task)  # append_choices_to_input defaults to True, as in BIG-bench
    head, _, tail = rows[1]["inputs"].partition("Pick the even number.")
    assert head == "Answer the question.\n\nSentence: " and tail.endswith("\nAnswer?")
    listed = tail[: -len("\nAnswer?")].split("\n - ")
    assert listed[0] == "" and sorted(listed[1:]) == ["3", "4", "7", "9"]  # each choice once, in BIG-bench's order
    assert listed[1:] == list(np.random.RandomState(42).permutation(["3", "4", "7", "9"]))
    assert rows[1]["multiple_choice_targets"] == ["3", "7", "4", "9"]  # the scored choices keep file order


def test_rows_limit_and_bad_input():
    assert len(assets.bigbench_rows(TOY, max_docs=2)) == 2
    with pytest.raises(assets.AssetError, match="no single best choice"):
        assets.bigbench_rows({"name": "bad", "examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]})
    with pytest.raises(assets.AssetError, match="no multiple-choice examples"):
        assets.bigbench_rows({"name": "empty", "examples": [{"input": "q", "target": "t"}]})


# --------------------------------------------------------------------------------------------
# the packaged BIG-bench data
# --------------------------------------------------------------------------------------------
#: One small task.json per converted task, in BIG-bench's layout and field names. date_understanding lists no choices
#: in its prompt (as the real task); disambiguation_qa appends them with its own prefixes (as the real task).
SOURCE_TASKS = {
    "date_understanding": {
        "name": "date_understanding", "append_choices_to_input": False,
        "examples": [
            {"input": "Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?",
             "target_scores": {"05/01/2021": 1, "02/23/2021": 0, "03/11/2021": 0, "04/29/2021": 0}},
            {"input": "Today is Christmas Eve of 1937. What is the date tomorrow in MM/DD/YYYY?",
             "target_scores": {"12/11/1937": 0, "12/25/1937": 1, "01/04/1938": 0}},
            {"input": "free-text example", "target": "skipped"},
        ],
    },
    "disambiguation_qa": {
        "name": "disambiguation_qa", "example_output_prefix": "\nPronoun identification: ", "choice_prefix": "\n  choice: ",
        "examples": [
            {"input": "The chief told the counselor that they took the day off.",
             "target_scores": {"The chief took the day off": 1, "The counselor took the day off": 0, "Ambiguous": 0}},
            {"input": "The mechanic greets the receptionist because he was in a good mood.",
             "target_scores": {"The mechanic was in a good mood": 0, "The receptionist was in a good mood": 0, "Ambiguous": 1}},
        ],
    },
}


def _toy_task(name: str) -> dict:
    return SOURCE_TASKS.get(name, {"name": name, "examples": [
        {"input": f"{name}: first question", "target_scores": {"True": 1, "False": 0}},
        {"input": f"{name}: second question", "target_scores": {"True": 0, "False": 1}},
        {"input": f"{name}: third question", "target_scores": {"True": 1, "False": 0}},
        {"input": f"{name}: fourth question", "target_scores": {"True": 0, "False": 1}},
    ]})


@pytest.fixture(scope="module")
def bb_root(tmp_path_factory):
    """A bigbench source tree holding a task.json for every task of BIGBENCH_TASKS."""
    root = tmp_path_factory.mktemp("bigbench-sdist")
    for name, folder in assets.BIGBENCH_TASKS.items():
        path = root / "bigbench" / "benchmark_tasks" / folder / "task.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_toy_task(name)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bb_files(bb_root, tmp_path_factory):
    from replaceme_core.assets import benchmarks

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLACEME_CACHE", str(tmp_path_factory.mktemp("bb-cache")))
        mp.setattr(benchmarks, "fetch_package", lambda req, progress=False: bb_root)
        files = assets.bigbench_files()
        again = assets.bigbench_files()  # converted once, then read from the cache
    assert files == again
    return files


def _rows(files, task):
    with open(files[f"bigbench_{task}"]["default"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_task_converted_consistently(bb_files, bb_root):
    assert set(bb_files) == {f"bigbench_{t}" for t in assets.BIGBENCH_TASKS}
    assert set(bb_files) <= set(ev.TASKS)
    root = bb_root / "bigbench" / "benchmark_tasks"
    for task, folder in assets.BIGBENCH_TASKS.items():
        raw = json.loads((root / folder / "task.json").read_text(encoding="utf-8"))
        mc = [e for e in raw["examples"] if e.get("target_scores")]
        rows = _rows(bb_files, task)
        assert len(rows) == min(len(mc), assets.BIGBENCH_MAX_DOCS), task
        for ex, r in zip(mc, rows):
            assert r["multiple_choice_targets"] == list(ex["target_scores"]), task
            best = max(ex["target_scores"].values())
            assert ex["target_scores"][r["targets"][0]] == best, task
            assert ex["input"] in r["inputs"], task


def test_rendered_task_matches_lm_eval_template(bb_files):
    """Our local task = lm-eval's bigbench multiple-choice task on our rows: same prompt, choices and gold index."""
    from lm_eval.tasks import TaskManager

    loc = ev.render_local_tasks(bb_files, ["bigbench_date_understanding", "bigbench_disambiguation_qa"])
    assert loc.names == {"bigbench_date_understanding": "bigbench_date_understanding_local",
                         "bigbench_disambiguation_qa": "bigbench_disambiguation_qa_local"}
    tm = TaskManager(include_path=str(loc.include_path), include_defaults=False)
    tasks = tm.load(list(loc.names.values()))["tasks"]
    t = tasks["bigbench_date_understanding_local"]
    assert t.OUTPUT_TYPE == "multiple_choice" and t.config.test_split == "default" and not t.config.tag
    docs = list(t.eval_docs)
    assert len(docs) == len(_rows(bb_files, "date_understanding"))
    d = docs[0]
    assert t.doc_to_text(d) == "\nQ: Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?\nA:"
    assert t.doc_to_choice(d)[t.doc_to_target(d)] == "05/01/2021"
    for d, r in zip(docs, _rows(bb_files, "date_understanding")):
        assert t.doc_to_choice(d) == r["multiple_choice_targets"]
        assert t.doc_to_target(d) == int(np.argmax(r["multiple_choice_scores"]))
    t = tasks["bigbench_disambiguation_qa_local"]
    d = list(t.eval_docs)[0]
    assert t.doc_to_text(d).endswith("\nPronoun identification:") and "\n  choice: Ambiguous" in t.doc_to_text(d)


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the way lm-eval splits them (whole string, then context prefix)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, tok_id] for i, tok_id in enumerate(cont)))


def test_task_runs_on_tiny_model_and_scores_argmax(bb_files, monkeypatch, tmp_path):
    from replaceme_core.io.models import tiny_random_model

    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "bigbench_files", lambda *a, **k: bb_files)
    model, tok = tiny_random_model()
    limit = 2  # the hand-written disambiguation_qa holds two documents
    res = ev.evaluate(model, tok, tasks=["bigbench_navigate", "bigbench_disambiguation_qa"], limit=limit,
                      source="local", batch_size=4, progress=False, use_cache=False)
    for task in ("navigate", "disambiguation_qa"):
        r = res["tasks"][f"bigbench_{task}"]
        assert r["source"] == "local" and r["metric"] == "acc" and r["n"] == limit and r["num_fewshot"] == 0
        rows = _rows(bb_files, task)[:limit]
        # accuracy by hand: argmax over the choices' log-likelihoods, " " + choice after the prompt
        mine = []
        for row in rows:
            ll = [_loglik(model, tok, row["inputs"], " " + c) for c in row["multiple_choice_targets"]]
            mine.append(float(int(np.argmax(ll)) == row["multiple_choice_targets"].index(row["targets"][0])))
        assert r["per_doc"]["acc"] == mine, task
        assert r["value"] == pytest.approx(np.mean(mine))


def test_sdist_unpacked_again_when_member_list_grows(monkeypatch, tmp_path):
    """Extending _SDIST_MEMBERS (as for the BIG-bench tasks) re-unpacks a cached sdist from the kept download."""
    import tarfile

    monkeypatch.setenv("REPLACEME_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src" / "fakepkg-1.0"
    for rel in ("a/x.json", "b/y.json", "c/z.json"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(json.dumps({"file": rel}))
    downloads = cache_dir("downloads")
    with tarfile.open(downloads / "fakepkg-1.0.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="fakepkg-1.0")

    def no_pip(*a, **k):
        raise AssertionError("the download is cached: pip must not run")

    monkeypatch.setattr(packages, "_pip_download", no_pip)
    monkeypatch.setitem(packages._SDIST_MEMBERS, "fakepkg", ["a/*"])
    root = assets.fetch_package("fakepkg==1.0")
    assert (root / "a/x.json").is_file() and not (root / "b/y.json").exists()
    assert assets.fetch_package("fakepkg==1.0") == root  # unchanged list: cached
    monkeypatch.setitem(packages._SDIST_MEMBERS, "fakepkg", ["a/*", "b/*"])
    root = assets.fetch_package("fakepkg==1.0")
    assert (root / "a/x.json").is_file() and (root / "b/y.json").is_file() and not (root / "c/z.json").exists()
