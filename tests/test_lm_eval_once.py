"""What lm-eval redoes on every call, done once per process (`evaluation.once`), gives what it gives itself; and
nothing stays patched outside the block."""
from __future__ import annotations

import lm_eval.utils as lm_utils
import torch.utils.collect_env as collect_env
from lm_eval.loggers.utils import add_env_info

from replaceme_core.evaluation import once


def test_templates_compile_once_and_render_the_same(monkeypatch):
    env = lm_utils.env
    compiled, compile_template = [], type(env).from_string
    monkeypatch.setattr(type(env), "from_string",
                        lambda self, source, *a, **k: compiled.append(source) or compile_template(self, source, *a, **k))
    docs = [{"q": "Is ice cold?", "a": ["yes", "no"]}, {"q": "Is fire cold?", "a": ["no", "yes"]}]
    plain = [lm_utils.apply_template("Question: {{q}} {{a|join(', ')}}", d) for d in docs]
    compiled.clear()
    monkeypatch.setattr(once, "_TEMPLATES", {})
    with once.once_per_process():
        with once.once_per_process():  # nested: still one compilation per template
            inner = [lm_utils.apply_template("Question: {{q}} {{a|join(', ')}}", d) for d in docs]
        outer = [lm_utils.apply_template("Question: {{q}} {{a|join(', ')}}", d) for d in docs]
        other = lm_utils.apply_template("{{q}}", docs[0])
    assert inner == outer == plain == ["Question: Is ice cold? yes, no", "Question: Is fire cold? no, yes"]
    assert other == "Is ice cold?"
    assert compiled.count("Question: {{q}} {{a|join(', ')}}") == 1 and compiled.count("{{q}}") == 1
    assert "from_string" not in vars(env)  # the class's method again
    lm_utils.apply_template("{{q}}", docs[0])
    assert compiled.count("{{q}}") == 2  # outside the block lm-eval compiles as it always does


def test_environment_report_is_computed_once(monkeypatch):
    calls = []
    monkeypatch.setattr(collect_env, "get_pretty_env_info", lambda: calls.append(1) or f"report {len(calls)}")
    monkeypatch.setattr(once, "_ENV_REPORT", [])
    first, second = {}, {}
    with once.once_per_process():
        add_env_info(first)
    with once.once_per_process():
        add_env_info(second)
    assert len(calls) == 1 and first["pretty_env_info"] == second["pretty_env_info"] == "report 1"
    assert collect_env.get_pretty_env_info() == "report 2"  # restored outside the block
