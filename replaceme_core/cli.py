"""`replaceme prune | distances | eval | assets` — thin wrappers over the Python API."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PAPER_NOTE = "The paper's settings: --samples 8000 --max-length 1024 --batch-size 8 (SlimOrca)."


#: calibration sizes when neither the command line nor a registry method's paper defaults give them
DATA_DEFAULTS = {"samples": 512, "max_length": 512, "batch_size": 8}


def _add_calibration_args(p: argparse.ArgumentParser, required: bool = True, method_defaults: bool = False) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib", required=required, default=None, metavar="SOURCE",
                   help="packaged corpus (wiki, olmo-instructions, squad, wiki+olmo-instructions), a local .txt/.jsonl "
                        "file, or a hub dataset (Open-Orca/SlimOrca, HuggingFaceFW/fineweb, allenai/c4, wikitext, fineweb_and_orca)")
    # prune: None = the default above, or a registry method's own data default (--list-methods shows them)
    unset = (lambda k: None) if method_defaults else DATA_DEFAULTS.get
    by_method = ", or the --method's paper default: --list-methods" if method_defaults else ""
    g.add_argument("--samples", type=int, default=unset("samples"),
                   help=f"number of calibration samples (default 512{by_method}). " + PAPER_NOTE)
    g.add_argument("--max-length", type=int, default=unset("max_length"),
                   help=f"truncate each sample to this many tokens (default 512{by_method})")
    g.add_argument("--batch-size", type=int, default=unset("batch_size"),
                   help=f"sequences per forward pass (default 8{by_method})")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling the calibration set and for iterative solvers (default 0)")
    g.add_argument("--chat", choices=("auto", "never", "keep-system"), default="auto",
                   help="render instruction data with the tokenizer's chat template (auto; a default system turn the "
                        "template inserts is dropped, as the paper's Llama-3 template inserts none), the same keeping "
                        "that turn (keep-system), or as plain text (never)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="packaged model name (smollm2-135m-instruct, gemma-3-270m), local directory or hub id")
    g = p.add_argument_group("model loading")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                   help="weights dtype for calibration (default float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device-map", default=None, help="e.g. 'auto' to shard a model too large for one device (accelerate)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    """Model, tokenizer and calibration batches; the sample count is checked before the model loads. Without
    --calib (UIDL at an explicit start needs no data) the batches are empty."""
    from .io.data import check_available, load_texts, token_batches
    from .io.device import check_device
    from .io.models import load_model

    if args.device_map is None:  # one line naming what is available, before anything loads (issue 25)
        check_device(args.device, args.dtype)
    _fill_data_defaults(args)
    if args.calib is not None:
        check_available(args.calib, args.samples)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    load_s = time.perf_counter() - t0
    if args.calib is None:
        return model, tokenizer, [], {"source": None, "samples": 0}, load_s
    texts = load_texts(args.calib, tokenizer, args.samples, seed=args.seed, chat=args.chat)
    batches = list(token_batches(texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length))
    info = {"source": args.calib, "samples": len(texts), "max_length": args.max_length, "batch_size": args.batch_size,
            "seed": args.seed, "chat": args.chat}
    return model, tokenizer, batches, info, load_s


def _is_registry_method(name) -> bool:
    from .prune import METHODS

    return name is not None and name not in METHODS


def _fill_data_defaults(args) -> None:
    """Calibration sizes the command line left unset: a registry method's paper defaults, else DATA_DEFAULTS."""
    method_data = {}
    if _is_registry_method(getattr(args, "method", None)):
        from .methods import data_defaults, get_method

        method_data = data_defaults(get_method(args.method))
    for key, fallback in DATA_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, method_data.get(key, fallback))


