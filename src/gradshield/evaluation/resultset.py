"""An experiment's stored results, looked up by (model, suite, through, examples): the per-example
outcomes that tables and claims are computed from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradshield.errors import GradshieldError
from gradshield.evaluation.store import RunResults, load_run


@dataclass(frozen=True)
class Outcome:
    """Per example of a run: clean-correct, and (for an attack) robust = clean-correct and not
    fooled. ``attack`` None means the clean pass."""

    run: RunResults
    attack: int | None

    @property
    def n(self) -> int:
        return self.run.n

    @property
    def clean(self) -> np.ndarray:
        return self.run.clean_correct

    @property
    def robust(self) -> np.ndarray:
        if self.attack is None:
            return self.run.clean_correct
        return self.run.robust_or_cumulative(self.attack)


class ResultSet:
    """Loads each results file of an experiment once."""

    def __init__(self, experiment, workspace) -> None:
        self.experiment, self.workspace = experiment, workspace
        self._loaded: dict[str, RunResults | None] = {}

    def run(self, model: str, suite: str | None = None, through: str | None = None,
            examples: int | None = None) -> RunResults | None:
        """The results of the matching run with the most examples (None if not run yet);
        ``suite`` None: any suite (for clean accuracy)."""
        candidates = [r for r in self.experiment.runs_of(model)
                      if (suite is None or r.suite == suite) and r.through == through
                      and (examples is None or r.examples == examples)]
        best = None
        for spec in sorted(candidates, key=lambda r: -(r.examples or 10**12)):
            results = self._load(spec)
            if results is not None and (best is None or results.n > best.n):
                best = results
        return best

    def _load(self, spec) -> RunResults | None:
        if spec.key not in self._loaded:
            path = self.workspace.run_path(spec)
            self._loaded[spec.key] = load_run(path) if path.is_file() else None
        return self._loaded[spec.key]

    def outcome(self, model: str, attack: str | None, *, suite: str | None = None,
                through: str | None = None, examples: int | None = None) -> Outcome | None:
        """``attack`` an attack id of the suite, or None / "clean" for clean accuracy."""
        if attack in (None, "clean"):
            run = self.run(model, suite, through, examples)
            if run is None and suite is not None:
                run = self.run(model, None, None, examples)
            return None if run is None else Outcome(run, None)
        run = self.run(model, suite, through, examples)
        if run is None:
            return None
        ids = [a["id"] for a in run.attacks]
        if attack not in ids:
            raise GradshieldError(f"attack {attack!r} is not in the results of {model} "
                                  f"({suite}); its attacks: {ids}")
        return Outcome(run, ids.index(attack))

    def runs(self, model: str) -> list[tuple[object, RunResults]]:
        """Every stored run of the model with its spec."""
        out = []
        for spec in self.experiment.runs_of(model):
            results = self._load(spec)
            if results is not None:
                out.append((spec, results))
        return out
