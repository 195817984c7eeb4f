"""The declarative task table: which lm-eval task, which metric, which few-shot count; the paper's Avg-acc.

What the paper measures (paper.md §1.9, the official `utils.eval_model`, lm-eval HF backend): WinoGrande 5-shot;
BoolQ, RACE, OpenBookQA, PIQA, SciQ, LAMBADA-OpenAI 0-shot; "Avg-acc" is the mean of the six accuracy tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping



@dataclass(frozen=True)
class TaskSpec:
    hub: str            # lm-eval's own task (or group) name
    metric: str         # the metric reported for this task (paper's choice where the paper has one)
    num_fewshot: int    # paper default
    yaml: str | None    # local override YAML in replaceme_core/tasks (None: no offline data)


TASKS: dict[str, TaskSpec] = {
    # the paper's suite (official code: utils.eval_model)
    "race": TaskSpec("race", "acc", 0, None),
    "winogrande": TaskSpec("winogrande", "acc", 5, "winogrande.yaml"),
    "piqa": TaskSpec("piqa", "acc_norm", 0, "piqa.yaml"),
    "boolq": TaskSpec("boolq", "acc", 0, "boolq.yaml"),
    "openbookqa": TaskSpec("openbookqa", "acc_norm", 0, "openbookqa.yaml"),
    "sciq": TaskSpec("sciq", "acc_norm", 0, "sciq.yaml"),
    "lambada_openai": TaskSpec("lambada_openai", "acc", 0, "lambada_openai.yaml"),
    # outside the paper's suite: acc_norm where lm-eval reports it, else acc
    "arc_easy": TaskSpec("arc_easy", "acc_norm", 0, "arc_easy.yaml"),
    "arc_challenge": TaskSpec("arc_challenge", "acc_norm", 0, "arc_challenge.yaml"),
    "hellaswag": TaskSpec("hellaswag", "acc_norm", 0, "hellaswag.yaml"),
    "mmlu": TaskSpec("mmlu", "acc", 0, "mmlu.yaml"),
    # BIG-bench multiple-choice tasks that BBH draws from (Fig. 9 analogue), 0-shot, from the bigbench sdist
    # (assets.bigbench_files); the override YAMLs include lm-eval's bigbench/multiple_choice/<task>.yaml. The hub
    # fallback is lm-eval's bigbench_<task>_multiple_choice (for logical deduction: all three subtasks).
    **{f"bigbench_{t}": TaskSpec(f"bigbench_{h}_multiple_choice", "acc", 0, f"bigbench_{t}.yaml") for t, h in (
        ("causal_judgment", "causal_judgment"), ("date_understanding", "date_understanding"),
        ("disambiguation_qa", "disambiguation_qa"), ("hyperbaton", "hyperbaton"),
        ("logical_deduction_three_objects", "logical_deduction"), ("navigate", "navigate"), ("snarks", "snarks"),
        ("sports_understanding", "sports_understanding"))},
    # Open LLM Leaderboard v2 (paper Fig. 9; hub only), the leaderboard's few-shot counts and main metrics
    "leaderboard_bbh": TaskSpec("leaderboard_bbh", "acc_norm", 3, None),
    "leaderboard_gpqa": TaskSpec("leaderboard_gpqa", "acc_norm", 0, None),
    "leaderboard_math_hard": TaskSpec("leaderboard_math_hard", "exact_match", 4, None),
    "leaderboard_musr": TaskSpec("leaderboard_musr", "acc_norm", 0, None),
    "leaderboard_mmlu_pro": TaskSpec("leaderboard_mmlu_pro", "acc", 5, None),
}
ALIASES = {"lambada": "lambada_openai", "obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}

#: the paper's "Avg-acc": mean over these (those that ran), each with its TASKS metric
AVG_ACC_TASKS: tuple[str, ...] = ("race", "winogrande", "piqa", "boolq", "openbookqa", "sciq")
#: the paper's full lm-eval suite
PAPER_TASKS: tuple[str, ...] = AVG_ACC_TASKS + ("lambada_openai",)
#: default for evaluate() and `replaceme eval`: the paper's suite. RACE runs from the hub when it is
#: reachable and is skipped with a note when it is not (no offline data exists for it).
DEFAULT_TASKS: tuple[str, ...] = PAPER_TASKS

TASKS_DIR = Path(__file__).parent / "tasks"
MMLU_SUBJECT_TEMPLATE = "_mmlu_subject_template.yaml"


def canonical_task(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return key


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    if tasks is None:
        return list(DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        c = canonical_task(t)
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError("no tasks given")
    return out


def resolve_fewshot(task: str, num_fewshot: int | Mapping[str, int] | None) -> int:
    """Paper default (WinoGrande 5, others 0) unless overridden: an int applies to every task, a mapping per task."""
    if num_fewshot is None:
        return TASKS[task].num_fewshot
    if isinstance(num_fewshot, Mapping):
        over = {canonical_task(k): int(v) for k, v in num_fewshot.items()}
        return over.get(task, TASKS[task].num_fewshot)
    return int(num_fewshot)


def avg_acc(per_task_values: Mapping[str, float]) -> tuple[float | None, list[str]]:
    """The paper's Avg-acc: mean of the AVG_ACC_TASKS values present (values already in each task's metric)."""
    used = [t for t in AVG_ACC_TASKS if t in per_task_values and per_task_values[t] is not None]
    if not used:
        return None, []
    return sum(float(per_task_values[t]) for t in used) / len(used), used