def _method_listing() -> str:
    from .methods import data_defaults, load_all
    from .prune import METHODS

    lines = [f"ReplaceMe (this paper, arXiv 2505.02819): --method {' | '.join(METHODS)} (see --help)", "",
             "other depth-pruning methods (--method NAME, hyper-parameters with --option KEY=VALUE):"]
    for name, m in sorted(load_all().items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()) or "none"
        data = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in data_defaults(m).items()) or "none"
        lines += [f"  {name}: {m.summary}", f"      paper: {m.paper}", f"      options: {opts}",
                  f"      calibration defaults: {data}" + ("" if m.standard_checkpoint else "; in memory only (no checkpoint)")]
    return "\n".join(lines)


class _ListMethods(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_method_listing())
        parser.exit(0)


def prune_config_from_args(args):
    """The PruneConfig that `replaceme prune`'s options describe (also used by the torchrun entry point)."""
    from .prune import PruneConfig

    start = None
    if args.start is not None:
        start = [int(s) for s in str(args.start).split(",")]
        start = start[0] if len(start) == 1 else start
    return PruneConfig(
        num_blocks=args.num_blocks, method=args.method, structure=args.structure, start=start,
        num_transforms=args.num_transforms, separated=args.separated, selection=args.selection,
        distance_tokens=args.distance_tokens, ridge=args.ridge, optimizer=args.optimizer, lr=args.lr,
        epochs=args.epochs, batch_tokens=args.batch_tokens, l1=args.l1, l2=args.l2, seed=args.seed,
        max_iter=getattr(args, "max_iter", 100),
    )


def _cmd_prune(args) -> int:
    from .merge import save_checkpoint
    from .prune import prune

    if args.num_blocks <= 0:
        print(f"error: --num-blocks must be positive, got {args.num_blocks}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} already exists; choose another --out or pass --overwrite", file=sys.stderr)
        return 2
    if args.calib is None and not (args.method == "uidl" and args.start is not None) and not _is_registry_method(args.method):
        print("error: --calib is required (only --method uidl with --start needs no calibration data)", file=sys.stderr)
        return 2
    if _is_registry_method(args.method):
        return _prune_with_registry_method(args, out)
    if args.option:
        print(f"error: --option sets a registry method's hyper-parameters; --method {args.method} is ReplaceMe's own "
              "(its options are the flags in --help)", file=sys.stderr)
        return 2
    config = prune_config_from_args(args)
    model, tokenizer, batches, info, load_s = _load(args)
    info["model"] = args.model
    result = prune(model, batches, config, calibration_info=info, progress=not args.quiet)
    result.record["timings"]["load_s"] = load_s
    t0 = time.perf_counter()
    save_checkpoint(model, tokenizer, out, result.record, overwrite=args.overwrite)
    save_s = time.perf_counter() - t0
    rec = result.record
    print(f"removed blocks {rec['removed_blocks']} ({rec['num_layers_before']} → {rec['num_layers_after']} blocks), "
          f"method {rec['method']}, T folded into blocks {rec['blocks_receiving_T']}; calibration tokens {rec['calibration']['tokens']}")
    for run in rec["runs"]:
        extra = "".join(f", {k} {run[k]:.4f}" for k in ("distance", "relative_residual") if k in run)
        print(f"  run start {run['start']} n {run['n']}{extra}")
    print(f"saved {out} in {save_s:.1f}s (timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in rec["timings"].items()) + ")")
    return 0


#: ReplaceMe-only flags and their defaults: a registry method decides its blocks itself (its options: --option)
_REPLACEME_ONLY = {"start": None, "num_transforms": 1, "separated": False, "selection": "angular", "structure": "full",
                   "ridge": 0.0, "distance_tokens": "last"}


