"""lm-eval's `TaskManager`, each task built once per process and few-shot count.

Why: building an lm-eval task reads every document of its dataset (HellaSwag's 10k rows are decoded one by one) and
takes ≈0.2 s per task on a CPU, for 5 tasks ≈1 s per `simple_evaluate` call. `evaluate_many` calls it once per model
and few-shot count, and the notebooks call it a hundred times, always for the same tasks. Built tasks are kept here,
keyed by the task name and the few-shot count they are built for: `simple_evaluate` writes the few-shot count into the
task's config and will not overwrite a 0 it finds there, so a task is never shared between counts. Everything a call
sets on a task besides (the few-shot seed, its requests) is set again by the next call.
"""
from __future__ import annotations

from typing import Any

from lm_eval.tasks import TaskManager


class BuiltOnceTaskManager(TaskManager):
    """A `TaskManager` whose string specs are built once per few-shot count (`for_fewshot` before each call)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._built: dict[tuple[str, Any], Any] = {}
        self.num_fewshot: Any = None

    def for_fewshot(self, num_fewshot) -> "BuiltOnceTaskManager":
        self.num_fewshot = num_fewshot
        return self

    def _load_spec(self, spec):
        if not isinstance(spec, str):
            return super()._load_spec(spec)
        key = (spec, self.num_fewshot)
        if key not in self._built:
            self._built[key] = super()._load_spec(spec)
        return self._built[key]


_MANAGERS: dict[tuple[str | None, bool], BuiltOnceTaskManager] = {}


def task_manager(include_path: str | None, include_defaults: bool) -> BuiltOnceTaskManager:
    """The process's manager for these task folders (local task folders are named by their content hash, so a path
    always means the same tasks)."""
    key = (include_path, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = BuiltOnceTaskManager(include_path=include_path, include_defaults=include_defaults)
    return _MANAGERS[key]
