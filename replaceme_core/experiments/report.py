"""Tables beside the paper's numbers, claim checks with honest uncertainty, and writing them to figures/."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from ..io.cache import atomic_write_text


@lru_cache(maxsize=1)
def _paper_numbers() -> dict:
    text = resources.files("replaceme_core").joinpath("resources/paper_numbers.yaml").read_text()
    return yaml.safe_load(text)


def paper_table(key: str) -> pd.DataFrame:
    """One of the paper's tables as printed (see resources/paper_numbers.yaml); `df.attrs` has ref and title."""
    tables = _paper_numbers()
    if key not in tables:
        raise KeyError(f"no paper table {key!r}; known: {', '.join(tables)}")
    t = tables[key]
    df = pd.DataFrame(t["rows"], columns=t["columns"])
    df.attrs.update({k: t[k] for k in ("ref", "title") if k in t})
    df.attrs["unit"] = t.get("unit", "fraction")
    return df


def figures_dir(path: str | Path | None = None) -> Path:
    out = Path(path or "figures")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    cols = [str(c) for c in df.columns]
    fmt = lambda v: (format(v, floatfmt) if isinstance(v, float) and math.isfinite(v) else ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_table(df: pd.DataFrame, name: str, out_dir: str | Path | None = None, caption: str | None = None) -> dict[str, Path]:
    """Write `name.md` (with caption) and `name.csv` atomically; return their paths."""
    out = figures_dir(out_dir)
    md = (f"**{caption}**\n\n" if caption else "") + _markdown(df) + "\n"
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv"}
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["csv"], df.to_csv(index=False))
    return paths


# --- uncertainty -----------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (accuracy over n documents)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over paired documents with a 95% percentile bootstrap interval (resampling documents)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired bootstrap needs two non-empty per-document arrays of equal length")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    boots = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


@dataclass
class Claim:
    """A qualitative claim of the paper, checked on our run."""

    claim: str
    ref: str
    evidence: str
    verdict: str  # held | not held | inconclusive
    uncertainty: str = ""
    id: str = ""  # the claim's id in the claims register (resources/claims.yaml)
    data_to_decide: float = float("nan")  # inconclusive claims: × the data for 80% power at the observed effect
    stage: str = "exploratory"  # or "confirmatory": re-tested on fresh documents (experiments/confirmatory.py)
    estimate: float = float("nan")  # the statistic and its 95% interval as numbers (the forest plot reads them)
    lo: float = float("nan")
    hi: float = float("nan")


def verdict_from_interval(lo: float, hi: float, expect_positive: bool = True) -> str:
    """held if the 95% interval excludes 0 on the expected side, not held if on the other, else inconclusive."""
    if expect_positive:
        return "held" if lo > 0 else ("not held" if hi < 0 else "inconclusive")
    return "held" if hi < 0 else ("not held" if lo > 0 else "inconclusive")


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    return pd.DataFrame([asdict(c) for c in claims], columns=CLAIM_COLUMNS)


CLAIM_COLUMNS = ["id", "claim", "ref", "evidence", "verdict", "uncertainty", "data_to_decide", "stage", "estimate", "lo", "hi"]
VERDICT_COLORS = {"held": "#1b9e77", "not held": "#d95f02", "inconclusive": "#7f7f7f", "untestable": "#bbbbbb"}


