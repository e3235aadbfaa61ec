"""Automated gradient-masking checks: each returns a named :class:`Finding` with its evidence.

The checks (after Athalye et al. 2018 and Carlini et al. 2019, "On evaluating adversarial
robustness"; AutoAttack's ``checks.py``):

1. ``single_step_beats_iterative``: FGSM fools more examples than PGD at the same budget;
2. ``gradient_free_or_transfer_beats_white_box``: an attack that does not use the defended model's
   own autograd gradient (gradient-free, transfer, BPDA, random noise) beats white-box PGD at the
   same budget, in total or on a share of the examples;
3. ``success_flat_in_budget``: white-box success does not rise with the budget (or falls);
4. ``unbounded_attack_fails``: PGD with an unbounded budget (Linf eps = 1: any image is allowed)
   does not reach ~100 % success;
5. ``gradient_disagrees_with_finite_differences``: the autograd directional derivative of the loss
   differs from a central finite difference (float64 by default);
6. ``non_finite_or_zero_gradients``: input gradients are inf/NaN (e.g. stacked GCM overflow) or
   exactly zero.

Everything is a pure function of a model, data and (optionally) precomputed attack outcomes,
:class:`AttackRecord`. Rates are over the clean-correct examples (the AR convention), so the
success of an attack = 1 - AR. :func:`diagnose` runs them all and returns a :class:`Verdict`.
A flag is evidence of masking, not proof; a clean verdict is not proof of robustness.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError
from gradshield.metrics import predict
from gradshield.utils import eval_mode
from gradshield.validation import check_images, check_labels

#: Attack kinds an :class:`AttackRecord` may carry.
SINGLE_STEP = "single-step"          # white-box, one gradient step (FGSM)
ITERATIVE = "iterative"              # white-box, many gradient steps (PGD, C&W)
GRADIENT_FREE = "gradient-free"      # Square, evolution strategies
TRANSFER = "transfer"                # crafted on a surrogate model
BPDA = "bpda"                        # white-box with the defense's backward replaced
NOISE = "noise"                      # random perturbation of the same size (a baseline)
KINDS = (SINGLE_STEP, ITERATIVE, GRADIENT_FREE, TRANSFER, BPDA, NOISE)
#: Kinds that do not follow the defended model's own autograd gradient.
NON_AUTOGRAD = (GRADIENT_FREE, TRANSFER, BPDA, NOISE)


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``flagged`` means "looks like gradient masking"; ``skipped`` means
    the check had no data to run on (then ``flagged`` is False)."""

    name: str
    flagged: bool
    summary: str
    evidence: dict = field(default_factory=dict)
    skipped: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "flagged": self.flagged, "skipped": self.skipped,
                "summary": self.summary, "evidence": self.evidence}


