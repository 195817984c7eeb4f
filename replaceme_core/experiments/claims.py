"""The claims register: every paper claim a notebook checks, with its test declared before any number is seen.

`replaceme_core/resources/claims.yaml` lists each claim once: its id, the notebook that checks it, the paper's
reference and numbers, the statistic (paired over the same documents or tokens), and the test. A notebook only
*measures*: it hands the register the estimate and its 95% interval (`Register.check`), and the register decides
the verdict from the declared test. A test or margin may change only with a `reason:` written beside it.

Tests (`test.kind`), on the statistic's own scale; `test.value` (``null`` below) is the no-effect value (0 for a
difference, 1 for a ratio) or the claimed level. One reading for every kind: a claim is **held** when every value of
its 95% interval satisfies it, **not held** when no value does, and **inconclusive** otherwise. So an interval that
only touches the claimed side at its edge (``[0, 0]`` for "A is less accurate than B": the two models agree on every
document) is *not held*, since no value in it is a decrease:

* ``greater`` / ``less``: held when the interval lies strictly above / below ``null``, not held when it lies at or
  on the other side of it;
* ``non_inferior`` ("at least as good", margin m, larger is better; ``not_worse_lower`` for lower-is-better): held
  when the interval lies strictly above ``null - m`` (below ``null + m``), not held when it lies at or beyond that bound;
* ``equivalent`` (margin m): held when the interval lies strictly within ``null ± m``, not held when it lies at or
  outside one of the bounds, inconclusive otherwise;
* ``at_least`` / ``at_most`` (a threshold ``null``): the same reading as greater / less, for a claimed level
  (e.g. "keeps 90% of the accuracy": the interval of the retained fraction against 0.90).

A deterministic quantity (a fitted residual, a count) has no sampling noise: pass ``lo = hi = estimate``.

A claim may declare ``requires: <claim id>``: a premise without which its statistic means nothing (e.g. retention on
tasks where the unpruned model itself is at chance). The premise is checked first in the same notebook; unless it is
held, the claim's verdict is **untestable** — the model cannot show it — and its row says which premise failed.
An id with ``*`` declares a family (e.g. ``sweep.ls_vs_uidl.acc.n*``): the test of every instance another profile
checks (other block counts, sizes, models) that has no entry of its own.

For an inconclusive claim the register also says how much more data would decide it (`data_to_decide`): the factor
by which the documents (texts, windows) scored would have to grow for the interval to clear the deciding bound with
80% power, were the true effect the one observed — a planning number for a larger run, not evidence. The interval is
taken to shrink as 1/√n: factor = (h · (z₀.₉₇₅ + z₀.₈) / (z₀.₉₇₅ · δ))², h the interval's half on the bound's side,
δ the estimate's distance to the bound; a ratio (``null`` 1, positive interval) on the log scale; infinite when the
estimate sits on the bound. A claim whose interval is not a sampling interval (an extrapolation range, Monte-Carlo
error) declares ``sampling: false`` and gets none.

Two stages (experiments/confirmatory.py). Every claim above is *exploratory*: estimated on the profile's suites.
A *confirmatory* claim ``confirm.<id>`` (``confirm.<id>@<tag>`` for an instance, e.g. the blocks it removes) re-tests
exploratory claim ``<id>`` on fresh documents with ``<id>``'s declared test unchanged, so it needs no entry of its
own; notebook 14 checks it. An equivalence claim ``equiv.<id>`` is declared in the register (kind ``equivalent``, its
margin and reason written before the run) and checked beside it on the same documents (``@<tag>`` instances share
the entry). A confirmatory claim is decided when its verdict is held or not held, or its equivalence is held.

`write_claims_page` assembles figures/CLAIMS.md from the notebooks' claims_*.csv files and the register: every
claim with its verdict, interval, notebook and table, a count at the top, and the register's claims that no
notebook checked in this run.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from ..io.cache import atomic_write_text
from .power import data_factor

VERDICTS = ("held", "not held", "inconclusive", "untestable")
CONFIRMATORY_NOTEBOOK = "14_confirmatory"
KINDS = ("greater", "less", "at_least", "at_most", "non_inferior", "not_worse_lower", "equivalent")


class RegisterError(ValueError):
    """The register (or a notebook's use of it) is malformed."""


@dataclass(frozen=True)
class ClaimSpec:
    id: str
    notebook: str
    claim: str
    ref: str
    statistic: str
    kind: str
    null: float = 0.0
    margin: float = 0.0
    paper: str = ""
    files: tuple[str, ...] = ()
    headline: bool = False
    reason: str = ""
    requires: str = ""  # a premise claim's id: unless it is held, this claim is untestable
    sampling: bool = True  # its interval shrinks with more documents (false: an extrapolation range, Monte-Carlo error)

    @property
    def stage(self) -> str:
        """'confirmatory' for a re-test on fresh documents (``confirm.``) or its equivalence (``equiv.``)."""
        return "confirmatory" if self.id.startswith(("confirm.", "equiv.")) else "exploratory"

    def decide(self, lo: float, hi: float) -> str:
        """The verdict of the declared test for a 95% interval [lo, hi]."""
        if any(math.isnan(x) for x in (lo, hi)):
            return "inconclusive"
        lo, hi = min(lo, hi), max(lo, hi)
        k, c, m = self.kind, self.null, self.margin
        if k in ("greater", "at_least"):
            return "held" if lo > c else ("not held" if hi <= c else "inconclusive")
        if k in ("less", "at_most"):
            return "held" if hi < c else ("not held" if lo >= c else "inconclusive")
        if k == "non_inferior":
            return "held" if lo > c - m else ("not held" if hi <= c - m else "inconclusive")
        if k == "not_worse_lower":
            return "held" if hi < c + m else ("not held" if lo >= c + m else "inconclusive")
        # equivalent
        return "held" if (lo > c - m and hi < c + m) else ("not held" if (lo >= c + m or hi <= c - m) else "inconclusive")

    def data_to_decide(self, estimate: float, lo: float, hi: float) -> float:
        """How many times the data would decide this claim with 80% power at the observed effect (module docstring);
        NaN where more data would not narrow the interval or the numbers are missing."""
        if not self.sampling or any(math.isnan(x) for x in (estimate, lo, hi)):
            return float("nan")
        lo, hi = min(lo, hi), max(lo, hi)
        bounds = {"non_inferior": [self.null - self.margin], "not_worse_lower": [self.null + self.margin],
                  "equivalent": [self.null - self.margin, self.null + self.margin]}.get(self.kind, [self.null])
        if self.null == 1 and lo > 0 and estimate > 0 and min(bounds) > 0:  # a ratio: symmetric on the log scale
            estimate, lo, hi, bounds = math.log(estimate), math.log(lo), math.log(hi), [math.log(b) for b in bounds]
        if self.kind == "equivalent" and bounds[0] < estimate < bounds[1]:
            need = bounds  # held: the interval must clear both bounds
        else:
            need = [min(bounds, key=lambda b: abs(estimate - b))]  # the bound the estimate is nearest to (or beyond)

        return max(data_factor((estimate - lo) if b < estimate else (hi - estimate), estimate - b) for b in need)

    def test_text(self) -> str:
        bound = {"greater": f"> {self.null:g}", "less": f"< {self.null:g}", "at_least": f"≥ {self.null:g}",
                 "at_most": f"≤ {self.null:g}", "non_inferior": f"> {self.null - self.margin:g} (margin {self.margin:g})",
                 "not_worse_lower": f"< {self.null + self.margin:g} (margin {self.margin:g})",
                 "equivalent": f"within {self.null:g} ± {self.margin:g}"}[self.kind]
        return bound


@dataclass
class Register:
    claims: dict[str, ClaimSpec] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)  # what this process has decided so far (premises)

    def check(self, claim_id: str, estimate: float, lo: float, hi: float, evidence: str = "",
              interval: str | None = None, notebook: str | None = None):
        """The register's verdict on one measured claim, as a report.Claim row (id, claim, ref, evidence, verdict,
        uncertainty). `interval` overrides the printed interval (e.g. a ratio shown as ×); `notebook`, when given,
        must be the claim's own."""
        from .report import Claim

        spec = self.spec(claim_id)
        if notebook is not None and notebook != spec.notebook:
            raise RegisterError(f"claim {claim_id!r} belongs to notebook {spec.notebook}, not {notebook}")
        verdict = spec.decide(float(lo), float(hi))
        if interval is None:
            interval = f"95% CI [{lo:+.3g}, {hi:+.3g}]"
        uncertainty = f"{interval}; test {spec.test_text()}"
        if spec.requires:
            premise = self.verdicts.get(spec.requires)
            if premise is None:
                raise RegisterError(f"claim {claim_id!r} requires {spec.requires!r}: check that premise first")
            if premise != "held":
                verdict = "untestable"
                uncertainty += f"; untestable: its premise `{spec.requires}` is {premise}"
        self.verdicts[claim_id] = verdict
        factor = spec.data_to_decide(float(estimate), float(lo), float(hi)) if verdict == "inconclusive" else float("nan")
        return Claim(claim=spec.claim, ref=spec.ref, evidence=evidence or f"{spec.statistic} = {estimate:+.3g}",
                     verdict=verdict, uncertainty=uncertainty, id=claim_id, data_to_decide=factor, stage=spec.stage,
                     estimate=float(estimate), lo=float(min(lo, hi)), hi=float(max(lo, hi)))

    def spec(self, claim_id: str) -> ClaimSpec:
        if claim_id not in self.claims and claim_id.startswith(("confirm.", "equiv.")):
            return self._confirmatory_spec(claim_id)
        if claim_id not in self.claims:
            for pattern, spec in self.claims.items():  # a family entry: other profiles' instances, same test
                if "*" in pattern and fnmatch.fnmatchcase(claim_id, pattern):
                    return dataclasses.replace(spec, id=claim_id)
            raise RegisterError(f"claim {claim_id!r} is not in the register (replaceme_core/resources/claims.yaml): "
                                "declare it there, with its test, before checking it")
        return self.claims[claim_id]

    def _confirmatory_spec(self, claim_id: str) -> ClaimSpec:
        """`confirm.<id>[@tag]`: <id>'s declared test on the confirmatory documents; `equiv.<id>@tag`: the entry
        `equiv.<id>` (module docstring)."""
        prefix, rest = claim_id.split(".", 1)
        base, _, tag = rest.partition("@")
        if prefix == "equiv":
            if f"equiv.{base}" not in self.claims:
                raise RegisterError(f"claim {claim_id!r}: no equivalence test `equiv.{base}` is declared in the register")
            spec = self.claims[f"equiv.{base}"]
        else:
            spec = self.spec(base)
            spec = dataclasses.replace(spec, notebook=CONFIRMATORY_NOTEBOOK, requires="", headline=spec.headline,
                                       reason=f"re-test of `{base}` on the confirmatory documents, its test unchanged")
        where = f" (blocks {tag})" if tag and tag[0].isdigit() else (f" ({tag})" if tag else "")
        return dataclasses.replace(spec, id=claim_id, claim=spec.claim + where)

    def of_notebook(self, notebook: str) -> list[ClaimSpec]:
        return [c for c in self.claims.values() if c.notebook == notebook]