def _prune_with_registry_method(args, out: Path) -> int:
    """`replaceme prune MODEL --method NAME`: a method of `replaceme_core/methods/`, applied by run_method."""
    from .merge import save_checkpoint
    from .methods import get_method, parse_option, resolve_options
    from .methods.apply import run_method

    method = get_method(args.method)  # unknown name: one line (ValueError)
    options = dict(parse_option(method, text) for text in (args.option or []))
    resolve_options(method, options)  # unknown keys fail before the model loads
    given = [f"--{k.replace('_', '-')}" for k, v in _REPLACEME_ONLY.items() if getattr(args, k, v) != v]
    if given:
        print(f"error: {', '.join(given)} {'is' if len(given) == 1 else 'are'} ReplaceMe's; method {method.name!r} "
              f"chooses its blocks itself (its hyper-parameters: --option KEY=VALUE, see --list-methods)", file=sys.stderr)
        return 2
    if not method.standard_checkpoint:
        print(f"error: method {method.name!r} keeps a separate layer that a stock checkpoint cannot hold, so it cannot "
              "be saved: run it in memory (replaceme_core.methods.apply.run_method)", file=sys.stderr)
        return 2
    if args.calib is None and "calibration" in method.needs:
        print(f"error: --calib is required: method {method.name!r} needs calibration data", file=sys.stderr)
        return 2
    model, tokenizer, batches, info, load_s = _load(args)
    info["model"] = args.model
    result = run_method(model, batches, method.name, args.num_blocks, options=options, calibration_info=info,
                        progress=not args.quiet)
    rec = result.record
    if not rec["standard_checkpoint"]:
        print(f"error: method {method.name!r} returned a separate layer that a stock checkpoint cannot hold, so it "
              "cannot be saved: run it in memory (replaceme_core.methods.apply.run_method)", file=sys.stderr)
        return 2
    rec["seed"] = args.seed
    rec["timings"]["load_s"] = load_s
    t0 = time.perf_counter()
    save_checkpoint(model, tokenizer, out, rec, overwrite=args.overwrite)  # also refuses a model with a separate layer
    save_s = time.perf_counter() - t0
    print(f"removed blocks {rec['removed_blocks']} ({rec['num_layers_before']} → {rec['num_layers_after']} blocks), "
          f"method {rec['method']} ({', '.join(f'{k}={v}' for k, v in rec['options'].items()) or 'no options'}); "
          f"calibration tokens {rec['calibration']['tokens']}")
    print(f"saved {out} in {save_s:.1f}s (timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in rec["timings"].items()) + ")")
    return 0