@dataclass(frozen=True)
class Verdict:
    """All findings; ``masked`` is True when any check is flagged."""

    findings: tuple[Finding, ...]

    @property
    def masked(self) -> bool:
        return any(f.flagged for f in self.findings)

    @property
    def flagged(self) -> list[str]:
        return [f.name for f in self.findings if f.flagged]

    def text(self) -> str:
        lines = []
        for f in self.findings:
            mark = "SKIP" if f.skipped else ("FLAG" if f.flagged else "ok  ")
            lines.append(f"  [{mark}] {f.name}: {f.summary}")
        head = (f"gradient masking suspected ({len(self.flagged)} of {len(self.findings)} checks "
                "flagged): gradient-based robustness numbers for this model are not to be trusted"
                if self.masked else
                "no sign of gradient masking in these checks (not a proof of robustness)")
        return "\n".join([f"Verdict: {head}", *lines])

    def to_dict(self) -> dict:
        return {"masked": self.masked, "flagged": self.flagged,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass(frozen=True)
class AttackRecord:
    """A precomputed attack outcome on a fixed set of examples.

    ``success`` (N,) bool over the same examples as ``clean_correct`` in the checks; ``kind`` is
    one of :data:`KINDS`; ``norm`` "linf"/"l2"/"l1"; ``eps`` the budget ([0, 1] pixel scale).
    """

    name: str
    kind: str
    norm: str
    eps: float
    success: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GradshieldError(f"unknown attack kind {self.kind!r}; choose one of {KINDS}")

    @classmethod
    def from_result(cls, name: str, kind: str, norm: str, eps: float, result) -> AttackRecord:
        """From an :class:`gradshield.attacks.AttackResult` (uses its ``success``)."""
        return cls(name, kind, norm, float(eps), result.success.detach().cpu().bool())


# --------------------------------------------------------------------------- helpers


def _rate(success: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    if not mask.any():
        return float("nan")
    return int((success.bool().cpu() & mask).sum()) / int(mask.sum())


def _group(records: Iterable[AttackRecord]) -> dict[tuple[str, float], list[AttackRecord]]:
    groups: dict[tuple[str, float], list[AttackRecord]] = defaultdict(list)
    for record in records:
        groups[(record.norm, round(record.eps, 10))].append(record)
    return groups


def _union(records: Sequence[AttackRecord]) -> torch.Tensor:
    out = torch.zeros_like(records[0].success, dtype=torch.bool)
    for record in records:
        out |= record.success.bool().cpu()
    return out


def _skipped(name: str, why: str) -> Finding:
    return Finding(name, False, f"skipped: {why}", {"reason": why}, skipped=True)


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy and its input gradient (model in eval mode)."""
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach()


# --------------------------------------------------------------------------- checks 1-3 (records)


def check_single_step(records: Sequence[AttackRecord], clean_correct: torch.Tensor, *,
                      tolerance: float = 0.01) -> Finding:
    """(1) Flag if a single-step attack's success rate exceeds the best iterative white-box
    attack's at the same norm and budget by more than ``tolerance``."""
    name = "single_step_beats_iterative"
    pairs = {}
    for (norm, eps), group in _group(records).items():
        single = [r for r in group if r.kind == SINGLE_STEP]
        multi = [r for r in group if r.kind == ITERATIVE]
        if single and multi:
            s, m = _rate(_union(single), clean_correct), _rate(_union(multi), clean_correct)
            pairs[f"{norm} eps={eps:g}"] = {"single_step": s, "iterative": m,
                                            "flagged": s > m + tolerance}
    if not pairs:
        return _skipped(name, "no single-step and iterative attacks at a common budget")
    bad = [k for k, v in pairs.items() if v["flagged"]]
    summary = (f"single-step beats iterative at {', '.join(bad)}" if bad else
               f"iterative >= single-step at all {len(pairs)} budgets")
    return Finding(name, bool(bad), summary, {"tolerance": tolerance, "budgets": pairs})


def check_black_box(records: Sequence[AttackRecord], clean_correct: torch.Tensor, *,
                    tolerance: float = 0.02, exclusive_tolerance: float = 0.05) -> Finding:
    """(2) Flag if, at some budget, a non-autograd attack (gradient-free, transfer, BPDA, noise)
    has a success rate above white-box iterative's by more than ``tolerance``, or breaks more than
    ``exclusive_tolerance`` of the clean-correct examples that white-box iterative did not."""
    name = "gradient_free_or_transfer_beats_white_box"
    cases = {}
    mask = clean_correct.bool().cpu()
    for (norm, eps), group in _group(records).items():
        white = [r for r in group if r.kind == ITERATIVE]
        if not white:
            continue
        white_success = _union(white)
        w_rate = _rate(white_success, mask)
        for other in (r for r in group if r.kind in NON_AUTOGRAD):
            o_rate = _rate(other.success, mask)
            only = other.success.bool().cpu() & ~white_success & mask
            exclusive = int(only.sum()) / int(mask.sum()) if mask.any() else float("nan")
            flagged = o_rate > w_rate + tolerance or exclusive > exclusive_tolerance
            cases[f"{other.name} vs white-box ({norm} eps={eps:g})"] = {
                "kind": other.kind, "other_success": o_rate, "white_box_success": w_rate,
                "broken_only_by_other": exclusive, "flagged": flagged}
    if not cases:
        return _skipped(name, "no non-autograd attack at a budget with a white-box attack")
    bad = [k for k, v in cases.items() if v["flagged"]]
    summary = (f"{len(bad)} of {len(cases)} comparisons favour the non-autograd attack, e.g. "
               f"{bad[0]}: {cases[bad[0]]['other_success']:.1%} vs "
               f"{cases[bad[0]]['white_box_success']:.1%}" if bad else
               f"white-box PGD at least as strong in all {len(cases)} comparisons")
    return Finding(name, bool(bad), summary,
                   {"tolerance": tolerance, "exclusive_tolerance": exclusive_tolerance,
                    "comparisons": cases})


def check_budget_monotonicity(records: Sequence[AttackRecord], clean_correct: torch.Tensor, *,
                              min_rise: float = 0.05, saturated: float = 0.95,
                              drop_tolerance: float = 0.02) -> Finding:
    """(3) For each norm with white-box iterative attacks at two or more budgets: flag if success
    falls by more than ``drop_tolerance`` as the budget grows, or rises by less than ``min_rise``
    from the smallest to the largest budget while staying under ``saturated``."""
    name = "success_flat_in_budget"
    curves: dict[str, dict[float, float]] = defaultdict(dict)
    for (norm, eps), group in _group(records).items():
        white = [r for r in group if r.kind == ITERATIVE]
        if white:
            curves[norm][eps] = _rate(_union(white), clean_correct)
    curves = {n: dict(sorted(c.items())) for n, c in curves.items() if len(c) >= 2}
    if not curves:
        return _skipped(name, "no norm with white-box iterative attacks at two or more budgets")
    flagged_norms = {}
    for norm, curve in curves.items():
        rates = list(curve.values())
        drop = max((a - b for a, b in pairwise(rates)), default=0.0)
        flat = rates[-1] < saturated and rates[-1] - rates[0] < min_rise
        if drop > drop_tolerance or flat:
            flagged_norms[norm] = {"max_drop": drop, "rise": rates[-1] - rates[0]}
    summary = (f"success does not rise with budget for {sorted(flagged_norms)}" if flagged_norms
               else f"success rises with budget for {sorted(curves)}")
    return Finding(name, bool(flagged_norms), summary,
                   {"curves": {n: {f"{e:g}": r for e, r in c.items()} for n, c in curves.items()},
                    "flagged": flagged_norms, "min_rise": min_rise, "saturated": saturated})


# --------------------------------------------------------------------------- checks 4-6 (model)


def check_unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    record: AttackRecord | None = None, clean_correct: torch.Tensor | None = None,
                    eps: float = 1.0, steps: int = 20, threshold: float = 0.99,
                    max_examples: int = 256, generator: torch.Generator | None = None) -> Finding:
    """(4) Flag if an unbounded attack fools fewer than ``threshold`` of the clean-correct examples.

    Uses ``record`` if given; otherwise runs PGD Linf with ``eps`` (1.0 = unbounded on [0, 1]
    images) and ``steps`` steps on at most ``max_examples`` clean-correct examples. PGD, not
    APGD: both break every example of a model with working gradients (measured on the vanilla and
    an adversarially trained compact net), but APGD's random start and first step of ``2 * eps``
    turn an unbounded image into noise that fools a masked model too (GCM: 100 %, PGD 92 %), so
    with APGD this check could no longer tell masking apart.
    """
    name = "unbounded_attack_fails"
    if clean_correct is None:
        clean_correct = predict(model, x).cpu() == y.cpu()
    if record is not None:
        rate, how = _rate(record.success, clean_correct), f"record {record.name!r}"
    else:
        from gradshield.attacks import pgd

        index = clean_correct.nonzero().flatten()[:max_examples]
        if index.numel() == 0:
            return _skipped(name, "no clean-correct examples")
        result = pgd(model, x[index], y[index], eps=eps, norm="linf", steps=steps,
                     random_start=False, generator=generator)
        rate = float(result.success.float().mean())
        how = f"PGD linf eps={eps:g} steps={steps} on {index.numel()} clean-correct examples"
    flagged = bool(rate < threshold)
    summary = f"unbounded attack success {rate:.1%} ({how}); expected >= {threshold:.0%}"
    return Finding(name, flagged, summary, {"success": rate, "threshold": threshold,
                                            "attack": how})


def check_finite_differences(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                             max_examples: int = 32, h: float = 1e-3,
                             dtype: torch.dtype = torch.float64, rtol: float = 0.1,
                             generator: torch.Generator | None = None) -> Finding:
    """(5) Compare autograd's directional derivative of the per-example cross-entropy along a
    random unit (L2) direction with the central difference ``(L(x+hu) - L(x-hu)) / 2h``.

    Runs on a copy of the model cast to ``dtype`` (float64 by default, so rounding does not
    pollute the difference). Flags if the median relative discrepancy
    ``|ad - fd| / (max(|ad|, |fd|) + 1e-12)`` exceeds ``rtol``. For GCM, ``ad`` is ~1e9-1e12
    times ``fd``: the autograd gradient does not describe the function. ``h`` is the L2 length
    of the step in [0, 1] pixel units (inputs are not clipped: this probes the function).
    """
    name = "gradient_disagrees_with_finite_differences"
    n = min(max_examples, x.shape[0])
    probe = copy.deepcopy(model).to(dtype).eval()
    xs, ys = x[:n].to(dtype), y[:n]
    u = torch.randn(xs.shape, generator=generator, dtype=torch.float32).to(xs)
    u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    _, grad = _loss_grad(probe, xs, ys)
    ad = (grad * u).flatten(1).sum(1)
    with torch.no_grad():
        up = F.cross_entropy(probe(xs + h * u), ys, reduction="none")
        down = F.cross_entropy(probe(xs - h * u), ys, reduction="none")
    fd = (up - down) / (2 * h)
    rel = (ad - fd).abs() / (torch.maximum(ad.abs(), fd.abs()) + 1e-12)
    rel = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("inf")))
    median = float(rel.median())
    ratio = (ad.abs() / (fd.abs() + 1e-30)).median()
    flagged = bool(not median <= rtol)
    summary = (f"median |autograd - finite difference| / scale = {median:.3g} "
               f"(rtol {rtol:g}); median |autograd|/|fd| = {float(ratio):.3g}")
    return Finding(name, flagged, summary, {
        "median_relative_error": median, "median_abs_ratio": float(ratio), "rtol": rtol,
        "h": h, "dtype": str(dtype).replace("torch.", ""), "examples": n,
        "autograd_first": [float(v) for v in ad[:5]], "finite_diff_first": [float(v) for v in fd[:5]],
    })


