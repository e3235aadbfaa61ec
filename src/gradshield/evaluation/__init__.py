"""Evaluation: attack suites run over models into per-example results files, and what is read
from them.

- :mod:`~gradshield.evaluation.suites`: suite TOML files (attacks and budgets), parsed and checked;
- :mod:`~gradshield.evaluation.store`: the SQLite results file (schema, create/resume, reading);
- :mod:`~gradshield.evaluation.runner`: :func:`run_suite`, resumable, per example;
- :mod:`~gradshield.evaluation.summary`: per-attack rows, worst case, two runs side by side;
- :mod:`~gradshield.evaluation.diagnostics`: gradient-masking checks;
- :mod:`~gradshield.evaluation.report` and :mod:`~gradshield.evaluation.plots`: Markdown/HTML
  reports and figures.
"""

from gradshield.evaluation.runner import run_suite
from gradshield.evaluation.store import RunResults, load_run, open_results
from gradshield.evaluation.suites import Suite, load_suite, parse_suite
from gradshield.evaluation.summary import attack_rows, compare_runs, summarize

__all__ = ["RunResults", "Suite", "attack_rows", "compare_runs", "load_run", "load_suite",
           "open_results", "parse_suite", "run_suite", "summarize"]