def forest_plot(rows: pd.DataFrame, register, path: str | Path) -> Path:
    """figures/fig_claims.png: one line per claim of `rows` (a claims frame: id, verdict, stage, estimate, lo, hi):
    its estimate and 95% interval on the claim's own scale (a ratio on a log scale), the no-effect line (solid), the
    decision bound(s) of its test (dashed), an arrow towards the side the paper's claim lies on, coloured by verdict.
    A row without numbers (written before the register recorded them) is listed with "no interval"."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = max(len(rows), 1)
    fig, axes = plt.subplots(k, 1, figsize=(9.5, 0.42 * k + 0.9), squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], rows.iterrows()):
        spec = register.spec(r["id"])
        est, lo, hi = (float(r.get(c, float("nan"))) if pd.notna(r.get(c, float("nan"))) else float("nan") for c in ("estimate", "lo", "hi"))
        bounds = {"non_inferior": [spec.null - spec.margin], "not_worse_lower": [spec.null + spec.margin],
                  "equivalent": [spec.null - spec.margin, spec.null + spec.margin]}.get(spec.kind, [spec.null])
        color = VERDICT_COLORS.get(r["verdict"], "#7f7f7f")
        label = f"{'[C] ' if r.get('stage') == 'confirmatory' else ''}{r['id']}"
        ax.set_yticks([0], [label], fontsize=7)
        ax.tick_params(axis="x", labelsize=6, pad=1)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.text(1.01, 0.5, r["verdict"], transform=ax.transAxes, fontsize=7, va="center", color=color, weight="bold")
        if not all(math.isfinite(x) for x in (est, lo, hi)):
            ax.set_xticks([]); ax.text(0.5, 0.5, "no interval", transform=ax.transAxes, ha="center", va="center", fontsize=7)
            continue
        log = spec.null == 1 and lo > 0 and min(bounds) > 0
        if log:
            ax.set_xscale("log")
        ax.axvline(spec.null, color="#333333", lw=0.8)
        for b in bounds:
            if b != spec.null or spec.kind not in ("greater", "less", "at_least", "at_most"):
                ax.axvline(b, color="#333333", lw=0.8, ls="--")
        ax.plot([lo, hi], [0, 0], color=color, lw=2.2, solid_capstyle="butt")
        ax.plot([est], [0], "o", color=color, ms=4)
        xs = [lo, hi, *bounds, spec.null]
        span = (max(xs) / min(xs)) if log else (max(xs) - min(xs)) or 1.0
        left, right = (min(xs) / span ** 0.08, max(xs) * span ** 0.08) if log else (min(xs) - 0.08 * span, max(xs) + 0.08 * span)
        ax.set_xlim(left, right)
        side = {"greater": 1, "at_least": 1, "non_inferior": 1, "less": -1, "at_most": -1, "not_worse_lower": -1}.get(spec.kind)
        anchor = bounds[0]
        if side is not None:  # the paper's direction: the side of the bound its claim is on
            ax.annotate("", xy=(anchor * (span ** (0.06 * side)) if log else anchor + side * 0.06 * span, 0.88),
                        xytext=(anchor, 0.88), xycoords=("data", "axes fraction"),
                        arrowprops={"arrowstyle": "->", "color": "#1f78b4", "lw": 1.2})
        else:  # equivalence: the paper's reading lies between the bounds
            ax.plot(bounds, [0.88, 0.88], color="#1f78b4", lw=1.0, transform=ax.get_xaxis_transform())
        ax.set_ylim(-0.6, 0.8)
    axes[0, 0].set_title("Claims: estimate and 95% interval; solid = no effect, dashed = decision bound, blue = the "
                         "paper's direction; [C] = confirmatory (fresh documents)", fontsize=8)
    fig.tight_layout(h_pad=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def relative_performance(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


# --- comparing evaluation results (the dicts returned by evaluate.evaluate) --------------------

def per_doc_scores(result: dict, task: str, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(document keys, per-document values): the task's reported metric (0/1), or `key` (e.g. LAMBADA's "loglikelihood").

    A group task (MMLU) numbers documents within each subtask, so its keys are "subtask/doc_id" strings.
    """
    entry = result["tasks"][task]
    docs = entry["per_doc"]
    key = key or entry["metric"]
    if key not in docs:
        raise KeyError(f"{task} has no per-document {key!r} (has {sorted(docs)})")
    ids = np.asarray(docs["doc_id"])
    if "subtask" in docs:
        ids = np.asarray([f"{t}/{i}" for t, i in zip(docs["subtask"], docs["doc_id"])])
    return ids, np.asarray(docs[key], dtype=float)