def parse_register(entries: list[dict], where: str = "claims.yaml") -> Register:
    reg = Register()
    for i, e in enumerate(entries):
        missing = {"id", "notebook", "claim", "ref", "statistic", "test"} - set(e)
        if missing:
            raise RegisterError(f"{where}: entry {i} ({e.get('id', '?')}) lacks {sorted(missing)}")
        test = dict(e["test"])
        kind = test.pop("kind", None)
        if kind not in KINDS:
            raise RegisterError(f"{where}: claim {e['id']}: test kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind in ("non_inferior", "not_worse_lower", "equivalent") and not test.get("margin"):
            raise RegisterError(f"{where}: claim {e['id']}: a {kind} test needs a positive margin")
        if not isinstance(e.get("sampling", True), bool):
            raise RegisterError(f"{where}: claim {e['id']}: sampling must be true or false")
        unknown = set(test) - {"value", "margin"}
        if unknown:
            raise RegisterError(f"{where}: claim {e['id']}: unknown test keys {sorted(unknown)}")
        if e["id"] in reg.claims:
            raise RegisterError(f"{where}: claim id {e['id']!r} appears twice")
        files = e.get("files", ())
        reg.claims[e["id"]] = ClaimSpec(
            id=e["id"], notebook=e["notebook"], claim=e["claim"], ref=e["ref"], statistic=e["statistic"], kind=kind,
            null=float(test.get("value", 0.0)), margin=float(test.get("margin", 0.0)), paper=str(e.get("paper", "")),
            files=tuple([files] if isinstance(files, str) else files), headline=bool(e.get("headline", False)),
            reason=str(e.get("reason", "")), requires=str(e.get("requires", "")), sampling=e.get("sampling", True))
    for spec in reg.claims.values():
        if spec.requires and spec.requires not in reg.claims:
            raise RegisterError(f"{where}: claim {spec.id} requires {spec.requires!r}, which is not in the register")
        if spec.requires and reg.claims[spec.requires].notebook != spec.notebook:
            raise RegisterError(f"{where}: claim {spec.id}'s premise {spec.requires} is checked by another notebook")
    return reg


@functools.lru_cache(maxsize=1)
def load_register() -> Register:
    text = resources.files("replaceme_core.resources").joinpath("claims.yaml").read_text()
    return parse_register(yaml.safe_load(text) or [])


def collect(figures: str | Path) -> pd.DataFrame:
    """Every claims_*.csv row the notebooks wrote, with its notebook (from the file name)."""
    frames = []
    for path in sorted(Path(figures).glob("claims_*.csv")):
        df = pd.read_csv(path)
        for col in ("data_to_decide", "estimate", "lo", "hi"):  # written before the register reported them
            if col not in df:
                df[col] = float("nan")
        df["stage"] = ["confirmatory" if str(i).startswith(("confirm.", "equiv.")) else "exploratory" for i in df["id"]]
        df["notebook"] = path.stem.removeprefix("claims_")
        df["table"] = path.with_suffix(".md").name
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["id", "claim", "ref", "evidence", "verdict", "uncertainty", "data_to_decide", "stage", "estimate", "lo", "hi",
                 "notebook", "table"])


