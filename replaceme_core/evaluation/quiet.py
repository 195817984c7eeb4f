"""Two lines of lm-eval noise silenced where they arise, and nothing else.

* `simple_evaluate` records a git hash by running `git describe` in the working directory; outside a git checkout
  git prints "fatal: not a git repository" on our stderr. The probe is run with git's stderr discarded instead, once
  per working directory.
* HFLM warns that "`pretrained` model kwarg is not of type `str`" whenever it is handed a loaded model, which is
  how we always call it (the model is loaded, hashed and moved by us). That one record is filtered out.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess

PRETRAINED_WARNING = "`pretrained` model kwarg is not of type `str`"


def _git_hash_quietly() -> str | None:
    return _git_hash_in(os.getcwd())


@functools.lru_cache(maxsize=None)
def _git_hash_in(_cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # git not installed
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class _DropPretrainedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return PRETRAINED_WARNING not in record.getMessage()


@contextlib.contextmanager
def quiet_lm_eval():
    """Within the block: lm-eval's git probe is silent and HFLM's loaded-model warning is dropped."""
    import lm_eval.evaluator as evaluator

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropPretrainedWarning()
    saved = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash_quietly
    hf_logger.addFilter(drop)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved
        hf_logger.removeFilter(drop)
