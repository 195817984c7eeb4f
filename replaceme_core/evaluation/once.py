"""Two things lm-eval redoes on every `simple_evaluate` call, although they cannot change within a process, done once.

* torch's environment report (`torch.utils.collect_env.get_pretty_env_info`), which `simple_evaluate` records in its
  results: it runs `pip list` and a dozen other programs, ≈0.3 s a call.
* The Jinja prompt templates: `lm_eval.utils.apply_template` compiles its template string again for every document
  and field, ≈0.5 s per call on the main suite at 24 documents a task, more than a grouped follower's own scoring. A
  compiled template is immutable and renders a document the same way whenever it is used, so one compiled template
  per string serves every call.

Measured in a group of 4 variants (main suite, 24 documents a task): a follower's lm-eval turn took 2.0 s, of which
1.05 s building tasks (`task_manager`), 0.31 s the environment report and 0.49 s compiling templates. Both are patched
only inside `once_per_process()`, the way `quiet.quiet_lm_eval` replaces lm-eval's git probe.
"""
from __future__ import annotations

import contextlib
import functools

_ENV_REPORT: list[str] = []
_TEMPLATES: dict[str, object] = {}


def _env_report_once(original):
    @functools.wraps(original)
    def report() -> str:
        if not _ENV_REPORT:
            _ENV_REPORT.append(original())
        return _ENV_REPORT[0]

    return report


def _compiled_once(compile_template):
    @functools.wraps(compile_template)
    def from_string(source, *args, **kwargs):
        if args or kwargs or not isinstance(source, str):  # globals or a template class: compiled as asked
            return compile_template(source, *args, **kwargs)
        if source not in _TEMPLATES:
            _TEMPLATES[source] = compile_template(source)
        return _TEMPLATES[source]

    return from_string


@contextlib.contextmanager
def once_per_process():
    """Within the block, torch's environment report is computed once per process and each of lm-eval's prompt
    templates is compiled once."""
    import lm_eval.utils as lm_utils
    import torch.utils.collect_env as collect_env

    env, saved_report = lm_utils.env, collect_env.get_pretty_env_info
    saved_compile = vars(env).get("from_string")  # set when this block is nested in another
    collect_env.get_pretty_env_info = _env_report_once(saved_report)
    env.from_string = saved_compile or _compiled_once(type(env).from_string.__get__(env))
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = saved_report
        if saved_compile is None:
            del env.from_string  # the class's method again
        else:
            env.from_string = saved_compile