def gradient_health(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    zero_tolerance: float = 0.1, batch_size: int = 256) -> Finding:
    """(6) Input gradients of the cross-entropy in the model's own precision: flag any inf/NaN
    entry, or more than ``zero_tolerance`` of examples with an all-zero gradient."""
    name = "non_finite_or_zero_gradients"
    non_finite = zero = total = bad_examples = 0
    norms = []
    for begin in range(0, x.shape[0], batch_size):
        _, grad = _loss_grad(model, x[begin:begin + batch_size], y[begin:begin + batch_size])
        finite = torch.isfinite(grad)
        non_finite += int((~finite).sum())
        total += grad.numel()
        bad_examples += int((~finite.flatten(1).all(1)).sum())
        zero += int((grad.flatten(1) == 0).all(1).sum())
        ok = finite.flatten(1).all(1)
        norms.append(grad.flatten(1)[ok].norm(dim=1))
    n = x.shape[0]
    norms = torch.cat(norms)
    median_norm = float(norms.median()) if norms.numel() else float("nan")
    flagged = non_finite > 0 or zero / n > zero_tolerance
    summary = (f"{bad_examples}/{n} examples have inf/NaN input gradients "
               f"({non_finite / total:.1%} of entries), {zero}/{n} all-zero; "
               f"median L2 norm of finite gradients {median_norm:.3g}")
    return Finding(name, bool(flagged), summary, {
        "non_finite_fraction": non_finite / total, "examples_non_finite": bad_examples,
        "examples_zero": zero, "examples": n, "median_grad_l2": median_norm,
        "zero_tolerance": zero_tolerance})