def counts(df: pd.DataFrame) -> dict[str, int]:
    return {v: int((df["verdict"] == v).sum()) for v in VERDICTS}


def data_text(factor: float) -> str:
    """'≈ 4.2× the data', 'no effect seen' (the estimate sits on the bound), '' (not reported)."""
    if math.isnan(factor):
        return ""
    if math.isinf(factor):
        return "no effect seen"
    if factor > 1000:
        return "> 1000× the data"
    return f"≈ {factor:.1f}× the data" if factor < 10 else f"≈ {factor:.0f}× the data"


def decide_summary(df: pd.DataFrame) -> str:
    """One sentence: how much more data the inconclusive claims would need (80% power at the observed effect)."""
    f = pd.to_numeric(df.loc[df["verdict"] == "inconclusive", "data_to_decide"], errors="coerce")
    known = f.dropna()
    if known.empty:
        return ""
    # an inconclusive interval contains its bound, so no factor is below (z₀.₉₇₅ + z₀.₈)² / z₀.₉₇₅² ≈ 2.04
    inf = known.map(math.isinf)
    parts = [f"{int((known <= 4).sum())} within 4× the data", f"{int(((known > 4) & (known <= 10)).sum())} within 4–10×",
             f"{int(((known > 10) & (known <= 100)).sum())} within 10–100×", f"{int(((known > 100) & ~inf).sum())} beyond 100×",
             f"{int(inf.sum())} with no effect seen (the estimate on the bound)"]
    unsized = len(f) - len(known)
    return (f"How far the {len(f)} inconclusive claims are from a verdict, were the true effect the one observed (80% "
            f"power; documents, texts or windows scaled alike; a planning number for a larger run, not evidence): "
            + ", ".join(parts) + (f"; {unsized} not sized (no sampling interval to scale)" if unsized else "") + ".")


