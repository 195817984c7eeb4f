"""Schema: what the Workbench / VisionBench read, and the type of every known key."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator

from .notebook_scan import _missing
from .report import Report


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _t(desc: str, ok: Callable[[Any], bool]):
    return desc, ok


POS_INT = _t("a positive integer", lambda v: _is_int(v) and v > 0)
NONNEG_INT = _t("an integer ≥ 0", lambda v: _is_int(v) and v >= 0)
INT = _t("an integer", _is_int)
POS_NUM = _t("a positive number", lambda v: _is_num(v) and v > 0)
NONNEG_NUM = _t("a number ≥ 0", lambda v: _is_num(v) and v >= 0)
STR = _t("a string", lambda v: isinstance(v, str) and bool(v))
BOOL = _t("true or false", lambda v: isinstance(v, bool))
POS_INTS = _t("a non-empty list of positive integers", lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v))
INTS = _t("a non-empty list of integers", lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) for x in v))
NUMS = _t("a non-empty list of numbers ≥ 0", lambda v: isinstance(v, list) and bool(v) and all(_is_num(x) and x >= 0 for x in v))
TASK_LIST = _t("a non-empty list of task names", lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v))
LIMIT = _t("null, a positive integer or a fraction in (0, 1)",
           lambda v: v is None or (_is_int(v) and v > 0) or (isinstance(v, float) and 0 < v < 1))
MAPPING = _t("a mapping", lambda v: isinstance(v, dict))
DEVICE = _t("a torch device such as cpu, cuda or cuda:1", lambda v: isinstance(v, str) and re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", v) is not None)


def _choice(*options):
    return _t("one of " + ", ".join(map(str, options)), lambda v: v in options)


def _methods():
    from ...prune import METHODS

    return _t("a non-empty list of methods (" + ", ".join(METHODS) + ")",
              lambda v: isinstance(v, list) and bool(v) and all(m in METHODS for m in v))


def _dtype():
    from ...io.models import DTYPES

    return _choice(*DTYPES)


MASK_RATIOS = _t("a list of ratios in [0, 1), or {size: [ratios]}",
                 lambda v: (isinstance(v, list) and bool(v) and all(_is_num(x) and 0 <= x < 1 for x in v)) or
                           (isinstance(v, dict) and all(isinstance(r, list) and all(_is_num(x) and 0 <= x < 1 for x in r) for r in v.values())))

#: What the Workbench / VisionBench themselves read (not counting the notebooks): required paths.
WORKBENCH_READS = ("name", "model", "num_blocks", "calibration.source", "calibration.samples", "calibration.batch_size",
                   "calibration.max_length", "perplexity.source", "perplexity.samples", "perplexity.max_length",
                   "perplexity.batch_size", "eval.main")
VISION_READS = ("vision.model", "vision.data", "vision.image_size", "vision.probe_images", "vision.calibration_images",
                "vision.test_images")


def schema() -> dict[str, tuple[str, Callable]]:
    """Dotted path pattern (`*` = any key / element) -> (description, predicate)."""
    suite = {"tasks": TASK_LIST, "limit": LIMIT, "batch_size": POS_INT, "source": _choice("auto", "local", "hub"),
             "backend": _choice("replaceme", "hf")}
    heal = {"steps": POS_INT, "batch_size": POS_INT, "seq_len": POS_INT, "lr": POS_NUM, "gradient_checkpointing": BOOL,
            "weight_decay": NONNEG_NUM, "lora_r": POS_INT, "lora_alpha": POS_NUM, "lora_targets": _choice("mlp", "all-linear")}
    s = {
        "name": STR, "model": STR, "dtype": _dtype(), "device": DEVICE, "num_blocks": POS_INT, "sweep_blocks": POS_INTS,
        "persist_activation_stores": BOOL, "cka_tokens": POS_INT,
        "calibration": MAPPING, "calibration.source": STR, "calibration.samples": POS_INT, "calibration.max_length": POS_INT,
        "calibration.batch_size": POS_INT, "calibration.seed": INT, "calibration.chat": _choice("auto", "never", "always"),
        "perplexity": MAPPING, "perplexity.source": STR, "perplexity.samples": POS_INT, "perplexity.max_length": POS_INT,
        "perplexity.batch_size": POS_INT,
        "eval": MAPPING, "eval.*": MAPPING, **{f"eval.*.{k}": v for k, v in suite.items()},
        "selection_sweep.stride": POS_INT, "selection_sweep.suite": STR,
        **{f"{sec}.{k}": v for sec in ("cosine", "cosine_converged", "cosine_ls_init")
           for k, v in {"epochs": POS_INT, "lr": POS_NUM, "batch_tokens": POS_INT, "init": _choice("identity", "ls"),
                        "tol": NONNEG_NUM}.items()},
        "vision.model": STR, "vision.data": STR, "vision.image_size": POS_INT, "vision.probe_images": POS_INT,
        "vision.calibration_images": POS_INT, "vision.test_images": POS_INT, "vision.batch_size": POS_INT,
        "vision.blocks": POS_INTS, "vision.distance_tokens": _choice("all", "last"), "vision.probe_C": POS_NUM,
        "vision.cv_folds": POS_INT, "vision.knn_k": POS_INT, "vision.seed": INT, "vision.device": DEVICE, "vision.dtype": _dtype(),
        "calibration_data.samples": POS_INT, "calibration_data.eval": MAPPING,
        **{f"calibration_data.eval.{k}": v for k, v in suite.items()},
        "calibration_data.sources": MAPPING, "calibration_data.sources.*": STR, "calibration_data.methods": _methods(),
        "calibration_data.source_methods.*": _methods(), "calibration_data.sizes": POS_INTS,
        "calibration_data.self_generated.source": STR, "calibration_data.self_generated.max_new_tokens": POS_INT,
        "calibration_data.self_generated.batch_size": POS_INT,
        "calibration_data.masking.sizes": POS_INTS, "calibration_data.masking.ratios": MASK_RATIOS,
        "calibration_data.masking.mode": STR, "calibration_data.masking.seed": INT, "calibration_data.masking.methods": _methods(),
        "calibration_data.task_specific.task": STR, "calibration_data.task_specific.samples": POS_INT,
        "calibration_data.task_specific.limit": LIMIT, "calibration_data.task_specific.seed": INT,
        "calibration_data.flat_margin": POS_NUM, "calibration_data.ppl_margin": POS_NUM,
        "repeatability.seeds": INTS, "repeatability.eval": MAPPING, **{f"repeatability.eval.{k}": v for k, v in suite.items()},
        "10_models_and_scale.suite": STR, "10_models_and_scale.method": _choice("ls", "cosine", "cosine-exact", "mse"),
        "10_models_and_scale.models": _t("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
        "10_models_and_scale.models.*.model": STR, "10_models_and_scale.models.*.sweep_blocks": POS_INTS,
        "10_models_and_scale.models.*.table_blocks": POS_INTS, "10_models_and_scale.models.*.batch_size": POS_INT,
        "10_models_and_scale.models.*.calibration_samples": POS_INT, "10_models_and_scale.models.*.limit": LIMIT,
        "12_other_benchmarks.variants": _methods(), "12_other_benchmarks.suites": MAPPING,
        **{f"12_other_benchmarks.suites.*.{k}": v for k, v in suite.items()},
        "objectives_and_solvers.suite": STR, "objectives_and_solvers.ridge_relative": NUMS,
        "objectives_and_solvers.paper_tokens": NUMS, "objectives_and_solvers.cosine_l2": POS_NUM,
        "objectives_and_solvers.cosine_l1": POS_NUM, "objectives_and_solvers.adam_fast_lr": POS_NUM,
        "objectives_and_solvers.lbfgs_lr": POS_NUM, "objectives_and_solvers.lbfgs_iters": POS_INT,
        "objectives_and_solvers.cg_max_iter": POS_INT, "objectives_and_solvers.trust_ncg_max_iter": POS_INT,
        "objectives_and_solvers.full_batch_rows": POS_INT, "objectives_and_solvers.mse_reference.optimizer": _choice("cg", "trust-ncg"),
        "objectives_and_solvers.mse_reference.max_iter": POS_INT, "objectives_and_solvers.eval_overrides.tasks": TASK_LIST,
        "structure_and_multi_lt.suite": STR, "structure_and_multi_lt.num_transforms": POS_INTS,
        "structure_and_multi_lt.eval_overrides.tasks": TASK_LIST,
        "healing.source": STR, "healing.samples": POS_INT, "healing.seed": INT, "healing.suite": STR,
        **{f"healing.{m}.{k}": v for m in ("lt", "full") for k, v in heal.items()},
        "cost.country_iso_code": _t("a 3-letter ISO code", lambda v: isinstance(v, str) and len(v) == 3 and v.isalpha()),
        **{f"cost.lora.{k}": v for k, v in heal.items()},
        "cost.paper_device_steps.*": POS_INT, "cost.paper_tokens_per_step": POS_INT,
    }
    return s


def _flatten(obj, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, v
            yield from _flatten(v, path)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict):
                yield from _flatten(v, f"{prefix}.*")


def _pattern_match(pattern: str, path: str) -> bool:
    """Segment by segment: `*` in the pattern matches one key or list element, nothing more."""
    a, b = pattern.split("."), path.split(".")
    return len(a) == len(b) and all(x == "*" or x == y for x, y in zip(a, b))


def check_schema(profile: dict, rep: Report) -> None:
    types = schema()
    n = 0
    for path, value in _flatten(profile):
        for pattern, (desc, ok) in types.items():
            if _pattern_match(pattern, path):
                n += 1
                if not ok(value):
                    rep.error(f"{path.replace('.*', '[]')} is {value!r}, expected {desc}")
                break
    for path in WORKBENCH_READS + (VISION_READS if "vision" in profile else ()):
        steps = tuple((k, False) for k in path.split("."))
        gone = _missing(profile, steps)
        if gone:
            rep.error(f"the Workbench reads {gone}, which the profile lacks")
    for name, spec in (profile.get("eval") or {}).items():
        if isinstance(spec, dict) and "tasks" not in spec:
            rep.error(f"eval.{name} has no `tasks`")
    from ..healing import HealConfig

    for where, mode, cfg in (("healing.lt", "lt", (profile.get("healing") or {}).get("lt")),
                             ("healing.full", "full", (profile.get("healing") or {}).get("full")),
                             ("cost.lora", "lora", (profile.get("cost") or {}).get("lora"))):
        if isinstance(cfg, dict):  # the healing code's own validation (unknown keys, ranges)
            try:
                HealConfig.from_dict({"mode": mode, "seed": 0, **cfg}).validate()
            except (TypeError, ValueError) as e:
                rep.error(f"{where}: {e}")
    rep.count("keys typed", n)
