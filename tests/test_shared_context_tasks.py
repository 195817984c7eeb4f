"""SharedContextHFLM against plain HFLM on lm-eval's own requests of the real tasks, on the real packaged model.

The unit tests (test_shared_context.py) use tiny random models and hand-written requests; this file checks what
they cannot: the prompts, few-shot contexts, choice lists and tokenisation of the actual task YAMLs (our local
overrides, i.e. lm-eval's YAMLs on the packaged data) on SmolLM2-135M-Instruct in float32 on CPU. The requests are
built by lm-eval's own task objects, configured as `simple_evaluate` configures them (same few-shot override rule,
same few-shot seed), then `task.build_all_requests(limit=N_DOCS)`.

Reference: `HFLM(logits_cache=False)`, i.e. what HFLM gives each request on its own. HFLM's default one-token logits
cache mis-scores a request whose `context + continuation[:-1]` equals another request's while its continuation is
shorter (see shared_context's docstring); `test_hflm_default_differs_only_on_colliding_requests` checks that every
request where HFLM's default disagrees with the reference is such a collision, and prints how many there were.

Cost: N_DOCS documents per task (3 MMLU subjects), about 100 requests in all, each scored by three backends; about
a minute of CPU on 2 cores, most of it loading lm-eval's task index and the model. Run with `-s` to see the per-task
max |Δ loglikelihood| and the count of HFLM-default mis-scores.
"""
from __future__ import annotations

import logging

import pytest
import torch

from replaceme_core.assets.cli import _status
from replaceme_core.evaluation import shared_context

MODEL = "smollm2-135m-instruct"
N_DOCS = 4  # documents per task: every task type and prompt shape is covered, and the file stays under ~90 s
MMLU_SUBJECTS = ("elementary_mathematics", "world_religions", "abstract_algebra")  # the shortest prompts
BENCHES = ("arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai", "mmlu", "winogrande", "boolq", "openbookqa")
TOL = 1e-3  # nats, float32
BATCH = 16  # evaluate()'s default: several contexts per prefill, so the left-padded shared prefill is exercised

pytestmark = pytest.mark.skipif(not (_status(MODEL)[0] and _status("benchmarks")[0]),
                                reason=f"packaged {MODEL} or benchmarks not converted (run `make setup` or "
                                       "`replaceme assets fetch`)")


def configure_like_simple_evaluate(task, num_fewshot: int, seed: int = 0) -> None:
    """simple_evaluate's per-task overrides (lm-eval 0.4.13): a YAML's explicit `num_fewshot: 0` is never
    overridden; a missing one becomes 0; the few-shot sampler is seeded with `fewshot_random_seed`."""
    if task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=seed)


@pytest.fixture(scope="module")
def requests_by_bench():
    """bench -> lm-eval Instances of its first N_DOCS documents (per MMLU subject), exactly as lm-eval builds them."""
    from lm_eval.tasks import TaskManager

    from replaceme_core import assets
    from replaceme_core.evaluation.local_tasks import render_local_tasks
    from replaceme_core.evaluation.suite import TASKS

    local = render_local_tasks(assets.benchmark_files(), BENCHES)
    names = {b: [local.names[b]] for b in BENCHES if b != "mmlu"}
    names["mmlu"] = [f"mmlu_{s}_local" for s in MMLU_SUBJECTS]
    logging.disable(logging.WARNING)
    try:
        tasks = TaskManager(include_path=str(local.include_path), include_defaults=False).load(
            [n for ns in names.values() for n in ns])["tasks"]
        out = {}
        for bench, ns in names.items():
            out[bench] = []
            for n in ns:
                configure_like_simple_evaluate(tasks[n], TASKS[bench].num_fewshot)
                tasks[n].build_all_requests(limit=N_DOCS, rank=0, world_size=1)
                out[bench] += tasks[n].instances
    finally:
        logging.disable(logging.NOTSET)
    assert tasks["winogrande_local"].get_config("num_fewshot") == 5  # the paper's 5-shot really is in the prompts
    return out


