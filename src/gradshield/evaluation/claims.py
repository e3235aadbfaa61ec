"""A paper's claims, tested on an experiment's stored per-example results.

A ``[[claims]]`` entry::

    id = "fgr-above-igr"
    text = "FGR above IGR on all four attacks at similar clean accuracy"
    source = "FGR paper, Sec. 5.4 ..."          # where the claim is made (quote it)
    kind = "greater"                             # greater | equal | best
    a = ["fgr-400", "fgr-700"]                   # models or grids
    b = ["igr-3000", "igr-5000"]
    pairing = "closest-clean"                    # closest-clean | each | zip (default each)
    clean_within = 0.03                          # closest-clean: pairs further apart are skipped
    suite = "fgr-paper"                          # the suite whose results are compared
    attacks = ["flow-SS", "flow-MS"]             # its attack ids; "clean" = clean accuracy
    a_through = "bpda"                           # optional: side a's run goes through BPDA/transfer
    metric = "robust"                            # robust (default), ar (both clean-correct), clean
    tolerance = 0.02                             # equal: the band the difference must stay in

Each comparison is paired over the same examples (the first n both runs have): the difference of
the two rates with its 95 % interval and McNemar's exact p-value (:mod:`.stats`). A comparison
supports ``greater`` when a is significantly higher (p < 0.05), contradicts it when b is;
supports ``equal`` when the interval lies inside +-tolerance, contradicts it when it lies
outside; ``best``: a (the best of its models) is compared with every b like ``greater``. The
claim HOLDS when every comparison supports it, DOES NOT HOLD when one contradicts it, and is NOT
SHOWN (within noise) otherwise; NOT TESTABLE when no comparison could be made (and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradshield.errors import GradshieldError
from gradshield.evaluation.stats import Paired, Rate, paired_masks, wilson

KINDS = ("greater", "equal", "best")
PAIRINGS = ("each", "zip", "closest-clean")
KEYS = ("id", "text", "source", "kind", "a", "b", "pairing", "clean_within", "suite", "attacks",
        "a_through", "b_through", "metric", "tolerance", "examples", "note", "alpha")
HOLDS, DOES_NOT_HOLD, NOT_SHOWN, NOT_TESTABLE = ("holds", "does not hold", "not shown (within noise)",
                                                  "not testable here")


@dataclass
class Comparison:
    a: str
    b: str
    attack: str
    rate_a: Rate
    rate_b: Rate
    paired: Paired
    outcome: str            # "supports", "contradicts", "inconclusive"
    clean_gap: float | None = None

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "attack": self.attack, "rate_a": self.rate_a.to_dict(),
                "rate_b": self.rate_b.to_dict(), "paired": self.paired.to_dict(),
                "outcome": self.outcome, "clean_gap": self.clean_gap}


@dataclass
class ClaimResult:
    id: str
    text: str
    source: str
    verdict: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "verdict": self.verdict,
                "comparisons": [c.to_dict() for c in self.comparisons], "notes": self.notes}


def check_claim(experiment, entry: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise GradshieldError(f"{where}: each [[claims]] must be a table")
    unknown = [k for k in entry if k not in KEYS]
    if unknown:
        raise GradshieldError(f"{where}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    for key in ("id", "text", "source", "kind", "a", "b"):
        if key not in entry:
            raise GradshieldError(f"{where}: needs {key} = ... (source: the paper's section or "
                                  "table, quoted)")
    if entry["kind"] not in KINDS:
        raise GradshieldError(f"{where}: kind must be one of {KINDS}, got {entry['kind']!r}")
    if entry.get("pairing", "each") not in PAIRINGS:
        raise GradshieldError(f"{where}: pairing must be one of {PAIRINGS}")
    if entry.get("metric", "robust") not in ("robust", "ar", "clean"):
        raise GradshieldError(f"{where}: metric must be robust, ar or clean")
    if entry["kind"] == "equal" and "tolerance" not in entry:
        raise GradshieldError(f"{where}: kind = \"equal\" needs tolerance = <largest difference>")
    a = experiment.expand(entry["a"], where)
    b = experiment.expand(entry["b"], where)
    if entry.get("pairing") == "zip" and len(a) != len(b):
        raise GradshieldError(f"{where}: pairing = \"zip\" needs as many a as b models")
    attacks = entry.get("attacks", ["clean"])
    if entry.get("suite") is None and any(x != "clean" for x in attacks):
        raise GradshieldError(f"{where}: attacks other than \"clean\" need suite = \"...\"")
    if entry.get("suite") is not None:
        ids = {s.id for s in experiment.suite(entry["suite"]).attacks}
        missing = [x for x in attacks if x != "clean" and x not in ids]
        if missing:
            raise GradshieldError(f"{where}: attacks {missing} are not in suite "
                                  f"{entry['suite']!r} (its ids: {sorted(ids)})")


def _indicator(outcome, metric: str) -> np.ndarray:
    return outcome.clean if metric == "clean" else outcome.robust


def _compare(results, entry, a: str, b: str, attack: str) -> Comparison | str:
    metric = entry.get("metric", "robust")
    suite = entry.get("suite")
    side_a = results.outcome(a, attack, suite=suite, through=entry.get("a_through"),
                             examples=entry.get("examples"))
    side_b = results.outcome(b, attack, suite=suite, through=entry.get("b_through"),
                             examples=entry.get("examples"))
    if side_a is None or side_b is None:
        return f"no stored results for {a if side_a is None else b} ({attack})"
    n = min(side_a.n, side_b.n)
    x, y = _indicator(side_a, metric)[:n], _indicator(side_b, metric)[:n]
    if metric == "ar":  # attack robustness: over the examples both models classify correctly
        both = side_a.clean[:n] & side_b.clean[:n]
        x, y = x[both], y[both]
    if len(x) == 0:
        return f"no examples to compare {a} and {b}"
    result = paired_masks(x, y)
    alpha = float(entry.get("alpha", 0.05))
    if entry["kind"] == "equal":
        tol = float(entry["tolerance"])
        outcome = ("supports" if -tol <= result.low and result.high <= tol else
                   "contradicts" if result.low > tol or result.high < -tol else "inconclusive")
    else:
        outcome = ("supports" if result.significant(alpha) and result.difference > 0 else
                   "contradicts" if result.significant(alpha) and result.difference < 0 else
                   "inconclusive")
    gap = float(side_a.clean[:n].mean() - side_b.clean[:n].mean())
    return Comparison(a, b, attack, wilson(int(x.sum()), len(x)), wilson(int(y.sum()), len(y)),
                      result, outcome, gap)


def _rate_of(results, entry, model: str, attack: str) -> float | None:
    """Side a's rate of ``model`` on ``attack`` (for choosing the best of several models)."""
    outcome = results.outcome(model, attack, suite=entry.get("suite"),
                              through=entry.get("a_through"), examples=entry.get("examples"))
    if outcome is None:
        return None
    metric = entry.get("metric", "robust")
    values = _indicator(outcome, metric)
    if metric == "ar":
        values = values[outcome.clean]
    return float(values.mean()) if values.size else None


