"""Evaluation: lm-eval tasks on packaged data or lm-eval's own hub tasks, perplexity, a result cache keyed by content.

``suite`` (the declarative task table), ``local_tasks`` (our override YAMLs in ``tasks/`` rendered onto packaged
data), ``model_ref`` (content identity of a model), ``runner`` (``evaluate()``), ``perplexity``, ``cli``.
"""
from .cli import register_cli, summary_table
from .local_tasks import lm_eval_tasks_dir, render_local_tasks
from .model_ref import hash_model_dir, hash_state_dict, hash_tokenizer
from .perplexity import perplexity, perplexity_many
from .runner import evaluate, evaluate_many
from .suite import (ALIASES, AVG_ACC_TASKS, DEFAULT_TASKS, PAPER_TASKS, TASKS, TaskSpec, avg_acc, parse_tasks,
                    resolve_fewshot)

__all__ = ["evaluate", "evaluate_many", "perplexity", "perplexity_many", "summary_table", "register_cli", "render_local_tasks", "lm_eval_tasks_dir",
           "hash_state_dict", "hash_model_dir", "hash_tokenizer", "TASKS", "TaskSpec", "ALIASES", "AVG_ACC_TASKS",
           "PAPER_TASKS", "DEFAULT_TASKS", "avg_acc", "parse_tasks", "resolve_fewshot"]