def _cmd_distances(args) -> int:
    from .arch import get_adapter
    from .prune import calibrate
    from .select import run_scores

    model, _tokenizer, batches, info, _ = _load(args)
    calib = calibrate(model, batches, distances=True, progress=not args.quiet, desc="distances")
    matrix = calib.distances.matrix(args.metric, args.tokens)
    L = get_adapter(model).num_layers
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "layer," + ",".join(str(j) for j in range(L))
    rows = [f"{i}," + ",".join(f"{float(matrix[i, j]):.6f}" for j in range(L)) for i in range(L)]
    from .io.cache import atomic_write_text

    atomic_write_text(out, "\n".join([header, *rows]) + "\n")
    print(f"{args.metric} distance matrix between block outputs ({args.tokens} tokens, {calib.tokens} real tokens) → {out}")
    if args.num_blocks:
        scores = run_scores(calib.distances.matrix("angular", args.tokens), args.num_blocks)
        best = min(scores, key=scores.get)
        print(f"runs of {args.num_blocks} blocks (angular distance L_start-1 → L_start+n-1); best start {best}:")
        for s in sorted(scores):
            print(f"  start {s:3d}: {scores[s]:.4f}{'  ←' if s == best else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="replaceme", description="ReplaceMe: training-free depth pruning with linear block replacement.")
    parser.add_argument("--version", action="version", version=f"replaceme {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="remove blocks, fold the fitted linear map, save a standard checkpoint",
                       description="Choose a run of blocks (or take --start), estimate T on calibration data, fold it into "
                                   "the block before the run, delete the run and save a checkpoint that plain transformers loads, "
                                   "plus DIR/replaceme.json. Block indices are 0-based in the original model.")
    p.add_argument("--list-methods", action=_ListMethods,
                   help="list every --method (ReplaceMe's and the other depth-pruning methods, with paper, options and "
                        "calibration defaults) and exit")
    _add_model_args(p)
    _add_calibration_args(p, required=False, method_defaults=True)  # required unless uidl with --start (_cmd_prune)
    g = p.add_argument_group("what to remove")
    g.add_argument("--num-blocks", type=int, required=True, help="total number of blocks to remove")
    g.add_argument("--start", default=None, help="0-based first removed block (comma-separated, one per transform); block start-1 keeps its place and receives T. Default: chosen by --selection")
    g.add_argument("--num-transforms", type=int, default=1, help="split the removal into K runs, each with its own T (default 1)")
    g.add_argument("--separated", action="store_true", help="runs may not touch (the paper's Multi_LT_NC); otherwise touching runs merge into one")
    g.add_argument("--selection", choices=("angular", "bi", "ls-residual"), default="angular",
                   help="angular: argmin angular distance (paper); bi: ShortGPT Block Influence; ls-residual: the run whose "
                        "LS fit has the lowest residual on held-out calibration tokens (every other batch held out)")
    g.add_argument("--distance-tokens", choices=("last", "all"), default="last", help="tokens the distance averages over (last: as the official code)")
    g = p.add_argument_group("how to estimate T")
    g.add_argument("--method", default="ls", metavar="METHOD",
                   help="ls: closed-form least squares (Eq. 6); cosine: Eq. 8 with Adam; cosine-exact: Eq. 7; mse: MSE with Adam; "
                        "uidl: delete only (baseline); or another depth-pruning method by name (block-influence, sleb, "
                        "shortened-ppl, shortened-taylor, …: --list-methods)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyper-parameter of a registry --method (repeatable), typed by its default; see --list-methods")
    g.add_argument("--structure", choices=("full", "diagonal", "orthonormal"), default="full", help="shape of T (default full)")
    g.add_argument("--ridge", type=float, default=0.0, help="ridge α for LS, on the scale of un-normalised Gram sums as in the paper (default 0)")
    g.add_argument("--optimizer", choices=("adam", "lbfgs", "cg", "trust-ncg"), default="adam",
                   help="iterative solver: adam / lbfgs on mini-batches, cg / trust-ncg (SciPy) on the full batch (default adam)")
    g.add_argument("--max-iter", type=int, default=100, help="cg / trust-ncg iterations (default 100)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate of the iterative solver (default 1e-4, paper Table 14)")
    g.add_argument("--epochs", type=int, default=10, help="epochs of the iterative solver (default 10)")
    g.add_argument("--batch-tokens", type=int, default=1024, help="tokens per optimiser step (default 1024)")
    g.add_argument("--l1", type=float, default=0.0, help="L1 penalty α‖T‖₁ for iterative solvers")
    g.add_argument("--l2", type=float, default=0.0, help="L2 penalty α‖T‖² for iterative solvers")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist unless --overwrite)")
    g.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("distances", help="distance matrix between block outputs on calibration data (paper Fig. 7)",
                       description="Write the layer-by-layer distance matrix as CSV and, with --num-blocks, rank every run of n blocks.")
    _add_model_args(p)
    _add_calibration_args(p)
    p.add_argument("--metric", choices=("angular", "cosine", "l2"), default="angular", help="what to write (default angular distance)")
    p.add_argument("--tokens", choices=("last", "all"), default="last", help="tokens to average over (default last)")
    p.add_argument("--num-blocks", type=int, default=None, help="also rank every run of this many blocks")
    p.add_argument("--out", required=True, metavar="CSV", help="where to write the matrix")
    p.set_defaults(func=_cmd_distances)

    from . import assets, evaluation

    evaluation.register_cli(sub)
    assets.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