def _clean_rate(results, model: str, entry) -> float | None:
    outcome = results.outcome(model, "clean", suite=entry.get("suite"),
                              examples=entry.get("examples"))
    return None if outcome is None else float(outcome.clean.mean())


def _pairs(results, experiment, entry, notes: list[str]) -> list[tuple[str, str]]:
    a = experiment.expand(entry["a"], "claim")
    b = experiment.expand(entry["b"], "claim")
    pairing = entry.get("pairing", "each")
    if pairing == "zip":
        return list(zip(a, b, strict=True))
    if pairing == "each":
        return [(x, y) for x in a for y in b if x != y]
    tolerance = float(entry.get("clean_within", 0.03))
    out = []
    for x in a:
        cx = _clean_rate(results, x, entry)
        candidates = [(abs(cx - cy), y) for y in b
                      if cx is not None and (cy := _clean_rate(results, y, entry)) is not None]
        if not candidates:
            notes.append(f"{x}: no stored clean accuracy to pair it by")
            continue
        gap, y = min(candidates)
        if gap > tolerance:
            notes.append(f"{x}: the closest clean accuracy among {b} is {y}'s, {100 * gap:.1f} "
                         f"points away (more than {100 * tolerance:.0f}): not compared")
            continue
        out.append((x, y))
    return out


def evaluate_claim(entry: dict, experiment, results) -> ClaimResult:
    """Test one claim on the stored results (see the module doc)."""
    notes: list[str] = []
    claim = ClaimResult(entry["id"], entry["text"], entry["source"], NOT_TESTABLE, notes=notes)
    if entry.get("note"):
        notes.append(str(entry["note"]))
    attacks = entry.get("attacks", ["clean"])
    if entry["kind"] == "best":
        a = experiment.expand(entry["a"], "claim")
        b = [m for m in experiment.expand(entry["b"], "claim") if m not in a]
        for attack in attacks:
            scored = [(value, m) for m in a
                      if (value := _rate_of(results, entry, m, attack)) is not None]
            if not scored:
                notes.append(f"{attack}: no stored results for {a}")
                continue
            best = max(scored)[1]
            for other in b:
                c = _compare(results, entry, best, other, attack)
                (claim.comparisons.append(c) if isinstance(c, Comparison) else notes.append(c))
    else:
        for x, y in _pairs(results, experiment, entry, notes):
            for attack in attacks:
                c = _compare(results, entry, x, y, attack)
                (claim.comparisons.append(c) if isinstance(c, Comparison) else notes.append(c))
    outcomes = [c.outcome for c in claim.comparisons]
    if not outcomes:
        claim.verdict = NOT_TESTABLE
    elif "contradicts" in outcomes:
        claim.verdict = DOES_NOT_HOLD
    elif all(o == "supports" for o in outcomes):
        claim.verdict = HOLDS
    else:
        claim.verdict = NOT_SHOWN
    return claim


def evaluate_claims(experiment, results) -> list[ClaimResult]:
    return [evaluate_claim(entry, experiment, results) for entry in experiment.claims]