# --------------------------------------------------------------------------- verdict


def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             records: Sequence[AttackRecord] = (), clean_correct: torch.Tensor | None = None,
             run_unbounded: bool = True, unbounded_record: AttackRecord | None = None,
             fd_examples: int = 32, unbounded_examples: int = 256,
             generator: torch.Generator | None = None) -> Verdict:
    """Run all six checks and return the :class:`Verdict`.

    ``records``: precomputed outcomes on (x, y) for checks 1-3 (skipped without them).
    ``unbounded_record`` (an attack with an unbounded budget on the same examples) replaces
    running PGD Linf eps=1 for check 4; ``run_unbounded=False`` skips check 4 instead.
    """
    check_images(x)
    check_labels(y, x.shape[0])
    if clean_correct is None:
        clean_correct = predict(model, x).cpu() == y.cpu()
    clean_correct = clean_correct.bool().cpu()
    for record in records:
        if record.success.shape != clean_correct.shape:
            raise GradshieldError(
                f"record {record.name!r} has success of shape {tuple(record.success.shape)}, "
                f"expected {tuple(clean_correct.shape)} (one entry per example of x)")
    findings = [
        check_single_step(records, clean_correct),
        check_black_box(records, clean_correct),
        check_budget_monotonicity(records, clean_correct),
    ]
    if unbounded_record is not None or run_unbounded:
        findings.append(check_unbounded(model, x, y, record=unbounded_record,
                                        clean_correct=clean_correct,
                                        max_examples=unbounded_examples, generator=generator))
    else:
        findings.append(_skipped("unbounded_attack_fails", "not run (run_unbounded=False)"))
    findings.append(check_finite_differences(model, x, y, max_examples=fd_examples,
                                             generator=generator))
    findings.append(gradient_health(model, x, y))
    return Verdict(tuple(findings))