def _spec_or_none(register: Register, claim_id) -> ClaimSpec | None:
    try:
        return register.spec(str(claim_id))
    except RegisterError:
        return None


def write_claims_page(figures: str | Path = "figures", register: Register | None = None) -> Path:
    """figures/CLAIMS.md: the count, the headline claims, then every claim by notebook; register claims not run."""
    register = register or load_register()
    df = collect(figures)
    n = len(df)
    c = counts(df)
    share = (lambda k: f"{c[k] / n:.0%}") if n else (lambda k: "–")
    summary = (f"**{n} claims checked: {c['held']} held ({share('held')}), {c['not held']} not held "
               f"({share('not held')}), {c['inconclusive']} inconclusive ({share('inconclusive')}), {c['untestable']} "
               f"untestable ({share('untestable')}).**")
    if c["untestable"]:
        summary += (" Untestable: a declared premise of the claim (`requires:` in the register) is not held, so this model "
                    "cannot show it either way; each such row names the premise.")
    method = ("Each claim's statistic and test are declared in `replaceme_core/resources/claims.yaml` before the run; "
              "the notebooks measure, the register decides. Intervals are 95% (paired bootstrap over the same "
              "documents or tokens unless the row says otherwise).")
    from .confirmatory import base_id, decided
    from .report import forest_plot

    is_headline = lambda i: _spec_or_none(register, i) is not None and _spec_or_none(register, i).headline  # noqa: E731
    shown = df[[is_headline(i) or s == "confirmatory" for i, s in zip(df["id"], df["stage"])]] if n else df
    forest_plot(shown, register, Path(figures) / "fig_claims.png")
    conf = df[df["stage"] == "confirmatory"] if n else df
    dec = decided(df) if n else decided(df.iloc[:0])
    stages = (f" Exploratory stage (every notebook, the profile's suites): {len(df) - len(conf)} claims. Confirmatory stage "
              f"(notebook 14, fresh documents disjoint from every exploratory one; claims and counts by the profile's "
              f"`confirmatory` rule, declared before the run): {len(dec)} claims re-tested, {int(dec['decided'].sum())} "
              f"decided ({dec['decided'].mean():.0%}: held or not held, or the declared equivalence held), beside "
              f"{len(conf) - len(dec)} equivalence tests." if len(dec) else "")
    lines = ["# Claims register: what holds on this run", "",
             "![every headline and confirmatory claim: estimate, 95% interval, no-effect line, decision bound, the paper's "
             "direction, verdict](fig_claims.png)", "",
             "*The forest plot: every headline and confirmatory claim ([C]) — estimate and 95% interval on the claim's own "
             "scale, the no-effect line (solid), the decision bound of its declared test (dashed), the paper's direction "
             "(blue arrow; a blue bar: the equivalence region), coloured by verdict.*", "",
             summary + stages, "", method, ""]
    sizing = decide_summary(df[df["stage"] == "exploratory"] if n else df)
    if sizing:
        lines += [sizing, ""]

    def row(r) -> str:
        spec = _spec_or_none(register, r.get("id"))
        ref = spec.ref if spec else r["ref"]
        nb = r["notebook"]
        more = data_text(float(r["data_to_decide"])) if r["verdict"] == "inconclusive" else ""
        verdict = f"**{r['verdict']}**" + (f" ({more})" if more else "")
        return (f"| {r['claim']} | {ref} | {r['evidence']} | {verdict} | {r['uncertainty']} | "
                f"[`{nb}`](notebooks/{nb}.ipynb), [table]({r['table']}) |")

    header = ["| claim | paper | evidence | verdict | interval; test | notebook |", "|---|---|---|---|---|---|"]
    if len(dec):
        by_id = {r["id"]: r for _, r in df.iterrows()}
        lines += ["## Confirmatory stage: the declared claims on fresh documents", "",
                  "Each row: the exploratory verdict (the profile's suites), then the same test on the confirmatory "
                  "documents only, and the declared equivalence test beside it (its margin in the register).", "",
                  "| claim | exploratory (notebook) | confirmatory | interval; test | equivalence | decided |",
                  "|---|---|---|---|---|---|"]
        for _, d in dec.iterrows():
            r = by_id[d["id"]]
            base = by_id.get(base_id(d["id"]))
            eq = by_id.get("equiv." + d["id"][len("confirm."):])
            explo = (f"**{base['verdict']}** ({base['uncertainty'].split('; test')[0]}; [`{base['notebook']}`]"
                     f"(notebooks/{base['notebook']}.ipynb))" if base is not None else "not run")
            eqtext = f"**{eq['verdict']}** ({eq['uncertainty']})" if eq is not None else "–"
            lines.append(f"| {r['claim']} | {explo} | **{r['verdict']}** | {r['uncertainty']} | {eqtext} | "
                         f"{'yes' if d['decided'] else 'no'} |")
        lines.append("")
    head = df[[is_headline(i) for i in df["id"]]] if n else df.iloc[:0]
    if len(head):
        lines += ["## Headline claims (both stages)", "", *header, *(row(r) for _, r in head.iterrows()), ""]
    for nb, group in df.groupby("notebook", sort=True):
        k = counts(group)
        lines += [f"## {nb} — {k['held']} held, {k['not held']} not held, {k['inconclusive']} inconclusive"
                  + (f", {k['untestable']} untestable" if k["untestable"] else ""), "",
                  *header, *(row(r) for _, r in group.iterrows()), ""]
    checked = set(df["id"]) if "id" in df else set()
    checked_bases = {i.split("@", 1)[0] for i in checked}
    missing = [s for s in register.claims.values() if s.id not in checked_bases and "*" not in s.id]
    if missing:
        lines += ["## In the register, not checked by this run", "",
                  *(f"- `{s.id}` ({s.notebook}): {s.claim}" for s in missing), ""]
    path = Path(figures) / "CLAIMS.md"
    atomic_write_text(path, "\n".join(lines))
    return path
