"""The contract every depth-pruning method keeps, and the registry that finds them by name.

A method is one file in this package. It decorates one function with `register(...)`:

    @register("sleb", summary="...", paper="arXiv 2402.09025", defaults={"early_barrier": 1, ...},
              data={"samples": 5, "max_length": 2048}, needs=("calibration", "block_inputs"))
    def sleb(model, batches, num_blocks, options, progress) -> Outcome: ...

The function scores or selects blocks with the shared machinery (`capture.run_capture`, `prune.calibrate`,
`stats`, the helpers in `methods/common.py`, e.g. `PartialForward` to run blocks from cached hidden states) — never a forward loop or a fold of its own — may edit kept weights in
place where the method says so (LaCo's merge, Prune&Comp's scale, Streamline's trained layer), and returns an
`Outcome`: which runs go, and the map (if any) that replaces each. `run_method` applies it with `merge` (folded: a
stock checkpoint) or `separate` (an extra layer: in memory only), and writes the record `replaceme.json` keeps.

`defaults` are the method's hyper-parameters (its paper's or released code's values; `--option KEY=VALUE` overrides
them, typed by the default's type). `data` are its calibration-data defaults — `samples`, `max_length`, `batch_size`
— which `replaceme prune` applies when the command line does not give them (in Python the caller builds the batches;
`data_defaults(method)` says what the paper used). A `calib_samples`/`calib_max_length`/`calib_batch_size` key in
`defaults` counts as data too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..merge import Replacement
from ..select import Run, merge_touching

#: what a method may declare it needs: calibration data, distances between block outputs, each block's input hidden
#: states, gradients (one backward pass), training steps
NEEDS = frozenset({"calibration", "distances", "block_inputs", "gradients", "training"})


@dataclass
class Outcome:
    """What a method decided. `replacements` fold into the checkpoint (T None: plain deletion); `separate` keeps
    each T as its own layer after the kept block (`separate.apply_separate`), which no stock checkpoint can hold.
    A method returns one kind or the other. `record` holds its scores, choices and costs (passes, tokens)."""

    replacements: list[Replacement] = field(default_factory=list)
    separate: list[Replacement] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    @property
    def runs(self) -> list[Run]:
        return [r.run for r in self.replacements + self.separate]

    @property
    def removed(self) -> list[int]:
        return sorted(b for run in self.runs for b in run.removed)


MethodFn = Callable[[nn.Module, Sequence[dict], int, Mapping[str, Any], bool], Outcome]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    summary: str
    paper: str
    defaults: Mapping[str, Any]
    needs: frozenset[str]
    standard_checkpoint: bool = True  # False: the result carries a separate layer (in memory only)
    data: Mapping[str, Any] = field(default_factory=dict)  # calibration-data defaults: samples, max_length, batch_size


REGISTRY: dict[str, Method] = {}


DATA_KEYS = ("samples", "max_length", "batch_size")


def register(name: str, *, summary: str, paper: str, defaults: Mapping[str, Any] | None = None,
             needs: Sequence[str] = ("calibration",), standard_checkpoint: bool = True,
             data: Mapping[str, Any] | None = None):
    """Decorator: put a method function in the registry under `name`."""
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"method {name!r} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    bad_data = set(data or {}) - set(DATA_KEYS)
    if bad_data:
        raise ValueError(f"method {name!r} declares unknown data defaults {sorted(bad_data)}; known: {list(DATA_KEYS)}")

    def deco(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name, fn, summary, paper, dict(defaults or {}), frozenset(needs), standard_checkpoint,
                                dict(data or {}))
        return fn

    return deco


def get_method(name: str) -> Method:
    from . import load_all

    load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown depth-pruning method {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def data_defaults(method: Method) -> dict[str, Any]:
    """The calibration-data defaults of a method (samples, max_length, batch_size), from `data` or `calib_*` options."""
    out = {k[len("calib_"):]: v for k, v in method.defaults.items() if k.startswith("calib_") and k[len("calib_"):] in DATA_KEYS}
    out.update(method.data)
    return out


def parse_option(method: Method, text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line, VALUE typed by the default's type (bool: true/false/1/0/yes/no; a None
    default: int, then float, then none/null, else the string)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    if key not in method.defaults:
        known = ", ".join(sorted(method.defaults)) or "none"
        raise ValueError(f"method {method.name!r} takes no option {key}; its options: {known}")
    default = method.defaults[key]
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return key, low in ("true", "1", "yes")
        if isinstance(default, int):
            return key, int(raw)
        if isinstance(default, float):
            return key, float(raw)
        if isinstance(default, str):
            return key, raw
        if default is None:
            if raw.lower() in ("none", "null"):
                return key, None
            for cast in (int, float):
                try:
                    return key, cast(raw)
                except ValueError:
                    pass
            return key, raw
        if isinstance(default, (list, tuple)):
            return key, type(default)(x.strip() for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"option {key} of method {method.name!r} takes a {type(default).__name__} "
                         f"(default {default!r}), got {raw!r}") from None
    raise ValueError(f"option {key} of method {method.name!r} cannot be set from the command line")


def resolve_options(method: Method, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's paper defaults overridden by `options`; an option the method does not take is an error."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        known = ", ".join(sorted(method.defaults)) or "none"
        raise ValueError(f"method {method.name!r} takes no option {', '.join(unknown)}; its options: {known}")
    return {**method.defaults, **options}


def check_outcome(outcome: Outcome, num_layers: int, num_blocks: int, name: str) -> None:
    """A method must remove exactly `num_blocks` distinct blocks, in runs that neither overlap nor touch."""
    if outcome.replacements and outcome.separate:
        raise ValueError(f"method {name!r} returned both folded and separate replacements: return one kind")
    runs = outcome.runs
    if len(merge_touching(runs)) != len(runs):
        raise ValueError(f"method {name!r} returned runs {runs} that overlap or touch: merge them into one run")
    removed = outcome.removed
    if len(removed) != num_blocks or len(set(removed)) != len(removed):
        raise ValueError(f"method {name!r} removed blocks {removed}, not {num_blocks} distinct blocks")
    if removed and (removed[0] < 0 or removed[-1] >= num_layers):
        raise ValueError(f"method {name!r} removed blocks {removed} outside 0..{num_layers - 1}")


def timed_call(method: Method, model, batches, num_blocks: int, options: Mapping[str, Any], progress: bool):
    t0 = time.perf_counter()
    outcome = method.fn(model, batches, num_blocks, options, progress)
    return outcome, time.perf_counter() - t0