@pytest.fixture(scope="module")
def backends():
    """name -> lm-eval model on one shared float32 SmolLM2: the reference, HFLM's default, ours."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replaceme_core.assets import model_path
    from replaceme_core.evaluation.shared_context import SharedContextHFLM

    path = model_path(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    kw = {"pretrained": model, "tokenizer": tok, "device": "cpu", "batch_size": BATCH}
    logging.disable(logging.WARNING)  # HFLM warns about a pre-loaded model on every construction
    try:
        return {"reference": HFLM(logits_cache=False, **kw), "hflm_default": HFLM(**kw),
                "ours": SharedContextHFLM(**kw)}
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def scores(requests_by_bench, backends):
    """(backend, bench) -> [(loglikelihood, is_greedy)] in request order; each scored once for all tests."""
    with torch.no_grad():
        return {(name, b): lm.loglikelihood(reqs, disable_tqdm=True)
                for b, reqs in requests_by_bench.items() for name, lm in backends.items()}


def test_requests_are_lm_evals_own(requests_by_bench):
    """Every task produced log-likelihood requests for N_DOCS documents (per MMLU subject), with shared contexts
    where the task has them (the multiple-choice tasks whose choices are continuations)."""
    for bench, reqs in requests_by_bench.items():
        assert reqs and all(r.request_type == "loglikelihood" for r in reqs), bench
        per_task = len(MMLU_SUBJECTS) if bench == "mmlu" else 1
        assert len({(r.task_name, r.doc_id) for r in reqs}) == N_DOCS * per_task, bench
    for bench in ("arc_easy", "hellaswag", "sciq", "openbookqa", "mmlu", "piqa", "boolq"):
        contexts = {r.args[0] for r in requests_by_bench[bench]}
        assert len(contexts) < len(requests_by_bench[bench]), bench
    wino = requests_by_bench["winogrande"]  # partial scoring: one context per option, the same continuation
    assert len({r.args[1] for r in wino}) < len({r.args[0] for r in wino}) == len(wino)
    assert all(r.args[0].count("\n\n") >= 5 for r in wino)  # 5 few-shot examples, then the scored one


@pytest.mark.parametrize("bench", BENCHES)
def test_matches_unbatched_hflm(bench, scores, requests_by_bench):
    ref, got = scores[("reference", bench)], scores[("ours", bench)]
    assert len(ref) == len(got) == len(requests_by_bench[bench])
    deltas = [abs(a - b) for (a, _), (b, _) in zip(ref, got)]
    print(f"\n{bench}: {len(ref)} requests, max |Δll| vs HFLM(logits_cache=False) = {max(deltas):.2e}")
    for i, ((ll_ref, g_ref), (ll, g)) in enumerate(zip(ref, got)):
        assert abs(ll - ll_ref) <= TOL, (bench, i, requests_by_bench[bench][i].args, ll_ref, ll)
        assert g == g_ref, (bench, i, requests_by_bench[bench][i].args, g_ref, g)


def test_hflm_default_differs_only_on_colliding_requests(scores, requests_by_bench, backends):
    """HFLM's default may disagree with the reference only on requests whose `context + continuation[:-1]` (HFLM's
    tokens) equals that of another request with a longer continuation; the count per task is printed."""
    ref_lm = backends["reference"]
    counts = {}
    for bench, reqs in requests_by_bench.items():
        pairs = shared_context.hflm_token_pairs(ref_lm, reqs)
        longest = {}
        for ctx, cont in pairs:
            key = tuple(ctx + cont[:-1])
            longest[key] = max(longest.get(key, 0), len(cont))
        colliding = [len(cont) < longest[tuple(ctx + cont[:-1])] for ctx, cont in pairs]
        ref, default = scores[("reference", bench)], scores[("hflm_default", bench)]
        differs = [abs(a - b) > TOL or ga != gb for (a, ga), (b, gb) in zip(ref, default)]
        assert not any(d and not c for d, c in zip(differs, colliding)), bench
        counts[bench] = (sum(differs), sum(colliding), len(reqs))
    print("\nHFLM default (logits_cache=True) mis-scored / colliding / requests: "
          + ", ".join(f"{b} {d}/{c}/{n}" for b, (d, c, n) in counts.items()))