def _aligned(a: dict, b: dict, task: str, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    ids_a, va = per_doc_scores(a, task, key)
    ids_b, vb = per_doc_scores(b, task, key)
    common, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
    if common.size == 0:
        raise ValueError(f"no common documents for {task}")
    return va[ia], vb[ib]


def accuracy_difference(a: dict, b: dict, tasks: Sequence[str], n_boot: int = 2000, seed: int = 0,
                        key: str | None = None) -> tuple[float, float, float]:
    """Mean over tasks of (accuracy of a − accuracy of b), with a 95% bootstrap interval; with `key` another
    per-document score (e.g. "margin", the gold answer's log-likelihood margin over the best distractor).

    Documents are resampled within each task (paired: the same documents for a and b), so the interval
    reflects how many documents were scored — the dominant uncertainty of a small-budget run.
    """
    rng = np.random.default_rng(seed)
    diffs, boots = [], np.zeros(n_boot)
    for task in tasks:
        va, vb = _aligned(a, b, task, key)
        d = va - vb
        diffs.append(d.mean())
        boots += d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    boots /= len(tasks)
    return float(np.mean(diffs)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def margin_difference(a: dict, b: dict, tasks: Sequence[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of the paired per-document difference of gold-answer margins (nats), 95% bootstrap."""
    return accuracy_difference(a, b, tasks, n_boot=n_boot, seed=seed, key="margin")


def retained_fraction(a: dict, base: dict, tasks: Sequence[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of `a` over the tasks ÷ that of `base` (RP), with a 95% bootstrap resampling documents within
    each task, paired (the same documents for both)."""
    rng = np.random.default_rng(seed)
    num, den = np.zeros(n_boot), np.zeros(n_boot)
    point_num = point_den = 0.0
    for task in tasks:
        va, vb = _aligned(a, base, task)
        idx = rng.integers(0, va.size, size=(n_boot, va.size))
        num += va[idx].mean(axis=1)
        den += vb[idx].mean(axis=1)
        point_num, point_den = point_num + va.mean(), point_den + vb.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = num / den
    boots = boots[np.isfinite(boots)]
    point = point_num / point_den if point_den else float("nan")
    if boots.size == 0:
        return float(point), float("nan"), float("nan")
    return float(point), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def log_perplexity_ratio(a: dict, b: dict, task: str = "lambada_openai", n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """log(ppl_a / ppl_b) on LAMBADA (lm-eval: ppl = exp(−mean target log-likelihood)), 95% paired bootstrap."""
    va, vb = _aligned(a, b, task, "loglikelihood")
    d = vb - va  # log ppl_a − log ppl_b = mean(−ll_a) − mean(−ll_b)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def heldout_log_ratio(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """log(ppl_a / ppl_b) on the held-out texts (`evaluation.perplexity` results of two models on the same texts),
    token-weighted as the perplexity itself, with a 95% paired bootstrap that resamples whole texts."""
    na, nb = np.asarray(a["doc_nll"], dtype=float), np.asarray(b["doc_nll"], dtype=float)
    tok = np.asarray(a["doc_tokens"], dtype=float)
    if na.shape != nb.shape or not np.array_equal(tok, np.asarray(b["doc_tokens"], dtype=float)):
        raise ValueError("held-out perplexities of different texts (or tokenisations) cannot be paired")
    d = na - nb
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1)
    return float(d.sum() / tok.sum()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def heldout_columns(heldout: dict[str, dict]) -> dict[str, dict]:
    """variant → {"heldout_ppl": ppl} from variant → `evaluation.perplexity` result (for results_frame's extras)."""
    return {name: {"heldout_ppl": h["ppl"]} for name, h in heldout.items()}


def perplexity_claim(register, claim_id: str, a: str, b: str, heldout: dict, results: dict | None = None,
                     notebook: str | None = None, label: str | None = None, prefix: str = "", on: str = "heldout") -> Claim:
    """A perplexity claim "a vs b", decided on the held-out texts (paired over them: thousands of tokens) and shown
    with LAMBADA's ratio (the paper's statistic; one word per document, so its interval is wide) beside it — or, with
    on="lambada", the other way round: for comparisons where a model was calibrated or trained on the held-out
    texts' own domain, which would favour it. `heldout` maps variant → `evaluation.perplexity` result; `results`
    maps variant → lm-eval results (needed for on="lambada")."""
    if on not in ("heldout", "lambada"):
        raise ValueError(f"on must be 'heldout' or 'lambada', not {on!r}")
    name = label or f"{a} / {b}"
    h = tuple(math.exp(x) for x in heldout_log_ratio(heldout[a], heldout[b]))
    held_text = f"held-out ppl ratio {name} = {h[0]:.3g} ({heldout[a]['ppl']:.4g} vs {heldout[b]['ppl']:.4g})"
    lam = None
    if results is not None and all("lambada_openai" in results[v]["tasks"] for v in (a, b)):
        lam = tuple(math.exp(x) for x in log_perplexity_ratio(results[a], results[b]))
    if on == "lambada":
        if lam is None:
            raise ValueError(f"{claim_id}: a LAMBADA-decided claim needs both models' LAMBADA results")
        r, lo, hi = lam
        evidence = f"{prefix}LAMBADA ppl ratio {name} = {r:.3g}; {held_text} [{h[1]:.3g}, {h[2]:.3g}]"
    else:
        r, lo, hi = h
        evidence = prefix + held_text + (f"; LAMBADA ratio {lam[0]:.3g} [{lam[1]:.3g}, {lam[2]:.3g}]" if lam else "")
    return register.check(claim_id, r, lo, hi, evidence=evidence, interval=f"ratio 95% CI [{lo:.3g}, {hi:.3g}]",
                          notebook=notebook)


def results_frame(results: dict[str, dict], extra: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per variant: each task's reported metric, Avg-acc (paper definition), LAMBADA ppl, extras."""
    rows = []
    for name, res in results.items():
        row = {"variant": name}
        for task, entry in res["tasks"].items():
            if task != "lambada_openai":
                row[task] = entry["value"]
        row["avg_acc"] = res.get("avg_acc")
        row["lambada_ppl"] = res.get("lambada_ppl")
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    return pd.DataFrame(rows)
